"""PDEArena Navier-Stokes: split groups (`train`/`valid`/`test`) with `u`, `vx`, `vy` [R, T, X, Y].

Shape legend: R trajectories (of a file), T frames, X, Y grid points, C channels.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from nestor_ds.shards.ingest.base import (
    SPLIT_ALIASES,
    Entry,
    H5Reader,
    SourceInfo,
    as_floats,
    first_float,
    time_step,
    uniform_grid,
)
from nestor_ds.shards.schema import DataFormatError


class PdearenaNsReader(H5Reader):
    """PDEArena NS: split groups (`train`/`valid`/`test`) with `u`, `vx`, `vy` [R, T, X, Y]."""

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
                    raise DataFormatError(self.path, f"key '{g}/{key}' has shape {ds.shape}: "
                                                     f"expected [N, {', '.join(map(str, ref))}]")
            n = self.f[g]["u"].shape[0]
            for k in ("vx", "vy"):
                if self.f[g][k].shape[0] != n:
                    raise DataFormatError(self.path, f"key '{g}/{k}' has shape {self.f[g][k].shape}: "
                                                     f"expected N={n} like '{g}/u'")
            entries += [Entry(i, split=SPLIT_ALIASES[g], group=g, local=i) for i in range(n)]
        if ref is None:
            raise DataFormatError(self.path, "no split group ('train', 'valid', 'test') with u, vx, vy")
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
        t = (as_floats(t_raw, self.path, f"{g}/t") if t_raw is not None and np.size(t_raw) == t_len
             else [float(i) for i in range(t_len)])
        params = {}
        for k in ("buo_y", "dx", "dy"):
            v = self._per_sample(grp, k, entry.local)
            if v is not None:
                params[k] = first_float(v, self.path, f"{g}/{k}")
        dt_raw = self._per_sample(grp, "dt", entry.local)
        dt = first_float(dt_raw, self.path, f"{g}/dt") if dt_raw is not None else time_step(t)
        return fields, {"x": as_floats(x_raw, self.path, f"{g}/x") if x_raw is not None and np.size(x_raw) == x
                        else uniform_grid(x),
                        "y": as_floats(y_raw, self.path, f"{g}/y") if y_raw is not None and np.size(y_raw) == y
                        else uniform_grid(y),
                        "t": t, "dt": dt, "params": params, "source_group": g}

