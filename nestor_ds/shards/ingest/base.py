"""What every raw-layout reader shares: the `Reader` interface, HDF5 access with one-line errors, the
trajectory list (`Entry`, `SourceInfo`) and the metadata helpers (numbers, coordinates, attributes).

Every reader yields trajectories as `[T, X, Y, C]` arrays (in the axis order the public loaders of
that format use) plus a meta dict, one trajectory (or one small block) at a time, so a source file is never
held in memory whole. Readers are cheap to construct from a path, so a worker process opens its own copy
(h5py handles do not cross process boundaries). `scan()` validates keys and shapes without reading data;
`read()` streams the selected trajectories.

Shape legend: R trajectories (of a file), T frames, X, Y grid points, C channels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import h5py
import numpy as np

from nestor_ds.shards.schema import DataFormatError

SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "test", "val": "test",
                 "validation": "test", "test": "test"}


@dataclass(frozen=True)
class Entry:
    """One trajectory inside a source file.

    index: the trajectory's index inside the source file (`source_index` in meta).
    split: the file's own split for this trajectory ("train"/"test") or None when the file has none.
    group: HDF5 group holding it (pdebench-groups sample group, pdearena split group), else "".
    local: index along the trajectory axis of the dataset(s) inside `group`.
    """

    index: int
    split: str | None = None
    group: str = ""
    local: int = 0


@dataclass(frozen=True)
class SourceInfo:
    """What `scan()` learnt about one source file: layout, canonical shape, channel names, entries."""

    path: str
    layout: str
    shape: tuple[int, int, int, int]
    channels: tuple[str, ...]
    entries: tuple[Entry, ...]


def uniform_grid(n: int) -> list[float]:
    """Uniform periodic grid on [0, 1) for formats that store no coordinates."""
    return (np.arange(n, dtype=np.float64) / n).tolist()


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for wrapping unexpected library errors into one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# Errors h5py/numpy raise on malformed content; read()/scan() turn them into one-line DataFormatErrors.
READ_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError, IndexError)


def as_floats(values: Any, path: str, key: str) -> list[float]:
    """Numeric metadata (times, coordinates) as floats, or an error naming file, key, dtype and shape.

    Metadata keys are optional in most layouts, so a present-but-wrong one (strings, compound types)
    must not surface as a bare numpy `could not convert string to float`.
    """
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise DataFormatError(path, f"key {key!r} has dtype {arr.dtype} shape {arr.shape}: expected numbers")
    return arr.astype(np.float64).reshape(-1).tolist()


def first_float(values: Any, path: str, key: str) -> float:
    """A scalar parameter stored as a scalar or a 1-element array."""
    floats = as_floats(values, path, key)
    if not floats:
        raise DataFormatError(path, f"key {key!r} is empty: expected a number")
    return floats[0]


def full_key(group: h5py.Group, key: str) -> str:
    """Full key of `key` under `group`, without the leading '/' (for error messages)."""
    return f"{group.name.rstrip('/')}/{key}".lstrip("/")


def time_step(t: list[float]) -> float | None:
    return float(t[1] - t[0]) if len(t) > 1 else None


def read_attrs(obj: h5py.HLObject, path: str) -> dict[str, Any]:
    """HDF5 attributes as plain values (text decoded); an unreadable attribute is an error naming it."""
    out: dict[str, Any] = {}
    for key in obj.attrs:
        try:
            value = obj.attrs[key]
        except READ_ERRORS as exc:  # e.g. a datatype h5py cannot map to numpy
            raise DataFormatError(path, f"attr {key!r} of {obj.name!r} is unreadable ({one_line(exc)})") from None
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        elif isinstance(value, np.ndarray) and value.dtype.kind in "SO":
            value = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in value.tolist()]
        out[key] = value
    return out


class Reader(ABC):
    """Base class: open a source file, describe it (`scan`), stream trajectories (`read`)."""

    layout: ClassVar[str]

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    @staticmethod
    @abstractmethod
    def matches(f: h5py.File) -> bool:
        """Whether an open HDF5 file looks like this layout (auto-detection)."""

    @abstractmethod
    def scan(self) -> SourceInfo:
        """Validate keys and shapes (no bulk data read) and list the trajectories."""

    @abstractmethod
    def read_one(self, entry: Entry) -> tuple[np.ndarray, dict[str, Any]]:
        """Read one trajectory as ([T, X, Y, C] array in the stored dtype, meta)."""

    def where(self, entry: Entry) -> str:
        """Where a trajectory lives in the file, for error messages ("key 'u' trajectory 3")."""
        keys = ", ".join(repr(f"{entry.group}/{k}" if entry.group else k) for k in self.data_keys)
        return f"key {keys} trajectory {entry.local if entry.group else entry.index}"

    data_keys: ClassVar[tuple[str, ...]] = ()

    def read(self, entries: Sequence[Entry]) -> Iterator[tuple[Entry, np.ndarray, dict[str, Any]]]:
        """Stream the given trajectories in the given order."""
        for entry in entries:
            try:
                fields, meta = self.read_one(entry)
            except DataFormatError:
                raise
            except READ_ERRORS as exc:  # h5py read failures (truncated file etc.), malformed metadata
                raise DataFormatError(self.path, f"{self.where(entry)}: read failed ({one_line(exc)})") from None
            yield entry, fields, meta

    def close(self) -> None:  # noqa: B027 (a default: readers without handles have nothing to release)
        """Release file handles."""

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class H5Reader(Reader):
    """Reader over an HDF5 file; opens it on construction with a one-line error if unreadable."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.f = open_h5(self.path)

    def close(self) -> None:
        self.f.close()

    def dataset(self, key: str, root: h5py.Group | None = None) -> h5py.Dataset:
        """The dataset `key` (relative to `root`), or a missing-key error naming file and key."""
        root = self.f if root is None else root
        full = f"{root.name.rstrip('/')}/{key}".lstrip("/")
        obj = root.get(key)
        if obj is None:
            raise DataFormatError(self.path, f"missing key {full!r}")
        if not isinstance(obj, h5py.Dataset):
            raise DataFormatError(self.path, f"key {full!r} is a group: expected a dataset")
        return obj

    def check_shape(self, ds: h5py.Dataset, ndim: int | tuple[int, ...], expected: str,
                    traj_axis: int | None = 0) -> None:
        """Raise the standard `key 'k' has shape (..): expected ...` error unless ranks match; refuse a dataset
        with 0 trajectories (along `traj_axis`; None: the dataset is one trajectory) or with storage never
        written (see `unwritten_trajectories`)."""
        ranks = (ndim,) if isinstance(ndim, int) else ndim
        key = ds.name.lstrip("/")
        if ds.ndim in ranks and traj_axis is not None and ds.shape[traj_axis] == 0:
            raise DataFormatError(self.path, f"key {key!r} has shape {ds.shape}: 0 trajectories (expected {expected})")
        if ds.ndim not in ranks or 0 in ds.shape:
            raise DataFormatError(self.path, f"key {key!r} has shape {ds.shape}: expected {expected}")
        if ds.dtype.kind != "f":
            raise DataFormatError(self.path, f"key {key!r} has dtype {ds.dtype}: expected float32/float64")
        missing = unwritten_trajectories(ds, traj_axis)
        if missing:
            total = 1 if traj_axis is None else ds.shape[traj_axis]
            raise DataFormatError(self.path, f"key {key!r} declares shape {ds.shape} but {missing} of its {total} "
                                             f"trajectories were never written (unallocated HDF5 storage, e.g. an "
                                             f"interrupted writer; they would read as zeros): refusing; regenerate the "
                                             f"file or cut it to what was written")


