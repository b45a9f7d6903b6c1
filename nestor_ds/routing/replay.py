"""Routing counts replayed for expert-parallel groups: what a model's own routing costs at ep_size P.

Why apart from the recording: the replay is plain arithmetic on counts (numpy only), checked by hand in
tests/test_routing_profile.py, and shared by ``profile.py`` (the report) and ``place.py`` (before / after placing).
What it computes is ``QUANTITIES`` (also the end of ``python -m nestor_ds.routing.profile --help``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nestor_ds.errors import UserError

QUANTITIES = """\
Per P (groups of P consecutive ranks):
  expert_rows_ratio   token-expert rows on the slowest rank, ep 1 over ep P, per step: the cap routing alone puts on
                      tools/bench_moe_ep.py's `ratio_vs_local_ep1` (1.0 = perfectly balanced, exchange not counted)
  body_rows_ratio     the same for the image experts' attention/norm rows (padding included under ep P)
  rank_imbalance      rows received by the busiest rank of a call over the group's mean, pooled over calls (>= 1);
                      `tools.bench_moe_ep --profile` builds a 2-rank input with this imbalance and padding fraction
  padding_fraction    share of the token-MoE rows that are padding
Step times are modelled as rows: ep 1 syncs once per step (gradients), so a step costs the largest rank's sum over
calls; ep P syncs at every call, so a step costs the sum over calls of the busiest rank's rows.
"""


@dataclass
class Calls:
    """Routing counts of `steps` steps on `ranks` ranks: image_SRBE [steps, ranks, blocks, E_img] samples per image
    expert, token_SRBET [.., E_img, E_tok] token assignments per token expert inside each image expert."""

    image_SRBE: np.ndarray
    token_SRBET: np.ndarray


def replay(calls: Calls, ep: int) -> dict[str, float]:
    """``QUANTITIES`` for expert-parallel groups of `ep` consecutive ranks; `one_exchange_per_block`
    gives the first two for what dropless training runs (one token exchange serves all image experts of a block)."""
    S, R, B, E_img = calls.image_SRBE.shape
    E_tok = calls.token_SRBET.shape[-1]
    if R % ep or E_tok % ep:
        raise UserError(f"ep {ep} must divide the ranks ({R}) and the token experts ({E_tok})")
    G = R // ep
    image_SGPC = calls.image_SRBE.reshape(S, G, ep, B * E_img).astype(np.float64)  # C = calls per step
    token_SGPCT = calls.token_SRBET.reshape(S, G, ep, B * E_img, E_tok).astype(np.float64)
    # rows the experts of group rank q receive: every source p's assignments to q's experts
    received_SGCQ = token_SGPCT.sum(axis=2).reshape(S, G, B * E_img, ep, E_tok // ep).sum(axis=-1)
    sent_SGPC = token_SGPCT.sum(axis=-1)  # what each rank computes itself at ep 1
    size_SGC = image_SGPC.max(axis=2)  # samples every rank of the group calls the image expert with

    expert_ep1 = sent_SGPC.sum(axis=-1).reshape(S, R).max(axis=1)
    expert_epP = received_SGCQ.max(axis=-1).sum(axis=-1).max(axis=1)
    body_ep1 = image_SGPC.sum(axis=-1).reshape(S, R).max(axis=1)
    body_epP = size_SGC.sum(axis=-1).max(axis=1)
    busiest, mean = received_SGCQ.max(axis=-1).sum(), received_SGCQ.mean(axis=-1).sum()
    # one exchange per block for all its image experts: each rank runs all its image-expert bodies first
    received_SGBQ = received_SGCQ.reshape(S, G, B, E_img, ep).sum(axis=3)
    pooled_expert_epP = received_SGBQ.max(axis=-1).sum(axis=-1).max(axis=1)
    pooled_body_epP = image_SGPC.reshape(S, G, ep, B, E_img).sum(axis=-1).max(axis=2).sum(axis=-1).max(axis=1)
    padded = (size_SGC[:, :, None, :] - image_SGPC).sum()
    return {
        "expert_rows_ratio": float(expert_ep1.sum() / max(expert_epP.sum(), 1.0)),
        "body_rows_ratio": float(body_ep1.sum() / max(body_epP.sum(), 1.0)),
        "rank_imbalance": float(busiest / mean) if mean > 0 else 1.0,
        "padding_fraction": float(padded / max(size_SGC.sum() * ep, 1.0)),
        "one_exchange_per_block": {
            "expert_rows_ratio": float(expert_ep1.sum() / max(pooled_expert_epP.sum(), 1.0)),
            "body_rows_ratio": float(body_ep1.sum() / max(pooled_body_epP.sum(), 1.0)),
        },
    }


def uniform_calls(
    shape: tuple[int, ...], micro_batch: int, tokens: int, image_k: int, token_k: int, seed: int
) -> Calls:
    """Counts of a router that picks its top-k experts uniformly at random (image and token level), for the same
    steps, ranks, blocks, micro-batch and tokens per sample as a recording of `shape` [S, R, B, E_img, E_tok]: the
    imbalance that sampling alone causes, which no load-balancing loss removes at this batch size."""
    S, R, B, E_img, E_tok = shape
    rng = np.random.default_rng(seed)

    def topk_counts(n: int, experts: int, k: int) -> np.ndarray:
        picks = np.argpartition(rng.random((n, experts)), k - 1, axis=1)[:, :k]  # k distinct experts per row
        return np.bincount(picks.ravel(), minlength=experts)

    image = np.zeros((S, R, B, E_img), dtype=np.int64)
    token = np.zeros((S, R, B, E_img, E_tok), dtype=np.int64)
    for idx in np.ndindex(S, R, B):
        image[idx] = topk_counts(micro_batch, E_img, image_k)
        for e in range(E_img):
            token[idx + (e,)] = topk_counts(int(image[idx + (e,)]) * tokens, E_tok, token_k)
    return Calls(image, token)
