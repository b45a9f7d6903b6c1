"""The Well (2D): `t0_fields`/`t1_fields`/`t2_fields` groups of [R, T, X, Y, (2, (2))] datasets (scalars, vectors,
tensors; sample- or time-invariant ones lack the R or T axis), stored as one channel per component.

Shape legend: R trajectories (of a file), T frames, X, Y grid points, C channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from nestor_ds.shards.ingest.base import (
    READ_ERRORS,
    SPLIT_ALIASES,
    Entry,
    H5Reader,
    SourceInfo,
    as_floats,
    coords_or_grid,
    read_attrs,
    time_step,
)
from nestor_ds.shards.schema import DataFormatError


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
                    raise DataFormatError(self.path, "missing key 't0_fields'")
                continue
            raw = read_attrs(grp, self.path).get("field_names")
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
            raise DataFormatError(self.path, f"attr {key!r} is {value!r}: expected an integer") from None

    def scan(self) -> SourceInfo:
        ndims = self._int_attr("n_spatial_dims", 2)
        if ndims != 2:
            raise DataFormatError(self.path, f"attr 'n_spatial_dims' is {ndims}: expected 2")
        time = self.f.get("dimensions/time")
        if not isinstance(time, h5py.Dataset):
            raise DataFormatError(self.path, "missing key 'dimensions/time'")
        if time.ndim not in (1, 2) or 0 in time.shape or time.dtype.kind not in "fiu":
            raise DataFormatError(self.path, f"key 'dimensions/time' has shape {time.shape} dtype {time.dtype}: "
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
                raise DataFormatError(self.path, f"key {ds.name.lstrip('/')!r} has shape {ds.shape}: "
                                                 f"expected last dims {(2,) * order}")
            if tv and ds.shape[int(sv)] != t_len:
                raise DataFormatError(self.path, f"key {ds.name.lstrip('/')!r} has shape {ds.shape}: "
                                                 f"expected T={t_len} like 'dimensions/time'")
            if sv:
                if n == 0:
                    n = ds.shape[0]
                elif ds.shape[0] != n:
                    raise DataFormatError(self.path, f"key {ds.name.lstrip('/')!r} has shape {ds.shape}: "
                                                     f"expected B={n}")
            if xy is None:
                xy = spatial
            elif spatial != xy:
                raise DataFormatError(self.path, f"key {ds.name.lstrip('/')!r} has shape {ds.shape}: "
                                                 f"expected X, Y = {xy}")
        if not fields or n == 0:
            raise DataFormatError(self.path, "no sample-varying fields in t0_fields/t1_fields")
        if time.ndim == 2 and time.shape[0] != n:
            raise DataFormatError(self.path, f"key 'dimensions/time' has shape {time.shape}: expected [B={n}, T]")
        parent = Path(self.path).parent.name.lower()
        split = SPLIT_ALIASES.get(parent)
        channels = tuple(name for _, _, name, _ in fields)
        return SourceInfo(self.path, self.layout, (t_len, xy[0], xy[1], len(fields)), channels,
                          tuple(Entry(i, split=split) for i in range(n)))

    def read_one(self, entry: Entry) -> tuple[np.ndarray, dict[str, Any]]:
        time = self.f["dimensions/time"]
        t = as_floats(time[entry.index] if time.ndim == 2 else time[()], self.path, "dimensions/time")
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
        sim = read_attrs(self.f, self.path)
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
            params["boundary_conditions"] = {k: read_attrs(g, self.path).get("bc_type") for k, g in bcs.items()}
        dims = self.f["dimensions"]
        x, y = fields.shape[1], fields.shape[2]
        for k in ("dataset_name", "grid_type"):
            if k in sim:
                params[k] = sim[k]
        return fields, {"x": coords_or_grid(dims, "x", x, self.path), "y": coords_or_grid(dims, "y", y, self.path),
                        "t": t, "dt": time_step(t),
                        "params": params}