def unwritten_trajectories(ds: h5py.Dataset, traj_axis: int | None) -> int:
    """How many trajectories along `traj_axis` (None: the whole dataset is one) lack allocated storage.

    HDF5 allocates chunked storage lazily: a file whose writer stopped early declares its full shape while the
    missing chunks read as the fill value (zeros). Counted from the allocated chunks' offsets, so time and
    memory scale with what was written, never with the declared shape. Contiguous storage is allocated whole
    on first write (0 bytes: nothing written); compact and virtual datasets are taken as written.
    """
    if ds.is_virtual or ds.size == 0:
        return 0
    if ds.chunks is None:
        if ds.id.get_storage_size() > 0 or ds.id.get_create_plist().get_layout() == h5py.h5d.COMPACT:
            return 0
        return 1 if traj_axis is None else ds.shape[traj_axis]
    grid = [-(-n // c) for n, c in zip(ds.shape, ds.chunks, strict=True)]  # chunks per axis
    expected = int(np.prod(grid, dtype=object))
    allocated = ds.id.get_num_chunks()
    if allocated >= expected:
        return 0
    if traj_axis is None:
        return 1
    per_slab = expected // grid[traj_axis]  # chunks covering one chunk-row of trajectories
    counts: dict[int, int] = {}

    def visit(info: Any) -> None:
        off = info.chunk_offset[traj_axis]
        counts[off] = counts.get(off, 0) + 1

    if hasattr(ds.id, "chunk_iter"):
        ds.id.chunk_iter(visit)
    else:  # older HDF5: one index lookup per allocated chunk
        for i in range(allocated):
            visit(ds.id.get_chunk_info(i))
    n, c = ds.shape[traj_axis], ds.chunks[traj_axis]
    written = sum(min(c, n - off) for off, k in counts.items() if k >= per_slab)
    return n - written


def open_h5(path: str) -> h5py.File:
    """Open read-only; unreadable or truncated files become a one-line DataFormatError."""
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        reason = str(exc).split("\n")[0]
        raise DataFormatError(path, f"unreadable or truncated HDF5 file ({reason})") from None


def coords_or_grid(f: h5py.Group, key: str, n: int, path: str) -> list[float]:
    """Stored coordinates `key` when present with `n` entries, else a uniform grid."""
    c = f.get(key)
    if isinstance(c, h5py.Dataset) and c.size == n:
        return as_floats(c[()], path, full_key(f, key))
    return uniform_grid(n)
