"""PDEBench files: compressible NS (`Vx`, `Vy`, `density`, `pressure` [R, T, X, Y], 1D: [R, T, X]), 1D PDEs
(`tensor` [R, T, X]) and one-group-per-sample files (diffusion-reaction, shallow water: `data` [T, X, Y, C]).

Shape legend: R trajectories (of a file), T frames, X, Y grid points, C channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from nestor_ds.shards.ingest.base import (
    Entry,
    H5Reader,
    SourceInfo,
    as_floats,
    coords_or_grid,
    full_key,
    read_attrs,
    time_step,
)
from nestor_ds.shards.schema import DataFormatError


def _times(f: h5py.Group, key: str, t_len: int, path: str) -> list[float]:
    """PDEBench `t-coordinate` has T+1 entries (one more than frames): keep the first T."""
    t = f.get(key)
    if isinstance(t, h5py.Dataset) and t.size >= t_len:
        return as_floats(t[()], path, full_key(f, key))[:t_len]
    return [float(i) for i in range(t_len)]


class PdebenchCfdReader(H5Reader):
    """PDEBench compressible NS: `Vx`, `Vy`, `density`, `pressure` each [R, T, X, Y]."""

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
                raise DataFormatError(self.path, f"key {key!r} has shape {ds.shape}: "
                                                 f"expected {ref} like {self.channels[0]!r}")
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
        t = _times(self.f, "t-coordinate", t_len, self.path)
        params = {k: v for k, v in read_attrs(self.f, self.path).items() if k in ("eta", "zeta", "M")}
        return {"x": coords_or_grid(self.f, "x-coordinate", x, self.path),
                "y": coords_or_grid(self.f, "y-coordinate", y, self.path) if y > 1 else [0.0],
                "t": t, "dt": time_step(t), "params": params}


class Pdebench1dReader(H5Reader):
    """PDEBench 1D (Burgers, advection, ...): `tensor` [R, T, X] -> [T, X, 1, 1]."""

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
        t = _times(self.f, "t-coordinate", t_len, self.path)
        return {"x": coords_or_grid(self.f, "x-coordinate", x, self.path), "y": [0.0], "t": t, "dt": time_step(t),
                "params": read_attrs(self.f, self.path)}


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
                raise DataFormatError(self.path, f"key {g!r} is a dataset: expected a sample group with 'data'")
            ds = self.dataset("data", self.f[g])
            self.check_shape(ds, (3, 4), "[T, X, Y, C] (or [T, X, Y])", traj_axis=None)
            shape = ds.shape if ds.ndim == 4 else (*ds.shape, 1)
            if ref is None:
                ref = shape
            elif shape != ref:
                raise DataFormatError(self.path, f"key '{g}/data' has shape {ds.shape}: "
                                                 f"expected {ref} like '{groups[0]}/data'")
        if ref is None:
            raise DataFormatError(self.path, "no sample groups: expected groups '0000', '0001', ... with 'data'")
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
        t = coords_or_grid(grp, "grid/t", t_len, self.path) if "grid/t" in grp else [float(i) for i in range(t_len)]
        return fields, {"x": coords_or_grid(grp, "grid/x", x, self.path),
                        "y": coords_or_grid(grp, "grid/y", y, self.path),
                        "t": t, "dt": time_step(t), "params": params, "source_group": entry.group}

