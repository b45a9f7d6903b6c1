"""One reader per raw PDE dataset layout, turning source files into canonical trajectories.

Every reader yields trajectories as `[T, X, Y, C]` arrays (in the axis order the public loaders of
that format use) plus a meta dict, one trajectory (or one small block, for the FNO layout whose
trajectory axis is the fastest-varying one on disk) at a time, so a source file is never held in
memory whole. The only exception is MATLAB v5 `.mat` (FNO 1e-5), which scipy can only load whole.

Readers are cheap to construct from a path, so a worker process opens its own copy (h5py handles do
not cross process boundaries). `scan()` validates keys and shapes without reading data; `read()`
streams the selected trajectories.

Layouts (docs/data_format.md):
  fno-mat          `u` logical [N, X, Y, T] (v7.3 HDF5: h5py sees (T, Y, X, N); v5: scipy loadmat)
  pdebench-cfd     `Vx`, `Vy`, `density`, `pressure` each [N, T, X, Y] (1D files: [N, T, X])
  pdebench-groups  one group per sample with `data` [T, X, Y, C] and `grid/{x,y,t}`
  pdebench-1d      `tensor` [N, T, X]
  pdearena-ns      split groups with `u`, `vx`, `vy` [N, T, X, Y]
  the-well         `t0_fields`/`t1_fields`/`t2_fields` groups of [B, T, X, Y, (D, (D))] datasets
"""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import h5py
import numpy as np

from nestor_ds.shards.schema import LAYOUTS, DataFormatError

# FNO trajectories are interleaved on disk (trajectory is the fastest axis), so they are read in
# blocks of consecutive trajectories no larger than this many bytes.
FNO_BLOCK_BYTES = 64 * 2**20
MAT5_MAGIC = b"MATLAB 5.0 MAT-file"
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


def _err(path: str | Path, message: str) -> DataFormatError:
    return DataFormatError(path, message)


def _grid(n: int) -> list[float]:
    """Uniform periodic grid on [0, 1) for formats that store no coordinates."""
    return (np.arange(n, dtype=np.float64) / n).tolist()


def _one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for wrapping unexpected library errors into one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# Errors h5py/numpy raise on malformed content; read()/scan() turn them into one-line DataFormatErrors.
READ_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError, IndexError)


def _floats(values: Any, path: str, key: str) -> list[float]:
    """Numeric metadata (times, coordinates) as floats, or an error naming file, key, dtype and shape.

    Metadata keys are optional in most layouts, so a present-but-wrong one (strings, compound types)
    must not surface as a bare numpy `could not convert string to float`.
    """
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise _err(path, f"key {key!r} has dtype {arr.dtype} shape {arr.shape}: expected numbers")
    return arr.astype(np.float64).reshape(-1).tolist()


def _first_float(values: Any, path: str, key: str) -> float:
    """A scalar parameter stored as a scalar or a 1-element array."""
    floats = _floats(values, path, key)
    if not floats:
        raise _err(path, f"key {key!r} is empty: expected a number")
    return floats[0]


def _key(group: h5py.Group, key: str) -> str:
    """Full key of `key` under `group`, without the leading '/' (for error messages)."""
    return f"{group.name.rstrip('/')}/{key}".lstrip("/")


def _dt(t: list[float]) -> float | None:
    return float(t[1] - t[0]) if len(t) > 1 else None


