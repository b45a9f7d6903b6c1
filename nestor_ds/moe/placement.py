"""Expert placement for expert parallelism: which token experts share a rank.

Shape legend: E token experts, P = ep_size ranks of an expert-parallel group, E_l = E / P experts per rank.

Under expert parallelism rank p holds experts [p*E_l, (p+1)*E_l) of every token MoE, and each exchange waits for
the rank whose experts received the most rows. A trained router is not uniform (docs/scaling.md, "What a trained
model's routing costs"): when two popular experts sit on the same rank, that rank is the busiest at almost every
call. The experts of a token MoE are interchangeable up to their index: permuting the router's rows and the expert
weights together gives the same function, so a model can be re-ordered so that each rank's experts carry an equal
share of the load, with no change to any output. `balanced_order` chooses the order from measured loads
(`nestor_ds.routing.place` measures them on the model's own training stream); `reorder_local_state` applies it to a
state dict in the local layout: weights for an export, or weights and Adam's moments when a run resumes with
`train.expert_order` (`nestor_ds.checkpoint.elastic`). An expert-order file (`write_expert_order`) records the orders,
the ep_size they balance and the checkpoint step they were computed from.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nestor_ds.errors import UserError
from nestor_ds.files import write_atomic

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


# the tensors of a LocalTokenMoE (local layout) whose first dimension is the expert
EXPERT_TENSORS = ("router.gate.weight", "experts.w1_EFD", "experts.w3_EFD", "experts.w2_EDF")
ORDER_FORMAT = "nestor-ds-expert-order"


def reorder_local_state(
    state: Mapping[str, torch.Tensor], orders: Mapping[str, Sequence[int]]
) -> dict[str, torch.Tensor]:
    """`state` (local layout: weights, or an optimizer moment per weight) with the token experts of every MoE
    `prefix` in `orders` re-ordered: new expert i is old expert orders[prefix][i]. Other tensors are passed as they
    are. Raises ValueError naming the prefix when a tensor is missing or an order is not a permutation."""
    out = dict(state)
    for prefix, order in orders.items():
        for name in EXPERT_TENSORS:
            tensor = state.get(prefix + name)
            if tensor is None:
                raise UserError(f"expert order for {prefix!r}: the model has no tensor {prefix + name}")
            if sorted(order) != list(range(tensor.shape[0])):
                raise UserError(
                    f"expert order for {prefix!r}: {list(order)} is not an order of {tensor.shape[0]} experts"
                )
            out[prefix + name] = tensor.index_select(0, torch.as_tensor(list(order), device=tensor.device))
    return out


@dataclass(frozen=True)
class ExpertOrder:
    """An expert-order file: per token MoE (state-dict prefix) the order, the ep_size it balances, and the step of the
    checkpoint it was computed from (None: from an export)."""

    ep_size: int
    checkpoint_step: int | None
    orders: dict[str, list[int]]


def write_expert_order(path: str | Path, order: ExpertOrder) -> Path:
    """Write `order` as JSON (atomically: a resume never reads half a file); the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": ORDER_FORMAT, "format_version": 1, "ep_size": order.ep_size}
    body.update({"checkpoint_step": order.checkpoint_step, "orders": order.orders})
    return write_atomic(path, json.dumps(body, indent=1) + "\n")


def read_expert_order(path: str | Path) -> ExpertOrder:
    """An expert-order file written by `nestor_ds.routing.place --order-out`; ValueError in one line if not one."""
    try:
        body = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable expert-order file ({err})") from err
    if not isinstance(body, dict) or body.get("format") != ORDER_FORMAT:
        raise UserError(f"{path}: not an expert-order file (format {ORDER_FORMAT!r} expected)")
    orders = body.get("orders")
    if not isinstance(orders, dict) or not all(
        isinstance(o, list) and all(isinstance(i, int) for i in o) for o in orders.values()
    ):
        raise UserError(f"{path}: 'orders' must map token-MoE prefixes to lists of expert indices")
    step = body.get("checkpoint_step")
    return ExpertOrder(int(body.get("ep_size", 1)), None if step is None else int(step), orders)
