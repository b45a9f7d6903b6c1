"""Plain sequential read of built shards, for inspection and tests (training uses `stream.py`)."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nestor_ds.shards import schema
from nestor_ds.shards.schema import DataFormatError


def read_trajectories(shard_dir: str | Path, split: str) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Yield (fields [T, X, Y, C], meta) for every trajectory of `split`, in manifest and tar order.

    Uses only `tarfile` (no WebDataset pipeline), so what it returns is exactly what was stored.
    """
    if split not in schema.SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {schema.SPLITS}")
    manifest = schema.read_manifest(shard_dir)
    for path in schema.shard_files(manifest, shard_dir, split):
        with tarfile.open(path, "r") as tar:
            pending: dict[str, dict[str, bytes]] = {}
            for member in tar:
                key, _, ext = member.name.partition(".")
                parts = pending.setdefault(key, {})
                parts[ext] = tar.extractfile(member).read()
                if set(parts) >= set(schema.SAMPLE_EXTS):
                    del pending[key]
                    yield schema.decode_fields(parts[schema.FIELDS_EXT]), schema.decode_meta(parts[schema.META_EXT])
            if pending:
                raise DataFormatError(path, f"incomplete samples {sorted(pending)[:3]}: "
                                            f"expected members {list(schema.SAMPLE_EXTS)}")