def _attrs(obj: h5py.HLObject, path: str) -> dict[str, Any]:
    """HDF5 attributes as plain values (text decoded); an unreadable attribute is an error naming it."""
    out: dict[str, Any] = {}
    for key in obj.attrs:
        try:
            value = obj.attrs[key]
        except READ_ERRORS as exc:  # e.g. a datatype h5py cannot map to numpy
            raise _err(path, f"attr {key!r} of {obj.name!r} is unreadable ({_one_line(exc)})") from None
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
                raise _err(self.path, f"{self.where(entry)}: read failed ({_one_line(exc)})") from None
            yield entry, fields, meta

    def close(self) -> None:
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
            raise _err(self.path, f"missing key {full!r}")
        if not isinstance(obj, h5py.Dataset):
            raise _err(self.path, f"key {full!r} is a group: expected a dataset")
        return obj

    def check_shape(self, ds: h5py.Dataset, ndim: int | tuple[int, ...], expected: str,
                    traj_axis: int | None = 0) -> None:
        """Raise the standard `key 'k' has shape (..): expected ...` error unless ranks match; refuse a dataset
        with 0 trajectories (along `traj_axis`; None: the dataset is one trajectory) or with storage never
        written (see `unwritten_trajectories`)."""
        ranks = (ndim,) if isinstance(ndim, int) else ndim
        key = ds.name.lstrip("/")
        if ds.ndim in ranks and traj_axis is not None and ds.shape[traj_axis] == 0:
            raise _err(self.path, f"key {key!r} has shape {ds.shape}: 0 trajectories (expected {expected})")
        if ds.ndim not in ranks or 0 in ds.shape:
            raise _err(self.path, f"key {key!r} has shape {ds.shape}: expected {expected}")
        if ds.dtype.kind != "f":
            raise _err(self.path, f"key {key!r} has dtype {ds.dtype}: expected float32/float64")
        missing = unwritten_trajectories(ds, traj_axis)
        if missing:
            total = 1 if traj_axis is None else ds.shape[traj_axis]
            raise _err(self.path, f"key {key!r} declares shape {ds.shape} but {missing} of its {total} trajectories "
                                  f"were never written (unallocated HDF5 storage, e.g. an interrupted writer; they "
                                  f"would read as zeros): refusing; regenerate the file or cut it to what was written")


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
    grid = [-(-n // c) for n, c in zip(ds.shape, ds.chunks)]  # chunks per axis
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
        raise _err(path, f"unreadable or truncated HDF5 file ({reason})") from None


# ----------------------------------------------------------------------------- FNO Navier-Stokes

def _fno_params(path: str) -> dict[str, Any]:
    """FNO files encode viscosity in the name (`ns_V1e-3_...`, `NavierStokes_V1e-5_...`)."""
    m = re.search(r"_V(\d+(?:\.\d+)?e-?\d+)", Path(path).name)
    return {"nu": float(m.group(1))} if m else {}


class FnoMat73Reader(H5Reader):
    """FNO NS `.mat` v7.3: h5py sees `u` as (T, Y, X, N) (MATLAB column-major reversed)."""

    layout = "fno-mat"
    data_keys = ("u",)

    @staticmethod
    def matches(f: h5py.File) -> bool:
        u = f.get("u")
        return isinstance(u, h5py.Dataset) and u.ndim == 4 and "Vx" not in f

    def scan(self) -> SourceInfo:
        u = self.dataset("u")
        self.check_shape(u, 4, "4 dims: logical [N, X, Y, T], stored by MATLAB v7.3 as (T, Y, X, N)", traj_axis=3)
        t_len, y, x, n = u.shape
        self._times(t_len)  # validates the optional `t` before anything is built
        return SourceInfo(self.path, self.layout, (t_len, x, y, 1), ("w",),
                          tuple(Entry(i) for i in range(n)))

    def _times(self, t_len: int) -> list[float]:
        t = self.f.get("t")
        if isinstance(t, h5py.Dataset) and t.size == t_len:
            return _floats(t[()], self.path, "t")
        return [float(i) for i in range(t_len)]

    def _meta(self, t: list[float], x: int, y: int) -> dict[str, Any]:
        return {"x": _grid(x), "y": _grid(y), "t": t, "dt": _dt(t), "params": _fno_params(self.path)}

    def read_one(self, entry: Entry) -> tuple[np.ndarray, dict[str, Any]]:
        u = self.f["u"]
        block = u[:, :, :, entry.index]                       # (T, Y, X)
        fields = np.ascontiguousarray(block.transpose(0, 2, 1))[..., None]
        return fields, self._meta(self._times(u.shape[0]), u.shape[2], u.shape[1])

    def read(self, entries: Sequence[Entry]) -> Iterator[tuple[Entry, np.ndarray, dict[str, Any]]]:
        """Read runs of consecutive trajectories as one hyperslab: strided single reads are very slow."""
        u = self.f["u"]
        t_len, y, x, _ = u.shape
        meta = self._meta(self._times(t_len), x, y)
        per_traj = t_len * x * y * u.dtype.itemsize
        max_run = max(1, FNO_BLOCK_BYTES // per_traj)
        i = 0
        while i < len(entries):
            j = i + 1
            while j < len(entries) and j - i < max_run and entries[j].index == entries[j - 1].index + 1:
                j += 1
            lo, hi = entries[i].index, entries[j - 1].index + 1
            try:
                block = u[:, :, :, lo:hi]                       # (T, Y, X, run)
            except READ_ERRORS as exc:
                raise _err(self.path, f"key 'u': read of trajectories {lo}..{hi - 1} failed "
                                      f"({_one_line(exc)})") from None
            for k in range(hi - lo):
                fields = np.ascontiguousarray(block[..., k].transpose(0, 2, 1))[..., None]
                yield entries[i + k], fields, dict(meta)
            i = j


@functools.lru_cache(maxsize=1)
def _loadmat_v5(path: str, mtime: float) -> dict[str, np.ndarray]:
    """Load a MATLAB v5 file once per process (scipy cannot read it partially)."""
    import scipy.io

    try:
        return scipy.io.loadmat(path, variable_names=["u", "a", "t"])
    except Exception as exc:  # scipy raises many types for corrupt files
        raise _err(path, f"unreadable or truncated MATLAB v5 file ({exc})") from None


class FnoMat5Reader(Reader):
    """FNO NS `.mat` v5 (NavierStokes_V1e-5_N1200_T20.mat): `u` [N, X, Y, T] via scipy.io.loadmat."""

    layout = "fno-mat"
    data_keys = ("u",)

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.data = _loadmat_v5(self.path, Path(self.path).stat().st_mtime)

    @staticmethod
    def matches(f: h5py.File) -> bool:
        return False  # detected from the file header, not through h5py

    def scan(self) -> SourceInfo:
        if "u" not in self.data:
            raise _err(self.path, "missing key 'u'")
        u = self.data["u"]
        if u.ndim != 4 or 0 in u.shape or u.dtype.kind != "f":
            raise _err(self.path, f"key 'u' has shape {u.shape} dtype {u.dtype}: expected float [N, X, Y, T]")
        n, x, y, t_len = u.shape
        t_raw = self.data.get("t")
        if t_raw is not None and t_raw.size == t_len:
            _floats(t_raw, self.path, "t")  # validate the optional `t` before anything is built
        return SourceInfo(self.path, self.layout, (t_len, x, y, 1), ("w",),
                          tuple(Entry(i) for i in range(n)))

    def read_one(self, entry: Entry) -> tuple[np.ndarray, dict[str, Any]]:
        u = self.data["u"]
        fields = np.ascontiguousarray(u[entry.index].transpose(2, 0, 1))[..., None]
        t_len = u.shape[3]
        t_raw = self.data.get("t")
        t = (_floats(t_raw, self.path, "t") if t_raw is not None and t_raw.size == t_len
             else [float(i) for i in range(t_len)])
        return fields, {"x": _grid(u.shape[1]), "y": _grid(u.shape[2]), "t": t, "dt": _dt(t),
                        "params": _fno_params(self.path)}


# ----------------------------------------------------------------------------- PDEBench

def _pdebench_times(f: h5py.Group, key: str, t_len: int, path: str) -> list[float]:
    """PDEBench `t-coordinate` has T+1 entries (one more than frames): keep the first T."""
    t = f.get(key)
    if isinstance(t, h5py.Dataset) and t.size >= t_len:
        return _floats(t[()], path, _key(f, key))[:t_len]
    return [float(i) for i in range(t_len)]


def _coords(f: h5py.Group, key: str, n: int, path: str) -> list[float]:
    """Stored coordinates `key` when present with `n` entries, else a uniform grid."""
    c = f.get(key)
    if isinstance(c, h5py.Dataset) and c.size == n:
        return _floats(c[()], path, _key(f, key))
    return _grid(n)


class PdebenchCfdReader(H5Reader):
    """PDEBench compressible NS: `Vx`, `Vy`, `density`, `pressure` each [N, T, X, Y]."""

    layout = "pdebench-cfd"
    ORDER = ("Vx", "Vy", "density", "pressure")
    data_keys = ORDER

    @staticmethod
    def matches(f: h5py.File) -> bool:
        return all(k in f for k in ("density", "pressure", "Vx"))

    @property
    def channels(self) -> tuple[str, ...]:
        """Vx, Vy, density, pressure (1D files have no Vy)."""
        one_d = "Vy" not in self.f and self.dataset("Vx").ndim == 3
        return tuple(c for c in self.ORDER if not (one_d and c == "Vy"))

    def scan(self) -> SourceInfo:
        one_d = len(self.channels) == 3
        ref = None
        for key in self.channels:
            ds = self.dataset(key)
            self.check_shape(ds, 3 if one_d else 4, "[N, T, X] (1D)" if one_d else "4 dims [N, T, X, Y]")
            if ref is None:
                ref = ds.shape
            elif ds.shape != ref:
                raise _err(self.path, f"key {key!r} has shape {ds.shape}: expected {ref} like {self.channels[0]!r}")
        n, t_len, x = ref[:3]
        y = 1 if one_d else ref[3]
        self._meta(t_len, x, y)  # validates the optional coordinates and attrs before anything is built
        return SourceInfo(self.path, self.layout, (t_len, x, y, len(self.channels)), self.channels,
                          tuple(Entry(i) for i in range(n)))

    def read_one(self, entry: Entry) -> tuple[np.ndarray, dict[str, Any]]:
        arrays = [self.f[c][entry.index] for c in self.channels]      # each [T, X, Y] or [T, X]
        fields = np.stack(arrays, axis=-1)
        if fields.ndim == 3:
            fields = fields[:, :, None, :]
        return fields, self._meta(*fields.shape[:3])

    def _meta(self, t_len: int, x: int, y: int) -> dict[str, Any]:
        t = _pdebench_times(self.f, "t-coordinate", t_len, self.path)
        params = {k: v for k, v in _attrs(self.f, self.path).items() if k in ("eta", "zeta", "M")}
        return {"x": _coords(self.f, "x-coordinate", x, self.path),
                "y": _coords(self.f, "y-coordinate", y, self.path) if y > 1 else [0.0],
                "t": t, "dt": _dt(t), "params": params}


class Pdebench1dReader(H5Reader):
    """PDEBench 1D (Burgers, advection, ...): `tensor` [N, T, X] -> [T, X, 1, 1]."""

    layout = "pdebench-1d"
    data_keys = ("tensor",)

    @staticmethod
    def matches(f: h5py.File) -> bool:
        return isinstance(f.get("tensor"), h5py.Dataset)

    def scan(self) -> SourceInfo:
        ds = self.dataset("tensor")
        self.check_shape(ds, 3, "3 dims [N, T, X]")
        n, t_len, x = ds.shape
        self._meta(t_len, x)  # validates the optional coordinates and attrs before anything is built
        return SourceInfo(self.path, self.layout, (t_len, x, 1, 1), ("u",), tuple(Entry(i) for i in range(n)))

    def read_one(self, entry: Entry) -> tuple[np.ndarray, dict[str, Any]]:
        fields = self.f["tensor"][entry.index][:, :, None, None]
        return fields, self._meta(fields.shape[0], fields.shape[1])

    def _meta(self, t_len: int, x: int) -> dict[str, Any]:
        t = _pdebench_times(self.f, "t-coordinate", t_len, self.path)
        return {"x": _coords(self.f, "x-coordinate", x, self.path), "y": [0.0], "t": t, "dt": _dt(t),
                "params": _attrs(self.f, self.path)}


def _group_channels(path: str, c: int) -> tuple[str, ...]:
    name = Path(path).name.lower()
    if "diff-react" in name and c == 2:
        return ("u", "v")
    if "rdb" in name and c == 1:
        return ("h",)
    return tuple(f"c{i}" for i in range(c))


class PdebenchGroupsReader(H5Reader):
    """PDEBench diffusion-reaction / shallow water: one group per sample with `data` [T, X, Y, C]."""

    layout = "pdebench-groups"

    def where(self, entry: Entry) -> str:
        return f"key '{entry.group}/data'"

    @staticmethod
    def matches(f: h5py.File) -> bool:
        for key in f:
            obj = f[key]
            return isinstance(obj, h5py.Group) and isinstance(obj.get("data"), h5py.Dataset)
        return False

    def scan(self) -> SourceInfo:
        groups = sorted(self.f.keys())
        ref = None
        for g in groups:
            if not isinstance(self.f[g], h5py.Group):
                raise _err(self.path, f"key {g!r} is a dataset: expected a sample group with 'data'")
            ds = self.dataset("data", self.f[g])
            self.check_shape(ds, (3, 4), "[T, X, Y, C] (or [T, X, Y])", traj_axis=None)
            shape = ds.shape if ds.ndim == 4 else (*ds.shape, 1)
            if ref is None:
                ref = shape
            elif shape != ref:
                raise _err(self.path, f"key '{g}/data' has shape {ds.shape}: expected {ref} like '{groups[0]}/data'")
        if ref is None:
            raise _err(self.path, "no sample groups: expected groups '0000', '0001', ... with 'data'")
        return SourceInfo(self.path, self.layout, tuple(ref), _group_channels(self.path, ref[3]),
                          tuple(Entry(i, group=g) for i, g in enumerate(groups)))

    def read_one(self, entry: Entry) -> tuple[np.ndarray, dict[str, Any]]:
        grp = self.f[entry.group]
        fields = grp["data"][()]
        if fields.ndim == 3:
            fields = fields[..., None]
        t_len, x, y, _ = fields.shape
        params: dict[str, Any] = {}
        config = grp.attrs.get("config")
        if config is not None:
            text = config.decode("utf-8", "replace") if isinstance(config, bytes) else str(config)
            params["config"] = text
            try:
                import yaml

                parsed = yaml.safe_load(text)
                if isinstance(parsed, dict):
                    params.update({k: v for k, v in parsed.items() if k != "config"})
            except Exception:  # config text is informational; keep the raw text
                pass
        t = _coords(grp, "grid/t", t_len, self.path) if "grid/t" in grp else [float(i) for i in range(t_len)]
        return fields, {"x": _coords(grp, "grid/x", x, self.path), "y": _coords(grp, "grid/y", y, self.path),
                        "t": t, "dt": _dt(t),
                        "params": params, "source_group": entry.group}


# ----------------------------------------------------------------------------- PDEArena

class PdearenaNsReader(H5Reader):
    """PDEArena NS: split groups (`train`/`valid`/`test`) with `u`, `vx`, `vy` [N, T, X, Y]."""

    layout = "pdearena-ns"
    CHANNELS = ("u", "vx", "vy")
    data_keys = CHANNELS

    @staticmethod
    def matches(f: h5py.File) -> bool:
        return any(isinstance(f.get(s), h5py.Group) and "vx" in f[s] for s in SPLIT_ALIASES)

    def scan(self) -> SourceInfo:
        groups = sorted(k for k in self.f.keys() if k in SPLIT_ALIASES and isinstance(self.f[k], h5py.Group))
        entries: list[Entry] = []
        ref = None
        for g in groups:
            for key in self.CHANNELS:
                ds = self.dataset(key, self.f[g])
                self.check_shape(ds, 4, "4 dims [N, T, X, Y]")
                if ref is None:
                    ref = ds.shape[1:]
                elif ds.shape[1:] != ref:
                    raise _err(self.path, f"key '{g}/{key}' has shape {ds.shape}: "
                                          f"expected [N, {', '.join(map(str, ref))}]")
            n = self.f[g]["u"].shape[0]
            for k in ("vx", "vy"):
                if self.f[g][k].shape[0] != n:
                    raise _err(self.path, f"key '{g}/{k}' has shape {self.f[g][k].shape}: expected N={n} like '{g}/u'")
            entries += [Entry(i, split=SPLIT_ALIASES[g], group=g, local=i) for i in range(n)]
        if ref is None:
            raise _err(self.path, "no split group ('train', 'valid', 'test') with u, vx, vy")
        return SourceInfo(self.path, self.layout, (*ref, 3), self.CHANNELS, tuple(entries))

    def _per_sample(self, grp: h5py.Group, key: str, i: int) -> Any:
        ds = grp.get(key)
        if not isinstance(ds, h5py.Dataset):
            return None
        return ds[()] if ds.ndim == 0 else ds[i]

    def read_one(self, entry: Entry) -> tuple[np.ndarray, dict[str, Any]]:
        grp = self.f[entry.group]
        fields = np.stack([grp[c][entry.local] for c in self.CHANNELS], axis=-1)
        t_len, x, y, _ = fields.shape
        t_raw, x_raw, y_raw = (self._per_sample(grp, k, entry.local) for k in ("t", "x", "y"))
        g = entry.group
        t = (_floats(t_raw, self.path, f"{g}/t") if t_raw is not None and np.size(t_raw) == t_len
             else [float(i) for i in range(t_len)])
        params = {}
        for k in ("buo_y", "dx", "dy"):
            v = self._per_sample(grp, k, entry.local)
            if v is not None:
                params[k] = _first_float(v, self.path, f"{g}/{k}")
        dt_raw = self._per_sample(grp, "dt", entry.local)
        dt = _first_float(dt_raw, self.path, f"{g}/dt") if dt_raw is not None else _dt(t)
        return fields, {"x": _floats(x_raw, self.path, f"{g}/x") if x_raw is not None and np.size(x_raw) == x
                        else _grid(x),
                        "y": _floats(y_raw, self.path, f"{g}/y") if y_raw is not None and np.size(y_raw) == y
                        else _grid(y),
                        "t": t, "dt": dt, "params": params, "source_group": g}


# ----------------------------------------------------------------------------- The Well

class TheWellReader(H5Reader):
    """The Well (2D): t0 fields, then t1 fields as `<name>_x`, `<name>_y`, then t2 as `<name>_xx`..."""

    layout = "the-well"
    AXES = "xyz"
    data_keys = ("t0_fields", "t1_fields", "t2_fields")

    @staticmethod
    def matches(f: h5py.File) -> bool:
        return isinstance(f.get("t0_fields"), h5py.Group) or "n_spatial_dims" in f.attrs

    def _fields(self) -> list[tuple[h5py.Dataset, int, str, tuple[int, ...]]]:
        """(dataset, tensor order, channel name, component index) in channel order."""
        out = []
        for order in (0, 1, 2):
            grp = self.f.get(f"t{order}_fields")
            if not isinstance(grp, h5py.Group):
                if order == 0:
                    raise _err(self.path, "missing key 't0_fields'")
                continue
            raw = _attrs(grp, self.path).get("field_names")
            names = [raw] if isinstance(raw, str) else [] if raw is None else list(np.atleast_1d(raw))
            names = names or sorted(grp.keys())
            for name in names:
                ds = self.dataset(str(name), grp)
                comps = [()] if order == 0 else ([(d,) for d in range(2)] if order == 1
                                                 else [(d, e) for d in range(2) for e in range(2)])
                for comp in comps:
                    suffix = "" if order == 0 else "_" + "".join(self.AXES[c] for c in comp)
                    out.append((ds, order, f"{name}{suffix}", comp))
        return out

    def _expected_rank(self, ds: h5py.Dataset, order: int) -> tuple[int, bool, bool]:
        sv = bool(ds.attrs.get("sample_varying", True))
        tv = bool(ds.attrs.get("time_varying", True))
        return int(sv) + int(tv) + 2 + order, sv, tv

    def _int_attr(self, key: str, default: int) -> int:
        value = self.f.attrs.get(key, default)
        try:
            return int(np.asarray(value).reshape(-1)[0]) if np.size(value) == 1 else int(value)
        except READ_ERRORS:
            raise _err(self.path, f"attr {key!r} is {value!r}: expected an integer") from None

    def scan(self) -> SourceInfo:
        ndims = self._int_attr("n_spatial_dims", 2)
        if ndims != 2:
            raise _err(self.path, f"attr 'n_spatial_dims' is {ndims}: expected 2")
        time = self.f.get("dimensions/time")
        if not isinstance(time, h5py.Dataset):
            raise _err(self.path, "missing key 'dimensions/time'")
        if time.ndim not in (1, 2) or 0 in time.shape or time.dtype.kind not in "fiu":
            raise _err(self.path, f"key 'dimensions/time' has shape {time.shape} dtype {time.dtype}: "
                                  "expected numbers [T] (or [B, T] when sample-varying)")
        t_len = time.shape[-1]
        n = self._int_attr("n_trajectories", 0)
        xy = None
        fields = self._fields()
        for ds, order, _, _ in fields:
            rank, sv, tv = self._expected_rank(ds, order)
            want = (*(["B"] if sv else []), *(["T"] if tv else []), "X", "Y", *(["D"] * order))
            self.check_shape(ds, rank, f"{rank} dims [{', '.join(want)}] (D=2)", traj_axis=0 if sv else None)
            spatial = ds.shape[int(sv) + int(tv): int(sv) + int(tv) + 2]
            if order and ds.shape[-order:] != (2,) * order:
                raise _err(self.path, f"key {ds.name.lstrip('/')!r} has shape {ds.shape}: "
                                      f"expected last dims {(2,) * order}")
            if tv and ds.shape[int(sv)] != t_len:
                raise _err(self.path, f"key {ds.name.lstrip('/')!r} has shape {ds.shape}: expected T={t_len} "
                                      f"like 'dimensions/time'")
            if sv:
                if n == 0:
                    n = ds.shape[0]
                elif ds.shape[0] != n:
                    raise _err(self.path, f"key {ds.name.lstrip('/')!r} has shape {ds.shape}: expected B={n}")
            if xy is None:
                xy = spatial
            elif spatial != xy:
                raise _err(self.path, f"key {ds.name.lstrip('/')!r} has shape {ds.shape}: expected X, Y = {xy}")
        if not fields or n == 0:
            raise _err(self.path, "no sample-varying fields in t0_fields/t1_fields")
        if time.ndim == 2 and time.shape[0] != n:
            raise _err(self.path, f"key 'dimensions/time' has shape {time.shape}: expected [B={n}, T]")
        parent = Path(self.path).parent.name.lower()
        split = SPLIT_ALIASES.get(parent)
        channels = tuple(name for _, _, name, _ in fields)
        return SourceInfo(self.path, self.layout, (t_len, xy[0], xy[1], len(fields)), channels,
                          tuple(Entry(i, split=split) for i in range(n)))

    def read_one(self, entry: Entry) -> tuple[np.ndarray, dict[str, Any]]:
        time = self.f["dimensions/time"]
        t = _floats(time[entry.index] if time.ndim == 2 else time[()], self.path, "dimensions/time")
        cache: dict[str, np.ndarray] = {}
        columns = []
        for ds, order, _, comp in self._fields():
            _, sv, tv = self._expected_rank(ds, order)
            if ds.name not in cache:
                cache[ds.name] = ds[entry.index] if sv else ds[()]
            arr = cache[ds.name]
            arr = arr[(...,) + comp] if comp else arr
            if not tv:
                arr = np.broadcast_to(arr, (len(t), *arr.shape))
            columns.append(arr)
        fields = np.stack(columns, axis=-1)
        sim = _attrs(self.f, self.path)
        names = sim.get("simulation_parameters", [])
        names = [names] if isinstance(names, str) else list(names)
        params: dict[str, Any] = {k: sim[k] for k in names if k in sim}
        scalars = self.f.get("scalars")
        if isinstance(scalars, h5py.Group):
            for k, ds in scalars.items():
                if isinstance(ds, h5py.Dataset) and k not in params:
                    v = ds[entry.index] if bool(ds.attrs.get("sample_varying", False)) and ds.ndim else ds[()]
                    params[k] = np.asarray(v).tolist()
        bcs = self.f.get("boundary_conditions")
        if isinstance(bcs, h5py.Group):
            params["boundary_conditions"] = {k: _attrs(g, self.path).get("bc_type") for k, g in bcs.items()}
        dims = self.f["dimensions"]
        x, y = fields.shape[1], fields.shape[2]
        for k in ("dataset_name", "grid_type"):
            if k in sim:
                params[k] = sim[k]
        return fields, {"x": _coords(dims, "x", x, self.path), "y": _coords(dims, "y", y, self.path),
                        "t": t, "dt": _dt(t),
                        "params": params}


# ----------------------------------------------------------------------------- detection

H5_READERS: dict[str, type[H5Reader]] = {
    # Order matters for detection: the most specific signatures first.
    "the-well": TheWellReader,
    "pdearena-ns": PdearenaNsReader,
    "pdebench-cfd": PdebenchCfdReader,
    "pdebench-1d": Pdebench1dReader,
    "fno-mat": FnoMat73Reader,
    "pdebench-groups": PdebenchGroupsReader,
}
assert set(H5_READERS) == set(LAYOUTS)


def _is_mat5(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(MAT5_MAGIC)) == MAT5_MAGIC


def detect_layout(path: str | Path) -> str:
    """Name of the layout of `path` (see module docstring); DataFormatError if none matches."""
    path = str(path)
    if not Path(path).is_file():
        raise _err(path, "no such file")
    if not h5py.is_hdf5(path):
        if _is_mat5(path):
            return "fno-mat"
        raise _err(path, "unreadable: neither HDF5 (incl. MATLAB v7.3) nor MATLAB v5 .mat")
    with open_h5(path) as f:
        for layout, cls in H5_READERS.items():
            if cls.matches(f):
                return layout
        keys = sorted(f.keys())[:8]
    raise _err(path, f"unknown layout: top-level keys {keys} match none of {', '.join(LAYOUTS)}")


def open_reader(path: str | Path, layout: str = "auto") -> Reader:
    """Reader for `path`, detecting the layout when `layout == "auto"`."""
    path = str(path)
    if layout == "auto":
        layout = detect_layout(path)
    elif layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected auto or one of {LAYOUTS}")
    if not Path(path).is_file():
        raise _err(path, "no such file")
    if layout == "fno-mat" and not h5py.is_hdf5(path):
        if not _is_mat5(path):
            raise _err(path, "unreadable: neither MATLAB v7.3 (HDF5) nor v5 .mat")
        return FnoMat5Reader(path)
    if not h5py.is_hdf5(path):
        raise _err(path, f"unreadable: not an HDF5 file (layout {layout})")
    return H5_READERS[layout](path)
