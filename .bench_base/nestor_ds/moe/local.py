"""Plain-PyTorch dropless token MoE: the reference backend and the single-process default.

Shape legend: N rows in, V valid rows, D width, E experts, K top-k, R = V*K routed rows.
Steps: drop padding rows -> route -> sort the R assignments by expert -> grouped SwiGLU over
contiguous per-expert slices -> weight by the renormalised router probability and scatter-add back
-> add the shared expert -> put the V rows back among the N (padding rows stay zero).
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import MoEOutput, TokenMoE, check_input
from .config import MoEConfig
from .experts import GroupedSwiGLU, SwiGLU
from .router import TopKRouter, load_balancing_loss, router_z_loss, tokens_per_expert


class LocalTokenMoE(TokenMoE):
    """Dropless top-k MoE of SwiGLU experts plus shared SwiGLU experts, all on this process.

    Parameters: router.gate.weight [E, D]; experts.w1_EFD/w3_EFD [E, F, D], experts.w2_EDF [E, D, F];
    shared.{w1,w3,w2}.weight (hidden S*F) when num_shared_experts > 0.
    """

    def __init__(self, cfg: MoEConfig, dim: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.dim, self.hidden = dim, cfg.hidden_dim(dim)
        self.router = TopKRouter(dim, cfg.num_experts, cfg.top_k, noise_std=cfg.router_noise)
        self.experts = GroupedSwiGLU(cfg.num_experts, dim, self.hidden)
        self.shared = SwiGLU(dim, self.hidden * cfg.num_shared_experts) if cfg.num_shared_experts > 0 else None
        self.use_grouped_mm: Optional[bool] = None  # None = probe the device/dtype; False forces the loop

    def forward(self, x_ND: torch.Tensor, valid_N: Optional[torch.Tensor] = None) -> MoEOutput:
        check_input(x_ND, valid_N, self.dim)
        rows_V = None if valid_N is None else valid_N.nonzero().squeeze(1)
        x_VD = x_ND if rows_V is None else x_ND.index_select(0, rows_V)

        routing = self.router(x_VD)
        experts_R = routing.experts_NK.reshape(-1)
        order_R = experts_R.argsort(stable=True)  # group assignments by expert
        token_R = order_R.div(self.top_k, rounding_mode="floor")  # source row of each sorted assignment
        counts_E = tokens_per_expert(routing.experts_NK, self.num_experts)

        y_RD = self.experts(x_VD.index_select(0, token_R), counts_E, self.use_grouped_mm)
        w_R1 = routing.weights_NK.reshape(-1).index_select(0, order_R).unsqueeze(1)
        # sum the K routes in fp32 (as DeepSpeed does), then back to the activation dtype
        y_VD = x_VD.new_zeros(x_VD.shape, dtype=torch.float32).index_add_(0, token_R, y_RD.float() * w_R1)
        y_VD = y_VD.to(x_VD.dtype)
        if self.shared is not None:
            y_VD = y_VD + self.shared(x_VD)

        out_ND = y_VD if rows_V is None else torch.zeros_like(x_ND).index_copy(0, rows_V, y_VD)
        return MoEOutput(
            out_ND=out_ND,
            lb_loss=load_balancing_loss(routing.probs_NE, routing.experts_NK),
            z_loss=router_z_loss(routing.logits_NE),
            tokens_per_expert_E=counts_E,
        )
