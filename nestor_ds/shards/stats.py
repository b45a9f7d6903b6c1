"""Per-channel training statistics of a shard set, mergeable across shards and workers.

Each build worker returns the partial statistics of its shard; they are merged in shard order with Chan's
parallel formula in float64, so the manifest's stats do not depend on the number of workers. `verify`
recomputes them from the decoded samples the same way.

Shape legend: T frames, X, Y grid points, C channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ChannelStats:
    """Streaming per-channel count/mean/M2/min/max in float64 (Chan et al. parallel merge)."""

    n: int
    mean: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @classmethod
    def empty(cls, c: int) -> ChannelStats:
        return cls(0, np.zeros(c), np.zeros(c), np.full(c, np.inf), np.full(c, -np.inf))

    @classmethod
    def of(cls, fields: np.ndarray) -> ChannelStats:
        """Statistics of one trajectory [T, X, Y, C] (every frame and grid point is one value per channel)."""
        values = fields.reshape(-1, fields.shape[-1])  # [T*X*Y, C]
        min_C, max_C = values.min(axis=0).astype(np.float64), values.max(axis=0).astype(np.float64)  # exact
        values = values.astype(np.float64)
        mean_C = values.mean(axis=0)
        dev = values - mean_C
        return cls(values.shape[0], mean_C, np.einsum("pc,pc->c", dev, dev), min_C, max_C)

    def merge(self, other: ChannelStats) -> ChannelStats:
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / n)
        return ChannelStats(n, mean, m2, np.minimum(self.min, other.min), np.maximum(self.max, other.max))

    def as_dict(self) -> dict[str, list[float]]:
        """Population statistics (ddof=0), as numpy's mean/std/min/max over (T, X, Y, samples)."""
        return {"mean": self.mean.tolist(), "std": np.sqrt(self.m2 / max(self.n, 1)).tolist(),
                "min": self.min.tolist(), "max": self.max.tolist()}
