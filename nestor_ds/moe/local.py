"""Plain-PyTorch token MoE: the reference backend and the single-process default.

Shape legend: N rows in, V valid rows, D width, E experts, K top-k, A = V*K routed assignments,
S rows of the expert-major buffer (A plus padding for the padded kernel), Q capacity: rows per expert (static).

Dropless (cfg.routing="dropless", and always in evaluation): drop padding rows -> route -> give each
assignment a row (slot) in an expert-major buffer -> run the grouped SwiGLU experts on the buffer ->
gather each token's K outputs back and sum them with the renormalised router weights -> add the shared
expert -> put the V rows back among the N (padding rows stay zero).

Static (cfg.routing="static", training): route all N rows; every expert gets a fixed buffer of Q rows
(`nestor_ds.moe.dispatch.plan_capacity`: padding rows absent, overflow dropped lowest weight first and
counted); the experts run as one batched matmul per projection on [E, Q, D]; losses and counts use masks
over valid rows. Shapes depend only on N, so there is no host sync and torch.compile needs no graph break.
The dispatch/combine helpers live in nestor_ds.moe.dispatch (shared with the image-level MoE).
"""

from __future__ import annotations

import torch

from .base import MoEOutput, TokenMoE, check_input, static_output
from .config import MoEConfig
from .dispatch import dispatch_rows, gather_rows, plan_static
from .experts import KERNELS, ExpertLayout, GroupedSwiGLU, SwiGLU, plan_layout
from .router import TopKRouter, load_balancing_loss, router_z_loss, tokens_per_expert


class LocalTokenMoE(TokenMoE):
    """Dropless top-k MoE of SwiGLU experts plus shared SwiGLU experts, all on this process.

    Parameters: router.gate.weight [E, D]; experts.w1_EFD/w3_EFD [E, F, D], experts.w2_EDF [E, D, F];
    shared.{w1,w3,w2}.weight (hidden cfg.shared_hidden_dim) when num_shared_experts > 0.
    """

    def __init__(self, cfg: MoEConfig, dim: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.dim, self.hidden = dim, cfg.hidden_dim(dim)
        self.cfg = cfg
        self.router = TopKRouter(dim, cfg.num_experts, cfg.top_k, noise_std=cfg.router_noise)
        self.experts = GroupedSwiGLU(cfg.num_experts, dim, self.hidden)
        self.shared = SwiGLU(dim, cfg.shared_hidden_dim(dim)) if cfg.num_shared_experts > 0 else None
        self.kernel: str | None = None  # None = per device (experts.default_kernel); or one of KERNELS

    def forward(self, x_ND: torch.Tensor, valid_N: torch.Tensor | None = None) -> MoEOutput:
        check_input(x_ND, valid_N, self.dim)
        if self.cfg.static and self.training:
            return self._forward_static(x_ND, valid_N)
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

    def _forward_static(self, x_ND: torch.Tensor, valid_N: torch.Tensor | None) -> MoEOutput:
        """Fixed capacity Q per expert; shapes depend on N only (see the module docstring)."""
        N, E, K = x_ND.shape[0], self.num_experts, self.top_k
        Q = self.cfg.capacity(N)
        routing = self.router(x_ND)
        plan = plan_static(routing.experts_NK, routing.probs_NE, valid_N, E, Q)

        x_SD = dispatch_rows(x_ND, plan.slot_A.view(N, K), plan.rows)
        layout = ExpertLayout("padded", E * Q, chunk=Q, one_chunk_per_expert=True)  # [E, Q, D] batched matmul
        y_SD = torch.cat([self.experts(x_SD[: E * Q], layout), x_SD.new_zeros(1, self.dim)])  # + the drop row
        return static_output(y_SD, plan, routing, x_ND, valid_N, self.shared)
