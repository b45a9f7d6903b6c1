"""What every token-MoE backend returns and promises (the contract in docs/ARCHITECTURE.md).

Shape legend: N rows in, V valid rows (N less padding), D width, E experts, K top-k, S rows of an expert-major buffer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class MoEOutput(NamedTuple):
    out_ND: torch.Tensor  # output rows; padding rows (valid_N False) are zeros
    lb_loss: torch.Tensor  # scalar, E * sum_i f_i P_i over valid rows (0 when there are none)
    z_loss: torch.Tensor  # scalar, mean logsumexp(logits)^2 over valid rows (0 when there are none)
    tokens_per_expert_E: torch.Tensor  # long [E], routed assignments per expert, valid rows of this rank
    dropped: torch.Tensor | None = None  # long scalar: assignments over capacity (static routing; None: dropless)


class TokenMoE(nn.Module):
    """Base of the backends: forward(x_ND, valid_N) -> MoEOutput.

    Attributes every backend sets: num_experts, top_k, dim, hidden, router (TopKRouter-like with a
    `gate` Linear or DeepSpeed's `wg`), shared (SwiGLU or None).
    """

    num_experts: int
    top_k: int

    def forward(self, x_ND: torch.Tensor, valid_N: torch.Tensor | None = None) -> MoEOutput:  # pragma: no cover
        raise NotImplementedError


def check_input(x_ND: torch.Tensor, valid_N: torch.Tensor | None, dim: int) -> None:
    """One-line errors naming the shape for wrong inputs (the model calls this deep inside)."""
    if x_ND.dim() != 2 or x_ND.shape[1] != dim:
        raise ValueError(f"TokenMoE: x_ND must be [N, {dim}], got {tuple(x_ND.shape)}")
    if valid_N is not None and (valid_N.dtype != torch.bool or tuple(valid_N.shape) != (x_ND.shape[0],)):
        raise ValueError(
            f"TokenMoE: valid_N must be a bool tensor [{x_ND.shape[0]}], got {valid_N.dtype} {tuple(valid_N.shape)}"
        )


class ExternalRoutedMoE(TokenMoE):
    """A backend whose routed experts run in another library (MegaBlocks); shared experts, padding
    handling, losses and counts are ours, so every backend reports the same quantities.

    Subclasses set num_experts, top_k, dim, hidden, shared and implement ``gate_weight`` (the library's router
    weight [E, D]) and ``routed(x_ND) -> out_ND``.
    """

    shared: nn.Module | None

    @property
    def gate_weight(self) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def routed(self, x_ND: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x_ND: torch.Tensor, valid_N: torch.Tensor | None = None) -> MoEOutput:
        from .router import load_balancing_loss, route_from_logits, router_z_loss, tokens_per_expert

        check_input(x_ND, valid_N, self.dim)
        rows_V = None if valid_N is None else valid_N.nonzero().squeeze(1)
        # The libraries route padding rows too (DeepSpeed honours a padding mask only for top-1): give them
        # detached copies of valid rows, so they spread over experts like real tokens instead of all picking
        # the same two and inflating the dropless buffer; their outputs are zeroed below.
        x_in_ND = x_ND
        if rows_V is not None and 0 < rows_V.numel() < x_ND.shape[0]:
            pad_rows = (~valid_N).nonzero().squeeze(1)
            fill_rows = rows_V[torch.arange(pad_rows.numel(), device=x_ND.device) % rows_V.numel()]
            x_in_ND = x_ND.index_copy(0, pad_rows, x_ND.index_select(0, fill_rows).detach())
        elif rows_V is not None and rows_V.numel() == 0:
            # padding only (other ranks of the expert-parallel group have tokens): identical rows would all pick the
            # same experts and blow up the all-reduced dropless capacity; the router's own rows spread them. The
            # values change but x_ND stays in the graph, so the backward all-to-alls run here as on the other ranks.
            spread_ND = self.gate_weight.detach()[torch.arange(x_ND.shape[0], device=x_ND.device) % self.num_experts]
            x_in_ND = x_ND + (spread_ND.to(x_ND.dtype) - x_ND).detach()
        out_ND = self.routed(x_in_ND)
        x_VD = x_ND if rows_V is None else x_ND.index_select(0, rows_V)
        if self.shared is not None:
            shared_VD = self.shared(x_VD)
            out_ND = out_ND + (
                shared_VD if rows_V is None else torch.zeros_like(out_ND).index_copy(0, rows_V, shared_VD)
            )
        if valid_N is not None:
            out_ND = torch.where(valid_N.unsqueeze(1), out_ND, torch.zeros_like(out_ND))
        # losses and counts from the library's own gate weight, valid rows only (it routes identically)
        routing = route_from_logits(torch.nn.functional.linear(x_VD.float(), self.gate_weight.float()), self.top_k)
        return MoEOutput(
            out_ND,
            load_balancing_loss(routing.probs_NE, routing.experts_NK),
            router_z_loss(routing.logits_NE),
            tokens_per_expert(routing.experts_NK, self.num_experts),
        )


def static_output(
    y_SD: torch.Tensor, plan, routing, x_ND: torch.Tensor, valid_N: torch.Tensor | None, shared: nn.Module | None
) -> MoEOutput:
    """Combine of a static-routing call: each row's K expert outputs (the drop row for dropped assignments, weight 0)
    summed in fp32 with the router weights, + the shared expert, padding rows zeroed, losses on valid rows."""
    from .dispatch import gather_rows
    from .router import load_balancing_loss, router_z_loss

    N, K = routing.experts_NK.shape
    y_NKD = gather_rows(y_SD, plan.slot_A.view(N, K))
    w_NK = torch.where(plan.keep_A.view(N, K), routing.weights_NK, torch.zeros_like(routing.weights_NK))
    out_ND = (w_NK.unsqueeze(-1) * y_NKD.float()).sum(dim=1).to(x_ND.dtype)
    if shared is not None:
        out_ND = out_ND + shared(x_ND)
    if valid_N is not None:
        out_ND = torch.where(valid_N.unsqueeze(1), out_ND, torch.zeros_like(out_ND))
    return MoEOutput(
        out_ND,
        load_balancing_loss(routing.probs_NE, routing.experts_NK, valid_N),
        router_z_loss(routing.logits_NE, valid_N),
        plan.routed_E,
        plan.dropped,
    )
