"""Row permutations shared by both MoE levels (token Sub-MoE and image MoE): dispatch, gather, and the
capacity plan of static routing.

Shape legend: N rows (tokens or samples), K routes per row, A = N*K assignments, E experts, Q capacity
(rows per expert), S rows of an expert-major buffer, D width (any trailing size), V valid rows (N less padding).

Dispatch and combine are written as gathers in both directions (`dispatch_rows`, `gather_rows`): the
backward of a plain index_select is a scatter-add, slower than a gather on CPU (timings: docs/benchmarks.md,
"Model step").

Static routing (`plan_capacity`) gives every expert a fixed buffer of Q rows. Everything is computed on the
device with shapes that depend only on (N, K, E, Q): no `.item()`, `.tolist()`, `nonzero` or boolean-mask
indexing, so torch.compile traces it without graph breaks and CUDA graphs can capture it. Assignments that
do not fit (and assignments of padding rows) go to one extra "drop" row S = E*Q at the end of the buffer,
whose output is never used (its combine weight is zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class _Dispatch(torch.autograd.Function):
    """x_SD[slot_VK[v, k]] = x_VD[v], other rows 0. Backward: grad_v = sum_k grad_S[slot_vk] (a gather).
    Slots must be distinct except the drop row of static routing, whose content and gradient are unused."""

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
        grad_S = grad_I.new_zeros(ctx.rows, *grad_I.shape[index_I.dim() :])
        grad_S[index_I] = grad_I
        return grad_S, None


def dispatch_rows(x_VD: torch.Tensor, slot_VK: torch.Tensor, rows: int) -> torch.Tensor:
    """[V, D] -> [rows, D]: row v copied to its K slots, every other row zero."""
    return _Dispatch.apply(x_VD, slot_VK, rows)


def gather_rows(x_S: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x_S[index] for distinct indices (any index shape); the backward copies rows instead of adding.
    Static routing's drop row may repeat: it must be a row whose gradient is discarded (a constant)."""
    return _GatherRows.apply(x_S, index)


def sorted_position(key_A: torch.Tensor) -> torch.Tensor:
    """rank_A (long): where each assignment lands in the stable ascending sort of key_A (argsort's inverse
    permutation), i.e. its row in a buffer sorted by key (by expert, rows in order inside an expert)."""
    order_A = key_A.argsort(stable=True)
    return torch.empty_like(order_A).scatter_(0, order_A, torch.arange(key_A.numel(), device=key_A.device))


def count_per_expert(expert_A: torch.Tensor, num_experts: int, valid_A: torch.Tensor | None = None) -> torch.Tensor:
    """counts_E (long): assignments per expert, valid ones only. A scatter-add into a fixed [E] buffer (bincount's
    output size depends on the data, which torch.compile cannot trace without a graph break)."""
    ones_A = torch.ones_like(expert_A) if valid_A is None else valid_A.to(expert_A.dtype)
    return expert_A.new_zeros(num_experts).scatter_add_(0, expert_A, ones_A)


def capacity(factor: float, rows: int, top_k: int, num_experts: int, multiple: int = 1) -> int:
    """Rows per expert Q = ceil(factor * rows * K / E), rounded up to `multiple`, never above `rows` (a row goes to
    an expert at most once, so Q = rows can never overflow) and never 0 when rows > 0."""
    c = math.ceil(factor * rows * top_k / num_experts)
    c = math.ceil(c / multiple) * multiple
    return max(min(c, rows), min(rows, 1))


@dataclass
class CapacityPlan:
    """Where each assignment sits in the static expert-major buffer [E*Q + 1, ...] (last row: drop row)."""

    slot_A: torch.Tensor  # long [A]: e*Q + position inside expert e, or E*Q when dropped / padding
    keep_A: torch.Tensor  # bool [A]: the assignment got a row (valid and within capacity)
    kept_E: torch.Tensor  # long [E]: rows used in each expert's buffer (<= Q)
    routed_E: torch.Tensor  # long [E]: valid assignments per expert before capacity (the dropless counts)
    dropped: torch.Tensor  # long scalar: valid assignments over capacity
    capacity: int  # Q
    rows: int  # E*Q + 1


def plan_capacity(
    expert_A: torch.Tensor, weight_A: torch.Tensor, valid_A: torch.Tensor | None, num_experts: int, cap: int
) -> CapacityPlan:
    """Static layout: inside each expert, assignments ordered by weight, highest first (ties: row order), the
    first Q kept; padding assignments (valid_A False) are absent. One sort on (expert, -weight), all on device.
    Callers pass the router probability of the chosen expert as weight (GShard/Switch's priority): top-1's
    renormalised weight is always 1 and would rank by row order instead.

    The sort key e*2 + (1 - w) in float64 orders by expert, then by descending weight w in [0, 1]; invalid
    assignments use the sentinel expert E so they sort after every real one and never take a row.
    """
    E = num_experts
    expert_eff_A = expert_A if valid_A is None else torch.where(valid_A, expert_A, torch.full_like(expert_A, E))
    key_A = expert_eff_A.double() * 2.0 + (1.0 - weight_A.detach().double())
    rank_A = sorted_position(key_A)
    counts_E1 = count_per_expert(expert_eff_A, E + 1)
    start_E1 = counts_E1.cumsum(0) - counts_E1
    pos_A = rank_A - start_E1.gather(0, expert_eff_A)
    keep_A = pos_A < cap
    if valid_A is not None:
        keep_A = keep_A & valid_A
    slot_A = torch.where(keep_A, expert_A * cap + pos_A, torch.full_like(expert_A, E * cap))
    routed_E = counts_E1[:E]
    kept_E = routed_E.clamp(max=cap)
    return CapacityPlan(slot_A, keep_A, kept_E, routed_E, routed_E.sum() - kept_E.sum(), cap, E * cap + 1)


def plan_static(
    experts_NK: torch.Tensor, probs_NE: torch.Tensor, valid_N: torch.Tensor | None, num_experts: int, capacity_rows: int
) -> CapacityPlan:
    """The capacity plan of one static-routing call (both the local and the expert-parallel backend): the N*K
    assignments of the valid rows, each expert keeping its `capacity_rows` highest router probabilities."""
    N, K = experts_NK.shape
    valid_A = None if valid_N is None else valid_N.unsqueeze(1).expand(N, K).reshape(-1)
    prob_NK = probs_NE.gather(-1, experts_NK)  # drop priority (lowest first)
    return plan_capacity(experts_NK.reshape(-1), prob_NK.reshape(-1), valid_A, num_experts, capacity_rows)
