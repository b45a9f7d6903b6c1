"""Plain sequential read of built shards, for inspection and tests (training uses `nestor_ds.data`).

Shape legend: T frames, X, Y grid points, C channels.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nestor_ds.shards import schema
from nestor_ds.shards.tar import decode_sample, read_shard


def read_trajectories(shard_dir: str | Path, split: str) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Yield (fields [T, X, Y, C], meta) for every trajectory of `split`, in manifest and tar order.

    No WebDataset pipeline and no dtype conversion: what it returns is exactly what was stored.
    """
    if split not in schema.SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {schema.SPLITS}")
    manifest = schema.read_manifest(shard_dir)
    for path in schema.shard_files(manifest, shard_dir, split):
        for key, members in read_shard(path):
            yield decode_sample(key, members, str(path))
