"""Expert placement for expert parallelism: which token experts share a rank.

Shape legend: E token experts, P = ep_size ranks of an expert-parallel group, E_l = E / P experts per rank.

Under expert parallelism rank p holds experts [p*E_l, (p+1)*E_l) of every token MoE, and each exchange waits for
the rank whose experts received the most rows. A trained router is not uniform (docs/scaling.md, "What a trained
model's routing costs"): when two popular experts sit on the same rank, that rank is the busiest at almost every
call. The experts of a token MoE are interchangeable up to their index: permuting the router's rows and the expert
weights together gives the same function, so a model can be re-ordered so that each rank's experts carry an equal
share of the load, with no change to any output. `balanced_order` chooses the order from measured loads
(`tools/place_experts.py` measures them on the model's own training stream); `place_token_experts` applies it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import torch

from .local import LocalTokenMoE

_EXACT_LIMIT = 50_000  # set partitions searched exhaustively (E 12 at P 2: 462; E 8 at P 4: 105; E 16 at P 4: 2.6M)


def rank_loads(load_E: Sequence[float], order: Sequence[int], ep: int) -> list[float]:
    """Load of each of the P ranks when new expert i is old expert order[i] (rank p holds new [p*E_l, (p+1)*E_l))."""
    per_rank = len(order) // ep
    return [sum(float(load_E[e]) for e in order[p * per_rank : (p + 1) * per_rank]) for p in range(ep)]


def balanced_order(load_E: Sequence[float], ep: int) -> list[int]:
    """An order of the E experts (new i = old order[i]) whose busiest rank carries the least load.

    Exact (every split of the experts into P equal groups) while there are at most 50,000 splits, else largest load
    first onto the least-loaded rank with room, then swaps that lower the busiest rank. The identity is kept unless
    an order is strictly better, so a balanced model is left as it is; experts keep their relative order inside a
    rank."""
    E = len(load_E)
    if ep < 1 or E % ep:
        raise ValueError(f"balanced_order: ep_size {ep} must be >= 1 and divide the {E} experts")
    identity = list(range(E))
    if ep == 1:
        return identity
    splits = math.factorial(E) // (math.factorial(E // ep) ** ep * math.factorial(ep))
    groups = _best_split(load_E, ep) if splits <= _EXACT_LIMIT else _greedy_split(load_E, ep)
    order = [e for g in sorted(sorted(g) for g in groups) for e in g]
    if max(rank_loads(load_E, order, ep)) < max(rank_loads(load_E, identity, ep)):
        return order
    return identity


def _splits(experts: list[int], size: int) -> Iterator[list[tuple[int, ...]]]:
    """Every split of `experts` into groups of `size` (the first remaining expert opens the next group: no split
    is listed twice)."""
    if not experts:
        yield []
        return
    first, rest = experts[0], experts[1:]
    for mates in itertools.combinations(rest, size - 1):
        group = (first, *mates)
        remaining = [e for e in rest if e not in mates]
        for tail in _splits(remaining, size):
            yield [group, *tail]


def _best_split(load_E: Sequence[float], ep: int) -> list[tuple[int, ...]]:
    size = len(load_E) // ep
    return min(_splits(list(range(len(load_E))), size), key=lambda gs: max(sum(load_E[e] for e in g) for g in gs))


def _greedy_split(load_E: Sequence[float], ep: int) -> list[list[int]]:
    size = len(load_E) // ep
    groups: list[list[int]] = [[] for _ in range(ep)]
    for e in sorted(range(len(load_E)), key=lambda e: -load_E[e]):
        open_groups = [g for g in groups if len(g) < size]
        min(open_groups, key=lambda g: sum(load_E[x] for x in g)).append(e)
    total = [sum(load_E[x] for x in g) for g in groups]
    improved = True
    while improved:  # swap one expert of the busiest rank with one of another rank while that lowers the busiest
        improved = False
        hi = max(range(ep), key=total.__getitem__)
        for lo, a, b in itertools.product(range(ep), range(size), range(size)):
            delta = load_E[groups[hi][a]] - load_E[groups[lo][b]]
            if lo != hi and delta > 0 and total[lo] + delta < total[hi]:
                groups[hi][a], groups[lo][b] = groups[lo][b], groups[hi][a]
                total[hi], total[lo] = total[hi] - delta, total[lo] + delta
                improved = True
                break
    return groups


@torch.no_grad()
def place_token_experts(moe: LocalTokenMoE, order: Sequence[int]) -> None:
    """Re-order moe's experts in place: new expert i is old expert order[i] (router row and the three weights).
    The function the module computes is unchanged; its per-expert counts come out in the new order."""
    E = moe.num_experts
    if sorted(order) != list(range(E)):
        raise ValueError(f"place_token_experts: {list(order)} is not an order of the {E} experts")
    index = torch.as_tensor(list(order), dtype=torch.long)
    for weight in (moe.router.gate.weight, moe.experts.w1_EFD, moe.experts.w3_EFD, moe.experts.w2_EDF):
        weight.copy_(weight.index_select(0, index.to(weight.device)))
