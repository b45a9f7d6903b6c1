"""Parameter and FLOP accounting, written out analytically so the numbers can be read and checked.

Conventions (per sample, forward pass):
  - matmul / conv: 2 * multiply-accumulates; attention counts Q K^T and A V (2 * L^2 * D each);
  - FFT: 5 L log2 L per 2-D transform and channel (L = H*W tokens), one forward and one inverse per AFNO layer;
  - experts at top-k: each sample runs K image experts, each token K_tok routed + the shared experts;
  - elementwise work (norms, activations, softmax) is not counted.
`matmul_flops` is what torch.utils.flop_counter.FlopCounterMode measures (FFTs excluded);
`measured_flops` runs FlopCounterMode with formulas for the two ops it does not know on CPU
(CPU flash attention and torch._grouped_mm) so that the two can be compared.
Training FLOPs are taken as 3 x forward (backward = 2 x forward).

Shape legend: X grid points per side (square grids), T = T_in input frames, D width, F expert hidden width,
L = H*W tokens per sample, K image top-k (K_tok token top-k), E experts, S rows of an expert-major buffer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig


@dataclass
class Accounting:
    total_params: int
    active_params: int  # per sample: shared parts + K image experts with K_tok + shared token experts
    matmul_flops: int  # per sample, forward, matmuls/convs/attention (FFT excluded)
    fft_flops: int  # per sample, forward

    @property
    def flops_per_sample(self) -> int:
        return self.matmul_flops + self.fft_flops

    def as_dict(self) -> dict[str, int]:
        return {
            "total_params": self.total_params,
            "active_params": self.active_params,
            "flops_per_sample": self.flops_per_sample,
            "matmul_flops": self.matmul_flops,
            "fft_flops": self.fft_flops,
        }


def afno_block_flops(cfg: ModelConfig, h: int, w: int) -> tuple[int, int]:
    """(matmul, fft) FLOPs of one AFNO block on an h x w token grid."""
    D, bs = cfg.width, cfg.width // cfg.afno_num_blocks
    modes = min(cfg.afno_modes, h) * min(cfg.afno_modes, w // 2 + 1)  # DPOT's kept block of the rfft2
    spectral = 2 * 2 * 4 * modes * D * bs  # 2 layers x 2 FLOP/MAC x 4 D bs MACs/mode ([Re,Im] 2x2 blocks)
    mlp = 2 * 2 * h * w * D * int(D * cfg.afno_mlp_ratio)
    n = h * w
    fft = 2 * D * int(5 * n * math.log2(n))
    return spectral + mlp, fft


def image_expert_flops(cfg: ModelConfig, L: int) -> int:
    """Matmul FLOPs of one image expert on one sample of L tokens (token experts at top-k)."""
    D, m = cfg.width, cfg.moe
    F = m.hidden_dim(D)
    attn = 2 * L * D * 3 * D + 2 * 2 * L * L * D + 2 * L * D * D
    router = 2 * L * D * m.num_experts
    experts = 2 * L * 3 * D * (F * m.top_k + (m.shared_hidden_dim(D) if m.num_shared_experts else 0))
    return attn + router + experts


def forward_flops(cfg: ModelConfig, resolution: int | None = None) -> tuple[int, int]:
    """(matmul, fft) forward FLOPs per sample at `resolution` (default: cfg.resolution)."""
    X = resolution or cfg.resolution  # square grid: X = Y
    p, D, T = cfg.patch_size, cfg.width, cfg.t_in
    g = X // p
    L = g * g
    eh = cfg.embed_hidden_dim
    mm = T * L * 2 * ((cfg.in_channels + 3) * p * p * eh + eh * D)  # patch embedding
    mm += 2 * L * T * D * D  # temporal aggregation
    mm += 2 * L * D * cfg.head_dim * p * p  # transposed conv
    mm += 2 * X * X * cfg.head_dim * (cfg.head_dim + cfg.t_ar * cfg.c_out)  # 1x1 convs
    if cfg.num_datasets:
        mm += 2 * (2 * D * D + D * cfg.num_datasets)
    afno_mm, afno_fft = afno_block_flops(cfg, g, g)
    if cfg.arch == "afno":
        return mm + cfg.depth * afno_mm, cfg.depth * afno_fft
    per_block = 2 * D * cfg.image_experts + cfg.image_top_k * image_expert_flops(cfg, L)
    per_block += cfg.shared_afno_layers * afno_mm
    return mm + cfg.depth * per_block, cfg.depth * cfg.shared_afno_layers * afno_fft


def _count(m: nn.Module | None) -> int:
    return 0 if m is None else sum(p.numel() for p in m.parameters())


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per sample), counted on a model built on the meta device (no memory)."""
    from . import build_model

    local = dataclasses.replace(
        cfg, moe=dataclasses.replace(cfg.moe, backend="local", ep_size=1, routing="dropless", capacity_factor=None)
    )
    with torch.device("meta"):
        model = build_model(local)
    total = _count(model)
    if cfg.arch == "afno":
        return total, total
    active = total
    for blk in model.blocks:
        ex = blk.moe.experts[0]
        moe = ex.moe
        routed = _count(moe.experts)
        per_expert_routed = routed // moe.num_experts
        active_expert = _count(ex) - (moe.num_experts - moe.top_k) * per_expert_routed
        active -= cfg.image_experts * _count(ex) - cfg.image_top_k * active_expert
    return total, active


def account(cfg: ModelConfig) -> Accounting:
    total, active = param_counts(cfg)
    mm, fft = forward_flops(cfg)
    return Accounting(total, active, mm, fft)


def _sdpa_cpu_flop(q, k, v, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q, k, v)


def _sdpa_cpu_backward_flop(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, q, k, v)


def _grouped_mm_flop(a, b, *args, out_shape=None, **kwargs) -> int:
    # a [S, in] (2-D, rows grouped by offs) x b [E, in, out]: each row meets one expert's weight
    if len(a) == 2 and len(b) == 3:
        return 2 * a[0] * a[1] * b[2]
    if len(a) == 3 and len(b) == 2:  # a [E, out, S]... backward form: grad_w = x^T g per group
        return 2 * a[0] * a[1] * a[2] * b[1] // max(a[0], 1)
    return 2 * math.prod(out_shape) * a[-1]


def extra_flop_formulas() -> dict:
    """FlopCounterMode custom_mapping for CPU ops torch does not count (CPU flash attention, grouped mm)."""
    aten = torch.ops.aten
    table = {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flop,
    }
    if hasattr(aten, "_grouped_mm"):
        table[aten._grouped_mm] = _grouped_mm_flop
    return table


def measured_flops(model: nn.Module, x: torch.Tensor, backward: bool = False) -> int:
    """FLOPs of one forward (and backward) pass counted by FlopCounterMode (FFTs are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()) as fc:
        out = model(x)
        if backward:
            (out.pred.float().square().mean() + sum(out.aux_losses.values())).backward()
    return fc.get_total_flops()
