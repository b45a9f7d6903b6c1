"""Top-k token router, its auxiliary losses and expert-load statistics.

Shape legend: N tokens (rows), D model width, E routed experts, K experts per token.

Semantics match DeepSpeed's top-2 / top-k gate so that every backend routes identically:
logits = x W_g^T in fp32 (no bias), p = softmax(logits), the K largest p are kept and renormalised
to sum to one. Losses are computed over valid rows only: callers pass rows already filtered (dropless)
or a valid_N mask (static routing, fixed shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """The routing decision for N (valid) rows."""

    logits_NE: torch.Tensor  # fp32 router logits (after training noise, if any)
    probs_NE: torch.Tensor  # fp32 softmax(logits)
    weights_NK: torch.Tensor  # fp32 top-k probabilities renormalised over the K selected experts
    experts_NK: torch.Tensor  # long, selected expert ids, best first


def route_from_logits(logits_NE: torch.Tensor, top_k: int) -> Routing:
    """Softmax in fp32, top-k, renormalise over the k (DeepSpeed's top-2/top-k gate does the same)."""
    logits_NE = logits_NE.float()
    probs_NE = logits_NE.softmax(dim=-1)
    experts_NK = probs_NE.topk(top_k, dim=-1).indices
    # p_i / sum_k p_k over the selected experts == softmax of the selected logits. Written this way the
    # unselected logits get an exactly zero gradient (the quotient form leaves ~1e-9 round-off there, which
    # Adam's normalisation would turn into full-size updates of unused router rows).
    weights_NK = logits_NE.gather(-1, experts_NK).softmax(dim=-1)
    return Routing(logits_NE, probs_NE, weights_NK, experts_NK)


class FP32Linear(nn.Linear):
    """A Linear computed in fp32 whatever the weights' and inputs' dtype: routing decisions must not flip under
    bf16. The cast happens inside this module's own forward, so ZeRO-3 gathers (and re-gathers for backward)
    its partitioned weights as for any module call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


class TopKRouter(nn.Module):
    """Linear(D -> E, no bias) gate; picks K experts per token."""

    def __init__(self, dim: int, num_experts: int, top_k: int, noise_std: float = 0.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_std = noise_std
        self.gate = FP32Linear(dim, num_experts, bias=False)  # default (Kaiming-uniform) init

    def forward(self, x_ND: torch.Tensor) -> Routing:
        logits_NE = self.gate(x_ND)
        if self.training and self.noise_std > 0:
            logits_NE = logits_NE + self.noise_std * torch.randn_like(logits_NE)
        return route_from_logits(logits_NE, self.top_k)


def tokens_per_expert(experts_NK: torch.Tensor, num_experts: int, valid_N: torch.Tensor | None = None) -> torch.Tensor:
    """counts_E (long): how many of the K*N assignments (of valid rows, when valid_N is given) went to each expert."""
    from .dispatch import count_per_expert

    valid_A = None if valid_N is None else valid_N.unsqueeze(1).expand_as(experts_NK).reshape(-1)
    return count_per_expert(experts_NK.reshape(-1), num_experts, valid_A)


def load_balancing_loss(
    probs_NE: torch.Tensor, experts_NK: torch.Tensor, valid_N: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/GShard balance loss lb = E * sum_i f_i * P_i.

    f_i: share of the K*N assignments routed to expert i (no gradient); P_i: mean router probability
    of expert i (carries the gradient). Equals 1 for perfectly uniform routing. Zero for no (valid) row.
    valid_N (bool [N]) restricts both means to valid rows with masks instead of indexing (static shapes).
    """
    num_tokens, num_experts = probs_NE.shape
    if valid_N is None:
        if num_tokens == 0:
            return probs_NE.sum() * 0.0  # keeps the graph connected, no NaN from 0/0
        f_E = tokens_per_expert(experts_NK, num_experts).to(probs_NE.dtype) / experts_NK.numel()
        P_E = probs_NE.mean(dim=0)
        return num_experts * (f_E * P_E).sum()
    rows = valid_N.sum().to(probs_NE.dtype).clamp(min=1.0)
    f_E = tokens_per_expert(experts_NK, num_experts, valid_N).to(probs_NE.dtype) / (rows * experts_NK.shape[1])
    P_E = torch.where(valid_N.unsqueeze(1), probs_NE, torch.zeros_like(probs_NE)).sum(dim=0) / rows
    return num_experts * (f_E * P_E).sum()


def router_z_loss(logits_NE: torch.Tensor, valid_N: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss mean_n logsumexp(logits_n)^2: keeps logits small. Zero for no (valid) row."""
    if valid_N is None:
        if logits_NE.shape[0] == 0:
            return logits_NE.sum() * 0.0
        return logits_NE.float().logsumexp(dim=-1).square().mean()
    z_N = logits_NE.float().logsumexp(dim=-1).square()
    return torch.where(valid_N, z_N, torch.zeros_like(z_N)).sum() / valid_N.sum().float().clamp(min=1.0)


def expert_load_stats(counts_E: torch.Tensor) -> dict[str, float]:
    """Load statistics of one routing: entropy of the expert shares (nats and normalised to [0, 1]),
    and the largest and smallest share. Uniform load: entropy_norm 1, max_share = min_share = 1/E."""
    counts_E = counts_E.detach().double().cpu()
    num_experts = counts_E.numel()
    total = counts_E.sum().item()
    if total == 0:
        return {"entropy": 0.0, "entropy_norm": 0.0, "max_share": 0.0, "min_share": 0.0}
    share_E = counts_E / total
    entropy = -(share_E * share_E.clamp(min=1e-300).log()).sum().item()
    return {
        "entropy": entropy,
        "entropy_norm": entropy / math.log(num_experts) if num_experts > 1 else 1.0,
        "max_share": share_E.max().item(),
        "min_share": share_E.min().item(),
    }
