"""ModelConfig: every knob of NESTOR and of the AFNO baseline, defaults = the authors' NESTOR-Ti.

The authors hard-coded depth, expert counts and top-k; here each is a field so that presets
(`presets.py`) and YAML overrides can change them without touching model code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from nestor_ds.errors import UserError
from nestor_ds.moe import MoEConfig

ARCHS = ("nestor", "afno")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash")
IMAGE_ROUTINGS = ("dropless", "static")
# Samples per image expert under static routing: ceil(cf * K * B / E). On the demo mixture factors 1.0-2.0 all
# matched dropless L2RE within seed noise; 1.25 keeps a margin (docs/benchmarks.md, "Static routing").
DEFAULT_IMAGE_CAPACITY_FACTOR = 1.25


@dataclass
class ModelConfig:
    """Architecture of one model. Shapes: input [B, X, Y, t_in, in_channels] at `resolution`."""

    arch: str = "nestor"  # "nestor" | "afno" (DPOT-style AFNO baseline)
    in_channels: int = 4  # physical channels (padded to this by the data loader); unset: data.channels
    out_channels: int | None = None  # None -> in_channels
    resolution: int = 128  # training grid X = Y (unset: data.resolution); other grids interpolate the pos. embedding
    patch_size: int = 8  # grid points per token side: resolution / patch_size tokens per side
    t_in: int = 10  # past frames per sample; unset: data.t_in
    t_ar: int = 1  # frames predicted per forward pass; unset: data.t_ar
    width: int = 512  # token width D
    depth: int = 2  # NESTOR blocks (arch=nestor) or AFNO blocks (arch=afno)
    num_heads: int = 8  # attention heads of each image expert (width must divide by it)
    image_experts: int = 6  # image-level experts per NESTOR block (each: attention + a token MoE)
    image_top_k: int = 2  # image experts each sample is routed to
    image_routing: str = "dropless"  # "dropless" | "static" (fixed samples per image expert, training only)
    image_capacity_factor: float | None = None  # static: ceil(cf * k * B / E) samples/expert; None = default
    image_router_noise: float = 0.0  # std of Gaussian noise on image-router logits (training only)
    image_moe_skip: bool = True  # the authors' extra identity term in ImageMoE (see nestor.py)
    afno_modes: int = 32  # Fourier modes kept per axis by each AFNO layer
    afno_num_blocks: int = 4  # block-diagonal blocks of the AFNO spectral weights (width must divide by it)
    afno_mlp_ratio: float = 1.0  # hidden width of the AFNO layers' channel MLP / width
    afno_sparsity: float = 0.01  # softshrink threshold on the spectral output (DPOT)
    shared_afno_layers: int = 2  # AFNO layers of the shared global expert in each NESTOR block (0: none)
    afno_spectral: str = "dft"  # AFNO transforms: "dft" (real DFT matmuls) | "fft" (fp32 FFT islands)
    embed_hidden: int | None = None  # patch-embedding hidden channels; None -> DPOT's C_out*patch+3
    head_dim: int = 32  # output head hidden channels (DPOT's out_layer_dim)
    norm_groups: int = 8  # GroupNorm groups (DPOT)
    num_datasets: int = 0  # DPOT's dataset-classification head (0 = off)
    predict_residual: bool = False  # predict x_last + head(z) (not in the authors' code; off by default)
    dropout: float = 0.0  # dropout on the image experts' attention and token-MoE outputs before their residual adds
    attn_dropout: float = 0.0  # dropout on the attention weights (training only)
    attention: str = "auto"  # "auto" (flash-attn on CUDA in bf16/fp16 when installed, else SDPA) | "sdpa" | "flash"
    moe: MoEConfig = field(default_factory=MoEConfig)  # token-level Sub-MoE inside each image expert

    @property
    def c_out(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def grid(self) -> int:
        """Tokens per side at the training resolution."""
        return self.resolution // self.patch_size

    @property
    def embed_hidden_dim(self) -> int:
        return self.embed_hidden if self.embed_hidden is not None else self.c_out * self.patch_size + 3

    def image_capacity(self, batch: int) -> int:
        """Samples per image expert under static routing: ceil(cf * K * B / E), at most B, at least 1 (B > 0).
        Not rounded to 8 like the token capacity: a sample is a whole token field, already a large matmul."""
        from nestor_ds.moe.dispatch import capacity

        cf = DEFAULT_IMAGE_CAPACITY_FACTOR if self.image_capacity_factor is None else self.image_capacity_factor
        return capacity(cf, batch, self.image_top_k, self.image_experts)

    def validate(self) -> ModelConfig:
        """Raise ValueError naming the field for any inconsistent setting; return self."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(f"model config: {msg}")

        need(self.arch in ARCHS, f"arch={self.arch!r} not in {ARCHS}")
        need(self.afno_spectral in ("dft", "fft"), f"afno_spectral={self.afno_spectral!r} not in ('dft', 'fft')")
        need(self.attention in ATTENTION_BACKENDS, f"attention={self.attention!r} not in {ATTENTION_BACKENDS}")
        for name in (
            "in_channels",
            "resolution",
            "patch_size",
            "t_in",
            "t_ar",
            "width",
            "depth",
            "num_heads",
            "image_experts",
            "image_top_k",
            "afno_modes",
            "afno_num_blocks",
            "head_dim",
            "norm_groups",
        ):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be > 0")
        need(self.c_out > 0, f"out_channels={self.out_channels} must be > 0")
        need(
            self.resolution % self.patch_size == 0,
            f"resolution={self.resolution} not divisible by patch_size={self.patch_size}",
        )
        need(self.width % self.num_heads == 0, f"width={self.width} not divisible by num_heads={self.num_heads}")
        need(
            self.width % self.afno_num_blocks == 0,
            f"width={self.width} not divisible by afno_num_blocks={self.afno_num_blocks}",
        )
        need(self.width % self.norm_groups == 0, f"width={self.width} not divisible by norm_groups={self.norm_groups}")
        need(
            self.image_top_k <= self.image_experts,
            f"image_top_k={self.image_top_k} > image_experts={self.image_experts}",
        )
        need(self.image_routing in IMAGE_ROUTINGS, f"image_routing={self.image_routing!r} not in {IMAGE_ROUTINGS}")
        if self.image_routing == "static":
            need(
                self.image_capacity_factor is None or self.image_capacity_factor > 0,
                f"image_capacity_factor={self.image_capacity_factor} must be > 0 with image_routing='static'",
            )
        else:  # older configs meant "image_capacity_factor > 0 = capacity"; the switch is explicit now
            need(
                self.image_capacity_factor in (None, 0, 0.0),
                f"image_capacity_factor={self.image_capacity_factor} is used only by image_routing='static' "
                "(set image_routing: static, or remove image_capacity_factor for dropless)",
            )
        need(self.image_router_noise >= 0, f"image_router_noise={self.image_router_noise} must be >= 0")
        need(self.shared_afno_layers >= 0, f"shared_afno_layers={self.shared_afno_layers} must be >= 0")
        need(self.afno_mlp_ratio > 0, f"afno_mlp_ratio={self.afno_mlp_ratio} must be > 0")
        need(0 <= self.dropout < 1 and 0 <= self.attn_dropout < 1, "dropout and attn_dropout must be in [0, 1)")
        need(
            not self.predict_residual or self.c_out == self.in_channels,
            f"predict_residual needs out_channels == in_channels, got {self.c_out} != {self.in_channels}",
        )
        need(self.num_datasets >= 0, f"num_datasets={self.num_datasets} must be >= 0")
        if hasattr(self.moe, "validate"):
            self.moe.validate()
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict (YAML); `moe` may be a nested dict. Unknown keys and wrong types raise ValueError."""
        from nestor_ds.typed_config import build_dataclass

        return build_dataclass(cls, d, "model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
