"""Verify a built shard directory or s3:// prefix against its manifest (`python -m nestor_ds.shards --verify DIR`).

Reads every shard with the same tar reader and member decoding as the training stream (tar.py, schema.py),
so a directory that verifies is one the stream can read. No torch and no h5py: it needs only the shards. An
s3:// prefix is checked the same way, one shard at a time downloaded to a temporary file (s3.py's resuming reader),
so the checks are the same code for both.

Shape legend: T frames, X, Y grid points, C channels.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nestor_ds.shards import s3, schema
from nestor_ds.shards.schema import DataFormatError
from nestor_ds.shards.stats import ChannelStats
from nestor_ds.shards.tar import decode_sample, read_shard
from nestor_ds.shards.urls import read_manifest_at

# shard file name -> a local path to read while the context is open
Fetch = Callable[[str], contextlib.AbstractContextManager[Path]]


def verify(target: str | Path, progress: bool | None = None) -> dict[str, Any]:
    """Check a built directory or s3://bucket/prefix against its manifest; raises DataFormatError at the first bad
    shard.

    Checks: manifest structure, no unlisted shard files, every shard's sha256 and sample count,
    every sample's members, key, fields dtype/shape/finiteness, meta keys and channels, and the
    training statistics recomputed from the decoded samples.
    """
    if s3.is_s3(str(target)):
        return _verify_s3(str(target).rstrip("/"), progress)
    shard_dir = Path(target)

    @contextlib.contextmanager
    def local(name: str) -> Iterator[Path]:
        if not (shard_dir / name).is_file():
            raise DataFormatError(shard_dir / name, "missing shard file listed in manifest.json")
        yield shard_dir / name

    manifest = schema.read_manifest(shard_dir)
    present = [p.name for p in sorted(shard_dir.glob("*.tar"))]
    return _verify(manifest, present, local, lambda name: str(shard_dir / name), progress)


def _verify_s3(url: str, progress: bool | None) -> dict[str, Any]:
    """--verify of an s3:// prefix: the manifest and the listing from S3, each shard through a temporary file."""
    manifest = read_manifest_at(url)
    present = [u.rsplit("/", 1)[1] for u in s3.list_keys(url) if u.endswith(".tar")]

    @contextlib.contextmanager
    def fetch(name: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="nestor-verify-") as tmp:
            path = Path(tmp) / name
            s3.download(s3.join(url, name), path)
            yield path

    return _verify(manifest, present, fetch, lambda name: s3.join(url, name), progress)


def _verify(manifest: dict[str, Any], present: list[str], fetch: Fetch, where: Callable[[str], str],
            progress: bool | None) -> dict[str, Any]:
    """The checks shared by directories and S3: `present` are the shard files found beside the manifest, `fetch`
    gives a readable local path of one, `where` names it in messages."""
    listed = {s["file"] for split in schema.SPLITS for s in manifest["splits"][split]["shards"]}
    for name in present:
        if name not in listed:
            raise DataFormatError(where(name), "shard file not listed in manifest.json")
    shape, dtype = tuple(manifest["shape"]), np.dtype(manifest["dtype"])
    total = sum(manifest["splits"][s]["count"] for s in schema.SPLITS)
    stats = ChannelStats.empty(shape[3])
    with tqdm(total=total, unit="traj", desc="verify", disable=None if progress is None else not progress) as bar:
        for split in schema.SPLITS:
            pattern = schema.key_pattern(manifest["name"], split)
            for shard in manifest["splits"][split]["shards"]:
                name = where(shard["file"])
                with fetch(shard["file"]) as path:
                    digest = schema.sha256_file(path)
                    if digest != shard["sha256"]:
                        raise DataFormatError(name, f"sha256 {digest[:12]}...: manifest says {shard['sha256'][:12]}...")
                    count = 0
                    try:
                        for key, parts in read_shard(path, strict=True):
                            stats = _verify_sample(name, key, parts, pattern, shape, dtype, manifest, split, stats)
                            count += 1
                            bar.update(1)
                    except DataFormatError as exc:
                        raise DataFormatError(name, exc.message) from None
                    except (OSError, UnicodeDecodeError) as exc:
                        raise DataFormatError(name, f"unreadable tar ({exc})") from None
                if count != shard["count"]:
                    raise DataFormatError(name, f"holds {count} samples: manifest says {shard['count']}")
    if manifest["splits"]["train"]["count"]:
        want = stats.as_dict()
        for key, values in manifest["stats"].items():
            if not np.allclose(values, want[key], rtol=1e-6, atol=1e-9):
                raise DataFormatError(where(schema.MANIFEST_NAME),
                                      f"key 'stats.{key}' is {values}: recomputed {want[key]}")
    return {"name": manifest["name"], "train": manifest["splits"]["train"]["count"],
            "test": manifest["splits"]["test"]["count"],
            "shards": len(listed), "shape": list(shape), "dtype": str(dtype)}


def _verify_sample(path: str, key: str, parts: dict[str, np.ndarray], pattern: Any, shape: tuple[int, ...],
                   dtype: np.dtype, manifest: dict[str, Any], split: str, stats: ChannelStats) -> ChannelStats:
    if not pattern.match(key):
        raise DataFormatError(path, f"sample key {key!r}: expected {manifest['name']}_{split}_NNNNNNN")
    if set(parts) != set(schema.SAMPLE_EXTS):
        raise DataFormatError(path, f"sample {key!r} has members {sorted(parts)}: expected {list(schema.SAMPLE_EXTS)}")
    fields, meta = decode_sample(key, parts, path)
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
