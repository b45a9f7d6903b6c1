"""Expert-usage statistics: are the experts used, and do they specialise by physics?

Shape legend: B samples, K image top-k, M datasets, E_img image experts, E_tok token experts.

`ExpertUsage` accumulates integer routing counts over many steps (cheap: a few bincounts per block)
and turns them into a handful of scalars per MoE layer:

- load entropy  H(share) / log(n_experts), in [0, 1]: 1 = perfectly balanced, 0 = one expert gets all;
- largest / smallest share: collapse shows as max -> 1, dead experts as min -> 0;
- specialisation  I(dataset; image expert) in bits, from the dataset x expert count table: 0 when every
  dataset is routed alike, log2(M) when each dataset has its own expert(s). It is the answer to
  "do the experts specialise by physics" (a plug-in estimate: slightly positive even for random
  routing on few samples).

Counts, not probabilities, are accumulated so that ranks can be summed exactly with `reduce`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


def normalised_entropy(counts: np.ndarray) -> float:
    """Shannon entropy of the count distribution divided by its maximum log(n); 0 for n <= 1 or no counts."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    total = counts.sum()
    if total <= 0 or counts.size <= 1:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(counts.size))


def mutual_information_bits(counts_MEimg: np.ndarray) -> float:
    """I(row; column) in bits from a contingency table of counts: sum p(d,e) log2 p(d,e) / (p(d) p(e))."""
    joint = np.asarray(counts_MEimg, dtype=np.float64)
    total = joint.sum()
    if total <= 0:
        return 0.0
    p_de = joint / total
    p_d = p_de.sum(axis=1, keepdims=True)
    p_e = p_de.sum(axis=0, keepdims=True)
    nz = p_de > 0
    mi = (p_de[nz] * np.log2(p_de[nz] / (p_d @ p_e)[nz])).sum()
    return float(max(mi, 0.0))  # clamp round-off below zero


@dataclass
class _BlockCounts:
    """Routing counts of one NESTOR block."""

    dataset_expert_MEimg: np.ndarray  # image-level assignments per (dataset, image expert), k per sample
    token_EimgEtok: np.ndarray  # token-level assignments per (image expert, token expert)
    dropped_tokens: int = 0
    dropped_seen: bool = False  # whether the backend reported drops at all


