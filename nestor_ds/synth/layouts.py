"""Writers that store a :class:`Simulation` in the public raw layouts the shard builder reads.

Why: the readers in ``nestor_ds.shards.ingest`` must be tested against files that look exactly like the public
datasets (docs/data_format.md) without downloading them. Every writer is deterministic: no timestamps
(``track_times=False``, fixed MATLAB header text), so the same simulation gives the same bytes.

Layouts and the PDEs that fit them (``COMPATIBLE``):

- ``fno-mat``      MATLAB v7.3 (HDF5 + 512-byte user block). Logical ``u`` [R, X, Y, T], ``a`` [R, X, Y],
                   ``t`` [1, T]; HDF5 stores MATLAB arrays with the axes reversed, so h5py sees ``u`` as
                   (T, Y, X, R), ``a`` as (Y, X, R), ``t`` as (T, 1). ``a`` is the t = 0 frame, ``u`` the T
                   frames after it. Scalar PDEs only (ns vorticity, swe height).
- ``fno-mat-v5``   the same arrays through ``scipy.io.savemat`` (logical order, as in NavierStokes_V1e-5).
- ``pdebench-groups``  groups ``'0000'``..; ``data`` [T, X, Y, C] float32 (axis 1 runs along ``grid/x``, as
                   ``nestor_ds.shards.ingest`` reads it; grids are square and the fields isotropic, so PDEBench's
                   own (t, y, x, c) naming changes nothing), ``grid/x``, ``grid/y``, ``grid/t``; group attr
                   ``config`` (YAML text).
- ``pdebench-cfd`` ``density``, ``pressure``, ``Vx``, ``Vy`` [R, T, X, Y] float32, ``x-coordinate`` [X],
                   ``y-coordinate`` [Y], ``t-coordinate`` [T + 1]; root attrs ``eta``, ``zeta``, ``M``.
- ``pdearena-ns``  group per split with ``u``, ``vx``, ``vy`` [R, T, X, Y] float64, ``t`` [R, T], ``x`` [R, X],
                   ``y`` [R, Y], ``dt``, ``dx``, ``dy``, ``buo_y`` [R] float64. ``u`` is the PDE's scalar
                   (vorticity, height or density); ``buo_y`` is 0 (no buoyancy in these solvers).
- ``the-well``     root attrs, ``dimensions``, ``boundary_conditions``, ``scalars``, ``t0_fields`` [R, T, X, Y],
                   ``t1_fields`` [R, T, X, Y, 2] (velocity), ``t2_fields`` (empty).

Shape legend: R trajectories, T frames, X, Y grid points, C channels.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import scipy.io
import yaml

from nestor_ds.synth.common import Simulation
from nestor_ds.synth.solvers import simulate

LAYOUTS = ("fno-mat", "fno-mat-v5", "pdebench-groups", "pdebench-cfd", "pdearena-ns", "the-well")

COMPATIBLE: dict[str, tuple[str, ...]] = {
    "fno-mat": ("ns", "swe"),
    "fno-mat-v5": ("ns", "swe"),
    "pdebench-groups": ("ns", "dr", "swe", "cfd"),
    "pdebench-cfd": ("cfd",),
    "pdearena-ns": ("ns", "swe", "cfd"),
    "the-well": ("ns", "dr", "swe", "cfd"),
}

# Layouts whose stored frames exclude t = 0 (FNO keeps the initial state apart in ``a``).
INITIAL_APART = ("fno-mat", "fno-mat-v5")

MATLAB_HEADER_V73 = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: (nestor_ds gen_pde) HDF5 schema 1.00 ."
MATLAB_HEADER_V5 = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: (nestor_ds gen_pde)"

SCALAR_OF = {"ns": "vorticity", "swe": "h", "cfd": "density"}


def check_compatible(pde: str, layout: str) -> None:
    """One-line error for a layout that cannot hold this PDE's fields."""
    if layout not in COMPATIBLE:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if pde not in COMPATIBLE[layout]:
        raise ValueError(f"layout {layout!r} cannot hold pde {pde!r}; it takes {COMPATIBLE[layout]}")


