"""What every token-MoE backend returns and promises (the contract in docs/ARCHITECTURE.md)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn


class MoEOutput(NamedTuple):
    out_ND: torch.Tensor  # output rows; padding rows (valid_N False) are zeros
    lb_loss: torch.Tensor  # scalar, E * sum_i f_i P_i over valid rows (0 when there are none)
    z_loss: torch.Tensor  # scalar, mean logsumexp(logits)^2 over valid rows (0 when there are none)
    tokens_per_expert_E: torch.Tensor  # long [E], routed assignments per expert, valid rows of this rank


class TokenMoE(nn.Module):
    """Base of the backends: forward(x_ND, valid_N) -> MoEOutput.

    Attributes every backend sets: num_experts, top_k, dim, hidden, router (TopKRouter-like with a
    `gate` Linear or DeepSpeed's `wg`), shared (SwiGLU or None).
    """

    num_experts: int
    top_k: int

    def forward(self, x_ND: torch.Tensor, valid_N: Optional[torch.Tensor] = None) -> MoEOutput:  # pragma: no cover
        raise NotImplementedError


def check_input(x_ND: torch.Tensor, valid_N: Optional[torch.Tensor], dim: int) -> None:
    """One-line errors naming the shape for wrong inputs (the model calls this deep inside)."""
    if x_ND.dim() != 2 or x_ND.shape[1] != dim:
        raise ValueError(f"TokenMoE: x_ND must be [N, {dim}], got {tuple(x_ND.shape)}")
    if valid_N is not None and (valid_N.dtype != torch.bool or tuple(valid_N.shape) != (x_ND.shape[0],)):
        raise ValueError(f"TokenMoE: valid_N must be a bool tensor [{x_ND.shape[0]}], "
                         f"got {valid_N.dtype} {tuple(valid_N.shape)}")
