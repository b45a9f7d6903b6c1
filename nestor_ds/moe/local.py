"""Plain-PyTorch dropless token MoE: the reference backend and the single-process default.

Shape legend: N rows in, V valid rows, D width, E experts, K top-k, A = V*K routed assignments,
S rows of the expert-major buffer (A plus padding for the padded kernel).
Steps: drop padding rows -> route -> give each assignment a row (slot) in an expert-major buffer ->
run the grouped SwiGLU experts on the buffer -> gather each token's K outputs back and sum them with the
renormalised router weights -> add the shared expert -> put the V rows back among the N (padding rows stay zero).

Dispatch and combine are written as gathers in both directions (`dispatch_rows`, `gather_rows`): the
backward of a plain index_select is a scatter-add, which on CPU runs several times slower than a gather.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import MoEOutput, TokenMoE, check_input
from .config import MoEConfig
from .experts import KERNELS, GroupedSwiGLU, SwiGLU, plan_layout
from .router import TopKRouter, load_balancing_loss, router_z_loss, tokens_per_expert


class _Dispatch(torch.autograd.Function):
    """x_SD[slot_VK[v, k]] = x_VD[v], other rows 0. Backward: grad_v = sum_k grad_S[slot_vk] (a gather)."""

    @staticmethod
    def forward(ctx, x_VD: torch.Tensor, slot_VK: torch.Tensor, rows: int) -> torch.Tensor:  # type: ignore[override]
        V, K = slot_VK.shape
        x_SD = x_VD.new_zeros(rows, x_VD.shape[1])
        x_SD[slot_VK] = x_VD.unsqueeze(1).expand(V, K, x_VD.shape[1])
        ctx.save_for_backward(slot_VK)
        return x_SD

    @staticmethod
    def backward(ctx, grad_SD: torch.Tensor):  # type: ignore[override]
        (slot_VK,) = ctx.saved_tensors
        return grad_SD[slot_VK].sum(dim=1), None, None


class _GatherRows(torch.autograd.Function):
    """y_I = x_S[index_I] with distinct indices (a partial permutation). Backward puts the gradient back
    row by row (rows not gathered get 0): a copy, not a scatter-add."""

    @staticmethod
    def forward(ctx, x_S: torch.Tensor, index_I: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(index_I)
        ctx.rows = x_S.shape[0]
        return x_S[index_I]

    @staticmethod
    def backward(ctx, grad_I: torch.Tensor):  # type: ignore[override]
        (index_I,) = ctx.saved_tensors
        grad_S = grad_I.new_zeros(ctx.rows, *grad_I.shape[index_I.dim():])
        grad_S[index_I] = grad_I
        return grad_S, None


def dispatch_rows(x_VD: torch.Tensor, slot_VK: torch.Tensor, rows: int) -> torch.Tensor:
    """[V, D] -> [rows, D]: row v copied to its K slots, every other row zero."""
    return _Dispatch.apply(x_VD, slot_VK, rows)


def gather_rows(x_S: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x_S[index] for distinct indices (any index shape); the backward copies rows instead of adding."""
    return _GatherRows.apply(x_S, index)


class LocalTokenMoE(TokenMoE):
    """Dropless top-k MoE of SwiGLU experts plus shared SwiGLU experts, all on this process.

    Parameters: router.gate.weight [E, D]; experts.w1_EFD/w3_EFD [E, F, D], experts.w2_EDF [E, D, F];
    shared.{w1,w3,w2}.weight (hidden cfg.shared_hidden_dim) when num_shared_experts > 0.
    """

    def __init__(self, cfg: MoEConfig, dim: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.dim, self.hidden = dim, cfg.hidden_dim(dim)
        self.router = TopKRouter(dim, cfg.num_experts, cfg.top_k, noise_std=cfg.router_noise)
        self.experts = GroupedSwiGLU(cfg.num_experts, dim, self.hidden)
        self.shared = SwiGLU(dim, cfg.shared_hidden_dim(dim)) if cfg.num_shared_experts > 0 else None
        self.kernel: Optional[str] = None  # None = per device (experts.default_kernel); or one of KERNELS

    def forward(self, x_ND: torch.Tensor, valid_N: Optional[torch.Tensor] = None) -> MoEOutput:
        check_input(x_ND, valid_N, self.dim)
        rows_V = None if valid_N is None else valid_N.nonzero().squeeze(1)
        x_VD = x_ND if rows_V is None else x_ND.index_select(0, rows_V)
        V = x_VD.shape[0]

        routing = self.router(x_VD)
        counts_E = tokens_per_expert(routing.experts_NK, self.num_experts)
        kernel = self.kernel or self.experts.default_kernel(x_VD)
        if kernel not in KERNELS:
            raise ValueError(f"LocalTokenMoE.kernel={kernel!r}: expected one of {KERNELS}")
        slot_A, layout = plan_layout(routing.experts_NK.reshape(-1), counts_E, kernel)
        slot_VK = slot_A.view(V, self.top_k)

        y_SD = self.experts(dispatch_rows(x_VD, slot_VK, layout.rows), layout)
        y_VKD = gather_rows(y_SD, slot_VK)
        # sum the K routes in fp32 (as DeepSpeed does), then back to the activation dtype
        y_VD = (routing.weights_NK.unsqueeze(-1) * y_VKD.float()).sum(dim=1).to(x_VD.dtype)
        if self.shared is not None:
            y_VD = y_VD + self.shared(x_VD)

        out_ND = y_VD if rows_V is None else torch.zeros_like(x_ND).index_copy(0, rows_V, y_VD)
        return MoEOutput(
            out_ND=out_ND,
            lb_loss=load_balancing_loss(routing.probs_NE, routing.experts_NK),
            z_loss=router_z_loss(routing.logits_NE),
            tokens_per_expert_E=counts_E,
        )