def _f(x: np.ndarray, float64: bool) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float64 if float64 else np.float32)


def _ds(g: h5py.Group, name: str, data, **kw) -> h5py.Dataset:
    return g.create_dataset(name, data=data, track_times=False, **kw)


# --------------------------------------------------------------------------------------------------
# FNO
# --------------------------------------------------------------------------------------------------


def _fno_arrays(sim: Simulation, float64: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logical MATLAB arrays: u [R, X, Y, T] (frames after t=0), a [R, X, Y] (t = 0), t [1, T]."""
    field = sim.channel(sim.primary[0])  # [R, T, X, Y]
    u = _f(np.moveaxis(field[:, 1:], 1, -1), float64)
    a = _f(field[:, 0], float64)
    t = _f(sim.t_T[1:][None, :], float64)
    return u, a, t


def write_fno_mat(path: str | Path, sim: Simulation, float64: bool = False) -> None:
    """MATLAB v7.3: HDF5 with a 512-byte user block whose first 128 bytes are the MATLAB header."""
    u, a, t = _fno_arrays(sim, float64)
    cls = np.bytes_(b"double" if float64 else b"single")
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, arr in (("a", a), ("t", t), ("u", u)):
            ds = _ds(f, name, arr.T)  # MATLAB is column-major: HDF5 sees the axes reversed
            ds.attrs.create("MATLAB_class", cls)
    header = MATLAB_HEADER_V73.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as fh:
        fh.write(header)


def write_fno_mat_v5(path: str | Path, sim: Simulation, float64: bool = False) -> None:
    """MATLAB v5 via scipy; the header's creation date is replaced by fixed text for byte determinism."""
    u, a, t = _fno_arrays(sim, float64)
    scipy.io.savemat(str(path), {"a": a, "t": t, "u": u}, format="5", do_compression=False)
    with open(path, "r+b") as fh:
        fh.write(MATLAB_HEADER_V5.ljust(116, b" "))


# --------------------------------------------------------------------------------------------------
# PDEBench
# --------------------------------------------------------------------------------------------------


def _yaml_params(sim: Simulation, i: int) -> str:
    sim_cfg = {
        k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in sim.params.items()
    }
    for k, v in sim.per_sample.items():
        sim_cfg[k] = v[i].item()
    return yaml.safe_dump({"pde": sim.pde, "sim": sim_cfg}, sort_keys=True)


def write_pdebench_groups(path: str | Path, sim: Simulation) -> None:
    """One group per trajectory with ``data`` [T, X, Y, C] float32 of the primary channels."""
    idx = [sim.channels.index(c) for c in sim.primary]
    with h5py.File(path, "w") as f:
        for i in range(sim.fields_RTXYC.shape[0]):
            g = f.create_group(f"{i:04d}")
            _ds(g, "data", _f(sim.fields_RTXYC[i][..., idx], False))
            grid = g.create_group("grid")
            _ds(grid, "x", _f(sim.x_X, False))
            _ds(grid, "y", _f(sim.y_Y, False))
            _ds(grid, "t", _f(sim.t_T, False))
            g.attrs["config"] = _yaml_params(sim, i)


def write_pdebench_cfd(path: str | Path, sim: Simulation) -> None:
    """PDEBench 2D CFD: one [R, T, X, Y] float32 dataset per variable; t-coordinate has T + 1 entries."""
    if sim.pde != "cfd":
        raise ValueError(f"layout 'pdebench-cfd' cannot hold pde {sim.pde!r}")
    t = sim.t_T
    dt = float(t[1] - t[0])
    with h5py.File(path, "w") as f:
        for name, ch in (("density", "density"), ("pressure", "pressure"), ("Vx", "vx"), ("Vy", "vy")):
            _ds(f, name, _f(sim.channel(ch), False))
        _ds(f, "x-coordinate", _f(sim.x_X, False))
        _ds(f, "y-coordinate", _f(sim.y_Y, False))
        _ds(f, "t-coordinate", _f(np.append(t, t[-1] + dt), False))
        for k in ("eta", "zeta", "M"):
            f.attrs[k] = float(sim.params[k])


# --------------------------------------------------------------------------------------------------
# PDEArena
# --------------------------------------------------------------------------------------------------


def write_pdearena_ns(path: str | Path, sim: Simulation, split: str = "train") -> None:
    """PDEArena NS: scalar ``u`` plus velocity ``vx``, ``vy``, float64, inside one group named by the split."""
    if split not in ("train", "valid", "test"):
        raise ValueError(f"pdearena-ns: split must be train, valid or test (got {split!r})")
    if sim.pde not in SCALAR_OF:
        raise ValueError(f"layout 'pdearena-ns' cannot hold pde {sim.pde!r} (needs a velocity field)")
    n, nt, nx, ny, _ = sim.fields_RTXYC.shape
    dt, dx, dy = float(sim.t_T[1] - sim.t_T[0]), float(sim.x_X[1] - sim.x_X[0]), float(sim.y_Y[1] - sim.y_Y[0])
    with h5py.File(path, "w") as f:
        g = f.create_group(split)
        for name, ch in (("u", SCALAR_OF[sim.pde]), ("vx", "vx"), ("vy", "vy")):
            _ds(g, name, _f(sim.channel(ch), True))
        _ds(g, "t", np.tile(sim.t_T.astype(np.float64), (n, 1)))
        _ds(g, "x", np.tile(sim.x_X.astype(np.float64), (n, 1)))
        _ds(g, "y", np.tile(sim.y_Y.astype(np.float64), (n, 1)))
        _ds(g, "dt", np.full(n, dt))
        _ds(g, "dx", np.full(n, dx))
        _ds(g, "dy", np.full(n, dy))
        _ds(g, "buo_y", np.zeros(n))


# --------------------------------------------------------------------------------------------------
# The Well
# --------------------------------------------------------------------------------------------------

_STR = h5py.string_dtype()


def _set_names(obj: h5py.Group | h5py.Dataset, key: str, names: list[str]) -> None:
    obj.attrs.create(key, np.array(names, dtype=object), dtype=_STR)


def _field_attrs(ds: h5py.Dataset, time_varying: bool = True, sample_varying: bool = True) -> None:
    ds.attrs["time_varying"] = time_varying
    ds.attrs["sample_varying"] = sample_varying
    ds.attrs["dim_varying"] = np.array([True, True])


def write_the_well(path: str | Path, sim: Simulation, dataset_name: str | None = None) -> None:
    """The Well: scalar channels in ``t0_fields``, the (vx, vy) pair as ``velocity`` in ``t1_fields``."""
    name = dataset_name or f"gen_pde_{sim.pde}"
    vector = "vx" in sim.channels and "vy" in sim.channels
    scalars = [c for c in sim.channels if c not in ("vx", "vy")]
    params = {k: float(v) for k, v in sim.params.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    n = sim.fields_RTXYC.shape[0]
    with h5py.File(path, "w") as f:
        f.attrs["dataset_name"] = name
        f.attrs["grid_type"] = "cartesian"
        f.attrs["n_spatial_dims"] = 2
        f.attrs["n_trajectories"] = n
        _set_names(f, "simulation_parameters", sorted(params))
        for k in sorted(params):
            f.attrs[k] = params[k]

        dims = f.create_group("dimensions")
        _set_names(dims, "spatial_dims", ["x", "y"])
        for dname, arr, tv in (("time", sim.t_T, True), ("x", sim.x_X, False), ("y", sim.y_Y, False)):
            d = _ds(dims, dname, arr.astype(np.float32))
            d.attrs["time_varying"] = tv
            d.attrs["sample_varying"] = False

        bcs = f.create_group("boundary_conditions")
        bc_type = {"periodic": "PERIODIC", "neumann": "WALL", "reflective": "WALL", "transmissive": "OPEN"}[
            sim.boundary
        ]
        for dname, arr in (("x", sim.x_X), ("y", sim.y_Y)):
            b = bcs.create_group(f"{dname}_{sim.boundary}")
            b.attrs["bc_type"] = bc_type
            _set_names(b, "associated_dims", [dname])
            _set_names(b, "associated_fields", [])
            b.attrs["time_varying"] = False
            b.attrs["sample_varying"] = False
            mask = np.zeros(len(arr), dtype=bool)
            mask[[0, -1]] = True
            _ds(b, "mask", mask)

        sc = f.create_group("scalars")
        _set_names(sc, "field_names", sorted(params))
        for k in sorted(params):
            d = _ds(sc, k, np.float64(params[k]))
            d.attrs["time_varying"] = False
            d.attrs["sample_varying"] = False

        t0 = f.create_group("t0_fields")
        _set_names(t0, "field_names", scalars)
        for c in scalars:
            _field_attrs(_ds(t0, c, _f(sim.channel(c), False)))
        t1 = f.create_group("t1_fields")
        _set_names(t1, "field_names", ["velocity"] if vector else [])
        if vector:
            vel = np.stack([sim.channel("vx"), sim.channel("vy")], axis=-1)
            _field_attrs(_ds(t1, "velocity", _f(vel, False)))
        t2 = f.create_group("t2_fields")
        _set_names(t2, "field_names", [])


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def write_layout(
    layout: str,
    path: str | Path,
    sim: Simulation,
    float64: bool = False,
    split: str = "train",
    dataset_name: str | None = None,
) -> Path:
    """Write ``sim`` in ``layout`` at ``path`` (parent folders created); returns the path."""
    check_compatible(sim.pde, layout)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "fno-mat":
        write_fno_mat(path, sim, float64)
    elif layout == "fno-mat-v5":
        write_fno_mat_v5(path, sim, float64)
    elif layout == "pdebench-groups":
        write_pdebench_groups(path, sim)
    elif layout == "pdebench-cfd":
        write_pdebench_cfd(path, sim)
    elif layout == "pdearena-ns":
        write_pdearena_ns(path, sim, split)
    else:
        write_the_well(path, sim, dataset_name)
    return path


DEFAULT_STEPS = {"ns": 20, "dr": 101, "swe": 101, "cfd": 21}
DEFAULT_LAYOUT = {"ns": "fno-mat", "dr": "pdebench-groups", "swe": "pdebench-groups", "cfd": "pdebench-cfd"}
WRITER_KEYS = ("float64", "split", "dataset_name")


def write_dataset(
    pde: str,
    layout: str,
    path: str | Path,
    n: int = 2,
    res: int = 16,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = False,
    batch_size: int = 16,
    **kw,
) -> Path:
    """Simulate ``n`` trajectories of ``pde`` and write them in ``layout``: the one call tests need.

    ``steps`` is the number of frames T stored in the layout's data arrays (FNO layouts store T frames after
    the initial state ``a``; the others store T frames starting at t = 0). ``kw`` takes PDE parameters
    (e.g. ``visc``, ``record_interval``) and writer options (``float64``, ``split``, ``dataset_name``).
    """
    check_compatible(pde, layout)
    steps = DEFAULT_STEPS[pde] if steps is None else steps
    frames = steps + 1 if layout in INITIAL_APART else steps
    writer_kw = {k: kw.pop(k) for k in WRITER_KEYS if k in kw}
    sim = simulate(pde, n, res, frames, seed, batch_size=batch_size, progress=progress, **kw)
    return write_layout(layout, path, sim, **writer_kw)
