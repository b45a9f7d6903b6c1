"""Verify a built shard directory against its manifest (`python -m nestor_ds.shards --verify DIR`).

Reads every shard with the same tar reader and member decoding as the training stream (tar.py, schema.py),
so a directory that verifies is one the stream can read. No torch and no h5py: it needs only the shards.

Shape legend: T frames, X, Y grid points, C channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nestor_ds.shards import schema
from nestor_ds.shards.schema import DataFormatError
from nestor_ds.shards.stats import ChannelStats
from nestor_ds.shards.tar import decode_sample, read_shard


def verify(shard_dir: str | Path, progress: bool | None = None) -> dict[str, Any]:
    """Check a built directory against its manifest; raises DataFormatError at the first bad shard.

    Checks: manifest structure, no unlisted shard files, every shard's sha256 and sample count,
    every sample's members, key, fields dtype/shape/finiteness, meta keys and channels, and the
    training statistics recomputed from the decoded samples.
    """
    shard_dir = Path(shard_dir)
    manifest = schema.read_manifest(shard_dir)
    listed = {s["file"] for split in schema.SPLITS for s in manifest["splits"][split]["shards"]}
    for p in sorted(shard_dir.glob("*.tar")):
        if p.name not in listed:
            raise DataFormatError(p, "shard file not listed in manifest.json")
    shape, dtype = tuple(manifest["shape"]), np.dtype(manifest["dtype"])
    total = sum(manifest["splits"][s]["count"] for s in schema.SPLITS)
    stats = ChannelStats.empty(shape[3])
    with tqdm(total=total, unit="traj", desc="verify", disable=None if progress is None else not progress) as bar:
        for split in schema.SPLITS:
            pattern = schema.key_pattern(manifest["name"], split)
            for shard in manifest["splits"][split]["shards"]:
                path = shard_dir / shard["file"]
                if not path.is_file():
                    raise DataFormatError(path, "missing shard file listed in manifest.json")
                digest = schema.sha256_file(path)
                if digest != shard["sha256"]:
                    raise DataFormatError(path, f"sha256 {digest[:12]}...: manifest says {shard['sha256'][:12]}...")
                count = 0
                try:
                    for key, parts in read_shard(path, strict=True):
                        stats = _verify_sample(path, key, parts, pattern, shape, dtype, manifest, split, stats)
                        count += 1
                        bar.update(1)
                except (OSError, UnicodeDecodeError) as exc:
                    raise DataFormatError(path, f"unreadable tar ({exc})") from None
                if count != shard["count"]:
                    raise DataFormatError(path, f"holds {count} samples: manifest says {shard['count']}")
    if manifest["splits"]["train"]["count"]:
        want = stats.as_dict()
        for key, values in manifest["stats"].items():
            if not np.allclose(values, want[key], rtol=1e-6, atol=1e-9):
                raise DataFormatError(shard_dir / schema.MANIFEST_NAME,
                                      f"key 'stats.{key}' is {values}: recomputed {want[key]}")
    return {"name": manifest["name"], "train": manifest["splits"]["train"]["count"],
            "test": manifest["splits"]["test"]["count"],
            "shards": len(listed), "shape": list(shape), "dtype": str(dtype)}


def _verify_sample(path: Path, key: str, parts: dict[str, np.ndarray], pattern: Any, shape: tuple[int, ...],
                   dtype: np.dtype, manifest: dict[str, Any], split: str, stats: ChannelStats) -> ChannelStats:
    if not pattern.match(key):
        raise DataFormatError(path, f"sample key {key!r}: expected {manifest['name']}_{split}_NNNNNNN")
    if set(parts) != set(schema.SAMPLE_EXTS):
        raise DataFormatError(path, f"sample {key!r} has members {sorted(parts)}: expected {list(schema.SAMPLE_EXTS)}")
    fields, meta = decode_sample(key, parts, str(path))
    if fields.shape != shape or fields.dtype != dtype:
        raise DataFormatError(path, f"key '{key}.{schema.FIELDS_EXT}' has shape {fields.shape} {fields.dtype}: "
                                    f"expected {shape} {dtype}")
    if not np.isfinite(fields).all():
        raise DataFormatError(path, f"key '{key}.{schema.FIELDS_EXT}' contains NaN/Inf")
    missing = [k for k in schema.META_REQUIRED if k not in meta]
    if missing:
        raise DataFormatError(path, f"key '{key}.{schema.META_EXT}' lacks {missing}")
    if meta["channels"] != manifest["channels"] or len(meta["t"]) != shape[0]:
        raise DataFormatError(path, f"key '{key}.{schema.META_EXT}' has channels {meta['channels']} and "
                                    f"{len(meta['t'])} times: expected {manifest['channels']} and T={shape[0]}")
    return stats.merge(ChannelStats.of(fields)) if split == "train" else stats
