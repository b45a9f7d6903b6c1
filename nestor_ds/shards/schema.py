"""The shard format: file names, sample keys, member encodings and the manifest.

This module is the single source of truth shared by the builder (`build.py`, which writes shards) and every
reader (`tar.py` walks the tar container; `read.py`, `verify.py`, `urls.py` and `nestor_ds.data` decode members
with `decode_fields` / `decode_meta` from here). The format is documented for humans in `docs/data_format.md`;
`python -m nestor_ds.shards --verify DIR` checks a directory against it.

Shape legend: T frames, X, Y grid points, C channels.

A built dataset directory holds `train-NNNNNN.tar`, `test-NNNNNN.tar` (WebDataset tar shards; one
sample = one trajectory) and `manifest.json`.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

BUILDER_VERSION = "1"
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "test")
DTYPES = ("float32", "float16")
LAYOUTS = ("fno-mat", "pdebench-cfd", "pdebench-groups", "pdebench-1d", "pdearena-ns", "the-well", "cfdbench")

# Tar member suffixes of one sample: `<key>.fields.npy` and `<key>.meta.json`.
FIELDS_EXT = "fields.npy"
META_EXT = "meta.json"
SAMPLE_EXTS = (FIELDS_EXT, META_EXT)

# Stored dtypes of a `fields.npy` member (little-endian float32 / float16, as `DTYPES`).
FIELD_DTYPES = (np.dtype("<f4"), np.dtype("<f2"))
_NPY_MAGIC = b"\x93NUMPY"

# Keys every `meta.json` carries (builders may add more).
META_REQUIRED = ("channels", "source_file", "source_index", "layout", "x", "y", "t", "dt", "params")

# Dataset names end up inside sample keys; WebDataset splits a member name at its first dot,
# so names are restricted to characters that cannot confuse key parsing.
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
SHARD_RE = re.compile(r"^(train|test)-(\d{6})\.tar$")


class DataFormatError(ValueError):
    """Bad input or bad shards. `str()` is one line naming the file first, for CLI error output.

    The args are kept as (file, message) so the exception survives pickling across worker processes.
    """

    def __init__(self, file: str | Path, message: str) -> None:
        super().__init__(str(file), message)
        self.file = str(file)
        self.message = message

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


def sha256_file(path: str | Path, chunk: int = 4 * 2**20) -> str:
    """Hex sha256 of a file, read in chunks (shards can be larger than memory allows)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split` (`train-000003.tar`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    return f"{split}-{index:06d}.tar"


def sanitize_name(raw: str) -> str:
    """Turn a file stem into a valid dataset name (dots and other separators become '-')."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", raw).strip("-")
    return name or "dataset"


def check_name(name: str) -> str:
    """Return `name` if it may appear in sample keys, else raise ValueError."""
    if not NAME_RE.match(name):
        raise ValueError(f"dataset name {name!r} may only contain letters, digits, '_' and '-'")
    return name


def sample_key(name: str, split: str, index: int) -> str:
    """WebDataset key of one trajectory: `<name>_<split>_<index:07d>` (no dots)."""
    return f"{name}_{split}_{index:07d}"


def key_pattern(name: str, split: str) -> re.Pattern[str]:
    """Regex matching the keys of `split` in dataset `name`."""
    return re.compile(rf"^{re.escape(name)}_{split}_\d{{7}}$")


# ----------------------------------------------------------------------------- member encodings

def encode_fields(fields: np.ndarray) -> bytes:
    """`.npy` bytes of a C-contiguous [T, X, Y, C] array (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(fields), allow_pickle=False)
    return buf.getvalue()


def parse_npy_header(buf: np.ndarray, where: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, data offset) of the `.npy` bytes at the start of ``buf`` (uint8).

    Parsed by hand (no `np.load`) so that a member of a memory-mapped shard can be viewed without a copy;
    only what `encode_fields` writes is accepted: float32/float16, C order, no pickle.
    """
    head = buf[:12].tobytes()
    if len(head) < 10 or not head.startswith(_NPY_MAGIC):
        raise DataFormatError(where, "not an .npy member (bad magic)")
    major = head[6]
    if major == 1:
        hlen, start = int.from_bytes(head[8:10], "little"), 10
    elif major in (2, 3):
        hlen, start = int.from_bytes(head[8:12], "little"), 12
    else:
        raise DataFormatError(where, f"unsupported .npy version {major}")
    try:
        header = ast.literal_eval(buf[start:start + hlen].tobytes().decode("latin1"))
        dtype, shape, fortran = np.dtype(header["descr"]), tuple(header["shape"]), header.get("fortran_order")
    except (ValueError, SyntaxError, TypeError, KeyError):
        raise DataFormatError(where, "unreadable .npy header") from None
    if dtype not in FIELD_DTYPES:
        raise DataFormatError(where, f"dtype {dtype} (expected float32 or float16)")
    if fortran:
        raise DataFormatError(where, "Fortran-ordered array (expected C order)")
    return dtype, shape, start + hlen


def decode_fields(data: bytes | np.ndarray, where: str = FIELDS_EXT) -> np.ndarray:
    """Inverse of `encode_fields`: the stored [T, X, Y, C] array (float32 or float16), a view of ``data``.

    ``data`` is the member's bytes or a uint8 array over them (a memory map, a buffer read with preadv).
    """
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    dtype, shape, start = parse_npy_header(buf, where)
    count = int(np.prod(shape))
    if start + count * dtype.itemsize > buf.size:
        raise DataFormatError(where, f"member holds {buf.size - start} data bytes, shape {shape} needs more")
    return np.frombuffer(buf, dtype=dtype, count=count, offset=start).reshape(shape)


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, bytes and non-finite floats to plain JSON values."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def encode_json(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys) so that rebuilding gives byte-identical output."""
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def decode_meta(data: bytes | np.ndarray, where: str = META_EXT) -> dict[str, Any]:
    """Parse a `meta.json` member (its bytes or a uint8 array over them)."""
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(where, f"undecodable {META_EXT} ({exc})") from None


# ----------------------------------------------------------------------------- manifest

def write_manifest(shard_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Validate and write `manifest.json` (pretty, sorted keys, trailing newline)."""
    validate_manifest(manifest, Path(shard_dir) / MANIFEST_NAME)
    path = Path(shard_dir) / MANIFEST_NAME
    text = json.dumps(to_jsonable(manifest), sort_keys=True, indent=1, allow_nan=False) + "\n"
    path.write_text(text)
    return path


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Load and validate `DIR/manifest.json`; raises DataFormatError naming the file and key."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataFormatError(path, "missing manifest (not a built shard directory)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(path, f"unreadable JSON: {exc}") from None
    validate_manifest(manifest, path)
    return manifest


def _need(manifest: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if key not in manifest:
        raise DataFormatError(path, f"missing key {key!r}")
    value = manifest[key]
    if not isinstance(value, kind):
        raise DataFormatError(path, f"key {key!r} has type {type(value).__name__}: expected {kind}")
    return value


def validate_manifest(manifest: Any, path: str | Path = MANIFEST_NAME) -> None:
    """Check structure and internal consistency of a manifest dict (not the shard files)."""
    path = Path(path)
    if not isinstance(manifest, dict):
        raise DataFormatError(path, f"manifest is a {type(manifest).__name__}: expected an object")
    _need(manifest, "builder_version", str, path)
    name = _need(manifest, "name", str, path)
    if not NAME_RE.match(name):
        raise DataFormatError(path, f"key 'name' is {name!r}: expected letters, digits, '_' or '-'")
    layout = _need(manifest, "layout", str, path)
    if layout not in LAYOUTS:
        raise DataFormatError(path, f"key 'layout' is {layout!r}: expected one of {LAYOUTS}")
    dtype = _need(manifest, "dtype", str, path)
    if dtype not in DTYPES:
        raise DataFormatError(path, f"key 'dtype' is {dtype!r}: expected one of {DTYPES}")
    shape = _need(manifest, "shape", list, path)
    if len(shape) != 4 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise DataFormatError(path, f"key 'shape' is {shape}: expected 4 positive ints [T, X, Y, C]")
    channels = _need(manifest, "channels", list, path)
    if len(channels) != shape[3] or not all(isinstance(c, str) for c in channels):
        raise DataFormatError(path, f"key 'channels' has {len(channels)} names: expected C={shape[3]} strings")
    splits = _need(manifest, "splits", dict, path)
    for split in SPLITS:
        if split not in splits:
            raise DataFormatError(path, f"missing key 'splits.{split}'")
        entry = splits[split]
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not isinstance(entry.get("count"), int):
            raise DataFormatError(path, f"key 'splits.{split}' needs 'count' (int) and 'shards' (list)")
        total = 0
        for i, shard in enumerate(shards):
            if not isinstance(shard, dict) or set(shard) < {"file", "count", "sha256"}:
                raise DataFormatError(path, f"key 'splits.{split}.shards[{i}]' needs file, count, sha256")
            m = SHARD_RE.match(str(shard["file"]))
            if not m or m.group(1) != split:
                raise DataFormatError(path, f"key 'splits.{split}.shards[{i}].file' is {shard['file']!r}: "
                                            f"expected {split}-NNNNNN.tar")
            total += int(shard["count"])
        if total != entry["count"]:
            raise DataFormatError(path, f"key 'splits.{split}.count' is {entry['count']}: "
                                        f"shards hold {total}")
    stats = _need(manifest, "stats", dict, path)
    for key in ("mean", "std", "min", "max"):
        values = stats.get(key)
        if not isinstance(values, list) or len(values) != shape[3]:
            raise DataFormatError(path, f"key 'stats.{key}' must be a list of C={shape[3]} numbers")
    _need(manifest, "skipped_bad", int, path)
    _need(manifest, "sources", list, path)


def shard_files(manifest: dict[str, Any], shard_dir: str | Path, split: str) -> list[Path]:
    """Paths of the shards of `split`, in manifest order."""
    return [Path(shard_dir) / s["file"] for s in manifest["splits"][split]["shards"]]
