"""FNO Navier-Stokes `.mat` files: `u` logical [R, X, Y, T], MATLAB v7.3 (HDF5: h5py sees (T, Y, X, R)) or
v5 (scipy.io.loadmat, the one layout that is loaded whole: scipy cannot read it partially).

Shape legend: R trajectories (of a file), T frames, X, Y grid points, C channels.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from nestor_ds.shards.ingest.base import (
    READ_ERRORS,
    Entry,
    H5Reader,
    Reader,
    SourceInfo,
    as_floats,
    one_line,
    time_step,
    uniform_grid,
)
from nestor_ds.shards.schema import DataFormatError

# FNO trajectories are interleaved on disk (trajectory is the fastest axis), so they are read in
# blocks of consecutive trajectories no larger than this many bytes.
FNO_BLOCK_BYTES = 64 * 2**20
MAT5_MAGIC = b"MATLAB 5.0 MAT-file"


def _fno_params(path: str) -> dict[str, Any]:
    """FNO files encode viscosity in the name (`ns_V1e-3_...`, `NavierStokes_V1e-5_...`)."""
    m = re.search(r"_V(\d+(?:\.\d+)?e-?\d+)", Path(path).name)
    return {"nu": float(m.group(1))} if m else {}


class FnoMat73Reader(H5Reader):
    """FNO NS `.mat` v7.3: h5py sees `u` as (T, Y, X, R) (MATLAB column-major reversed)."""

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
            return as_floats(t[()], self.path, "t")
        return [float(i) for i in range(t_len)]

    def _meta(self, t: list[float], x: int, y: int) -> dict[str, Any]:
        return {"x": uniform_grid(x), "y": uniform_grid(y), "t": t, "dt": time_step(t),
                "params": _fno_params(self.path)}

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
                raise DataFormatError(self.path, f"key 'u': read of trajectories {lo}..{hi - 1} failed "
                                                 f"({one_line(exc)})") from None
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
        raise DataFormatError(path, f"unreadable or truncated MATLAB v5 file ({exc})") from None


class FnoMat5Reader(Reader):
    """FNO NS `.mat` v5 (NavierStokes_V1e-5_N1200_T20.mat): `u` [R, X, Y, T] via scipy.io.loadmat."""

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
            raise DataFormatError(self.path, "missing key 'u'")
        u = self.data["u"]
        if u.ndim != 4 or 0 in u.shape or u.dtype.kind != "f":
            raise DataFormatError(self.path, f"key 'u' has shape {u.shape} dtype {u.dtype}: "
                                             f"expected float [N, X, Y, T]")
        n, x, y, t_len = u.shape
        t_raw = self.data.get("t")
        if t_raw is not None and t_raw.size == t_len:
            as_floats(t_raw, self.path, "t")  # validate the optional `t` before anything is built
        return SourceInfo(self.path, self.layout, (t_len, x, y, 1), ("w",),
                          tuple(Entry(i) for i in range(n)))

    def read_one(self, entry: Entry) -> tuple[np.ndarray, dict[str, Any]]:
        u = self.data["u"]
        fields = np.ascontiguousarray(u[entry.index].transpose(2, 0, 1))[..., None]
        t_len = u.shape[3]
        t_raw = self.data.get("t")
        t = (as_floats(t_raw, self.path, "t") if t_raw is not None and t_raw.size == t_len
             else [float(i) for i in range(t_len)])
        return fields, {"x": uniform_grid(u.shape[1]), "y": uniform_grid(u.shape[2]), "t": t, "dt": time_step(t),
                        "params": _fno_params(self.path)}


def is_mat5(path: str) -> bool:
    """Whether `path` starts with the MATLAB v5 header (scipy-readable, not HDF5)."""
    with open(path, "rb") as fh:
        return fh.read(len(MAT5_MAGIC)) == MAT5_MAGIC