@dataclass
class ExpertUsage:
    """Accumulates routing counts per block; see the module docstring for the statistics."""

    num_datasets: int
    ep_size: int = 1  # expert-parallel group size of the run: adds the busiest-rank metrics when > 1
    blocks: dict[int, _BlockCounts] = field(default_factory=dict)

    def reset(self) -> None:
        """Forget all counts (e.g. after each logging interval)."""
        self.blocks.clear()

    def update(
        self,
        block: int,
        dataset_id_B: torch.Tensor,
        image_topk_idx_BK: torch.Tensor,
        token_counts_EimgEtok: torch.Tensor,
        dropped_tokens: int | None = None,
    ) -> None:
        """Add one step of routing of block `block` (tensors straight from `BlockRouting`)."""
        dataset_B = torch.as_tensor(dataset_id_B).detach().long().cpu().reshape(-1)
        topk_BK = torch.as_tensor(image_topk_idx_BK).detach().long().cpu()
        if topk_BK.dim() == 1:
            topk_BK = topk_BK[:, None]
        if topk_BK.shape[0] != dataset_B.shape[0]:
            raise ValueError(
                f"block {block}: image_topk_idx has {topk_BK.shape[0]} rows but dataset_id has "
                f"{dataset_B.shape[0]} samples"
            )
        token_EimgEtok = torch.as_tensor(token_counts_EimgEtok).detach().cpu().to(torch.float64).numpy()
        num_image_experts = token_EimgEtok.shape[0]
        counts = self.blocks.get(block)
        if counts is None:
            counts = _BlockCounts(
                dataset_expert_MEimg=np.zeros((self.num_datasets, num_image_experts), np.float64),
                token_EimgEtok=np.zeros_like(token_EimgEtok),
            )
            self.blocks[block] = counts
        if token_EimgEtok.shape != counts.token_EimgEtok.shape:
            raise ValueError(
                f"block {block}: token_counts shape {tuple(token_EimgEtok.shape)} differs from earlier "
                f"{tuple(counts.token_EimgEtok.shape)}"
            )
        flat = dataset_B[:, None].expand_as(topk_BK) * num_image_experts + topk_BK
        counts.dataset_expert_MEimg += (
            torch.bincount(flat.reshape(-1), minlength=self.num_datasets * num_image_experts)
            .reshape(self.num_datasets, num_image_experts)
            .numpy()
        )
        counts.token_EimgEtok += token_EimgEtok
        if dropped_tokens is not None:
            counts.dropped_tokens += int(dropped_tokens)
            counts.dropped_seen = True

    def update_from_routing(self, routing: list, dataset_id_B: torch.Tensor) -> None:
        """Add a whole model step: `routing` is the model's list of `BlockRouting`, one per block."""
        for block, r in enumerate(routing):
            self.update(block, dataset_id_B, r.image_topk_idx, r.token_counts, getattr(r, "dropped_tokens", None))

    def counts_matrix(self, block: int) -> np.ndarray:
        """Dataset x image-expert assignment counts `[M, E_img]` (input of the heat map)."""
        return self.blocks[block].dataset_expert_MEimg.copy()

    def token_counts(self, block: int) -> np.ndarray:
        """Image-expert x token-expert assignment counts `[E_img, E_tok]`."""
        return self.blocks[block].token_EimgEtok.copy()

    def specialisation(self, block: int) -> float:
        """Mutual information between dataset and routed image expert, in bits."""
        return mutual_information_bits(self.blocks[block].dataset_expert_MEimg)

    def summary(self, dataset_names: list[str]) -> dict[str, dict]:
        """Per block (JSON keys): the dataset x image-expert counts, their mutual information and the dataset
        names of the rows; what run_summary.json and expert_usage.jsonl keep."""
        return {
            str(b): {
                "dataset_expert": self.counts_matrix(b).tolist(),
                "mi_bits": self.specialisation(b),
                "datasets": list(dataset_names),
            }
            for b in sorted(self.blocks)
        }

    def metrics(self, prefix: str = "experts") -> dict[str, float]:
        """Flat MLflow metrics `<prefix>/block<i>/...` for every block seen (names in docs/review_runs.md)."""
        out: dict[str, float] = {}
        for block in sorted(self.blocks):
            c = self.blocks[block]
            image_Eimg = c.dataset_expert_MEimg.sum(axis=0)
            base = f"{prefix}/block{block}"
            if image_Eimg.sum() > 0:
                share = image_Eimg / image_Eimg.sum()
                out[f"{base}/image_entropy"] = normalised_entropy(image_Eimg)
                out[f"{base}/image_max_share"] = float(share.max())
                out[f"{base}/image_min_share"] = float(share.min())
                out[f"{base}/specialisation_mi"] = self.specialisation(block)
            for expert, tokens_Etok in enumerate(c.token_EimgEtok):
                if tokens_Etok.sum() <= 0:
                    continue  # image expert received no samples: its token layer has no statistics
                share = tokens_Etok / tokens_Etok.sum()
                out[f"{base}/expert{expert}/token_entropy"] = normalised_entropy(tokens_Etok)
                out[f"{base}/expert{expert}/token_max_share"] = float(share.max())
                out[f"{base}/expert{expert}/token_min_share"] = float(share.min())
            if c.dropped_seen:
                out[f"{base}/dropped_tokens"] = float(c.dropped_tokens)
        out.update(self._rank_balance(prefix))
        return out

    def _rank_balance(self, prefix: str) -> dict[str, float]:
        """Under expert parallelism: the busiest rank's share of each token MoE's assignments over the interval, times
        ep_size (1.0 = every rank's experts got the same), averaged over the token MoEs weighted by assignments; and
        the same for the best re-ordering of the experts on these counts (`nestor_ds.moe.placement`, what
        nestor_ds.routing.place would reach). Interval totals: the static skew that placement can remove; a single
        call's imbalance also has sampling noise on top (nestor_ds.routing.profile)."""
        from nestor_ds.moe.placement import balanced_order, rank_loads

        P = self.ep_size
        if P <= 1:
            return {}
        now = placed = weight = 0.0
        for c in self.blocks.values():
            for tokens_Etok in c.token_EimgEtok:
                total = float(tokens_Etok.sum())
                if total <= 0 or tokens_Etok.size % P:
                    continue
                load = tokens_Etok.tolist()
                now += max(rank_loads(load, range(len(load)), P)) * P
                placed += max(rank_loads(load, balanced_order(load, P), P)) * P
                weight += total
        if weight <= 0:
            return {}
        return {
            f"{prefix}/token_ep_busiest_rank": now / weight,
            f"{prefix}/token_ep_busiest_rank_placed": placed / weight,
        }

    def reduce(self, group=None) -> None:
        """Sum counts over the ranks of `group` (no-op without an initialised process group).

        Every rank must have updated the same blocks (true when all ranks run the same model).
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        blocks = sorted(self.blocks)
        parts = []
        for b in blocks:
            c = self.blocks[b]
            parts += [
                c.dataset_expert_MEimg.ravel(),
                c.token_EimgEtok.ravel(),
                np.array([c.dropped_tokens, c.dropped_seen]),
            ]
        if not parts:
            return
        flat = torch.from_numpy(np.concatenate(parts).astype(np.float64))
        from nestor_ds.collectives import all_reduce_host  # NCCL needs CUDA tensors, gloo CPU ones

        all_reduce_host(flat, torch.distributed.ReduceOp.SUM, group=group)
        flat_np = flat.numpy()
        pos = 0
        for b in blocks:
            c = self.blocks[b]
            for name in ("dataset_expert_MEimg", "token_EimgEtok"):
                arr = getattr(c, name)
                arr[...] = flat_np[pos : pos + arr.size].reshape(arr.shape)
                pos += arr.size
            c.dropped_tokens = int(flat_np[pos])
            c.dropped_seen = bool(flat_np[pos + 1] > 0)
            pos += 2
