"""PDE generators (nestor_ds.synth), raw-layout writers (nestor_ds.synth.layouts) and `python -m nestor_ds.synth`.

Physics checks use cases with known answers (a decaying shear mode of Navier-Stokes, conservation laws of
the finite-volume schemes); layout checks read the files back with h5py / scipy and with the project's
readers, so writer and reader agree on the contract.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import yaml

from nestor_ds.synth.cfd import CFDConfig, cfd_initial, solve_cfd
from nestor_ds.synth.common import sample_rngs
from nestor_ds.synth.layouts import COMPATIBLE, LAYOUTS, write_dataset
from nestor_ds.synth.ns import NSConfig, solve_ns
from nestor_ds.synth.solvers import PDES, simulate
from nestor_ds.synth.swe import SWEConfig, solve_swe, swe_initial

REPO = Path(__file__).resolve().parents[1]

R, RES, STEPS = 2, 16, 4
TINY_NS = ["--pde", "ns", "--layout", "pdearena-ns", "--n", "1", "--res", "16", "--steps", "3"]  # CLI checks
COMBOS = [(pde, layout) for layout in LAYOUTS for pde in COMPATIBLE[layout]]


def _write(tmp_path: Path, pde: str, layout: str, seed: int = 0, name: str = "f", **kw) -> Path:
    return write_dataset(pde, layout, tmp_path / f"{name}_{pde}_{layout}.h5", R, RES, STEPS, seed, **kw)


# ------------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("pde,layout", COMBOS)
def test_layout_keys_shapes_finite(tmp_path: Path, pde: str, layout: str) -> None:
    path = _write(tmp_path, pde, layout)
    if layout == "fno-mat-v5":
        m = scipy.io.loadmat(path)
        assert m["u"].shape == (R, RES, RES, STEPS) and m["a"].shape == (R, RES, RES) and m["t"].shape == (1, STEPS)
        assert m["u"].dtype == np.float32 and np.isfinite(m["u"]).all()
        return
    with h5py.File(path, "r") as f:
        if layout == "fno-mat":
            assert f["u"].shape == (STEPS, RES, RES, R) and f["a"].shape == (RES, RES, R) and f["t"].shape == (STEPS, 1)
            assert f["u"].attrs["MATLAB_class"] == b"single"
            assert f.userblock_size == 512
            arrays = [f["u"][()], f["a"][()]]
        elif layout == "pdebench-groups":
            assert sorted(f.keys()) == ["0000", "0001"]
            c = {"dr": 2, "cfd": 4}.get(pde, 1)
            g = f["0001"]
            assert g["data"].shape == (STEPS, RES, RES, c) and g["data"].dtype == np.float32
            assert g["grid/x"].shape == (RES,) and g["grid/y"].shape == (RES,) and g["grid/t"].shape == (STEPS,)
            cfg = yaml.safe_load(g.attrs["config"])
            assert cfg["pde"] == pde and "seed" in cfg["sim"]
            arrays = [g["data"][()]]
        elif layout == "pdebench-cfd":
            for k in ("density", "pressure", "Vx", "Vy"):
                assert f[k].shape == (R, STEPS, RES, RES) and f[k].dtype == np.float32
            assert f["x-coordinate"].shape == (RES,) and f["y-coordinate"].shape == (RES,)
            assert f["t-coordinate"].shape == (STEPS + 1,)
            assert {"eta", "zeta", "M"} <= set(f.attrs)
            arrays = [f[k][()] for k in ("density", "pressure", "Vx", "Vy")]
            assert arrays[0].min() > 0 and arrays[1].min() > 0
        elif layout == "pdearena-ns":
            g = f["train"]
            for k in ("u", "vx", "vy"):
                assert g[k].shape == (R, STEPS, RES, RES) and g[k].dtype == np.float64
            assert g["t"].shape == (R, STEPS) and g["x"].shape == (R, RES) and g["y"].shape == (R, RES)
            for k in ("dt", "dx", "dy", "buo_y"):
                assert g[k].shape == (R,)
            arrays = [g[k][()] for k in ("u", "vx", "vy")]
        else:
            assert f.attrs["grid_type"] == "cartesian" and f.attrs["n_spatial_dims"] == 2
            assert f.attrs["n_trajectories"] == R and "dataset_name" in f.attrs
            assert f["dimensions/time"].shape == (STEPS,)
            assert f["dimensions/x"].shape == (RES,) and f["dimensions/y"].shape == (RES,)
            t0, t1 = f["t0_fields"], f["t1_fields"]
            names0 = list(t0.attrs["field_names"])
            assert names0 and all(t0[n].shape == (R, STEPS, RES, RES) for n in names0)
            assert all({"time_varying", "sample_varying", "dim_varying"} <= set(t0[n].attrs) for n in names0)
            names1 = list(t1.attrs["field_names"])
            assert names1 == ([] if pde == "dr" else ["velocity"])
            assert all(t1[n].shape == (R, STEPS, RES, RES, 2) for n in names1)
            assert list(f["t2_fields"].attrs["field_names"]) == []
            assert len(f["boundary_conditions"]) == 2
            arrays = [t0[n][()] for n in names0] + [t1[n][()] for n in names1]
        assert all(np.isfinite(a).all() for a in arrays)
        assert all(a.std() > 0 for a in arrays)


@pytest.mark.parametrize("pde,layout", [(p, lay) for lay in LAYOUTS for p in PDES if p not in COMPATIBLE[lay]])
def test_incompatible_layout_refused(tmp_path: Path, pde: str, layout: str) -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        _write(tmp_path, pde, layout)
    assert not list(tmp_path.iterdir())


def test_fno_mat_header_and_orientation(tmp_path: Path) -> None:
    """v7.3 header text; h5py arrays are the logical MATLAB arrays reversed; a is the frame before u[..., 0]."""
    p73 = _write(tmp_path, "ns", "fno-mat", float64=True)
    p5 = _write(tmp_path, "ns", "fno-mat-v5", float64=True)
    head = p73.read_bytes()[:128]
    assert head.startswith(b"MATLAB 7.3 MAT-file") and head[124:128] == b"\x00\x02IM"
    with h5py.File(p73, "r") as f:
        u, a, t = f["u"][()].T, f["a"][()].T, f["t"][()].T
        assert f["u"].dtype == np.float64 and f["u"].attrs["MATLAB_class"] == b"double"
    m = scipy.io.loadmat(p5)
    np.testing.assert_array_equal(u, m["u"])
    np.testing.assert_array_equal(a, m["a"])
    np.testing.assert_allclose(t, m["t"])
    sim = simulate("ns", R, RES, STEPS + 1, 0)
    np.testing.assert_array_equal(a, sim.channel("vorticity")[:, 0])
    np.testing.assert_array_equal(u, np.moveaxis(sim.channel("vorticity")[:, 1:], 1, -1))
    np.testing.assert_allclose(t[0], sim.t_T[1:])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic_bytes(tmp_path: Path, layout: str) -> None:
    pde = COMPATIBLE[layout][-1]
    a, b = _write(tmp_path, pde, layout, name="a"), _write(tmp_path, pde, layout, name="b")
    c = _write(tmp_path, pde, layout, seed=1, name="c")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


@pytest.mark.parametrize("pde,layout", COMBOS)
def test_project_reader_reads_back(tmp_path: Path, pde: str, layout: str) -> None:
    """The project's own reader (nestor_ds.shards.ingest) recovers the solver's fields from each layout."""
    readers = pytest.importorskip("nestor_ds.shards.ingest")
    path = _write(tmp_path, pde, layout)
    sim = simulate(pde, R, RES, STEPS + 1 if layout.startswith("fno") else STEPS, 0)
    with readers.open_reader(path) as r:
        info = r.scan()
        assert info.layout == ("fno-mat" if layout.startswith("fno") else layout)
        fields, meta = r.read_one(info.entries[1])
    if layout.startswith("fno"):
        want = sim.channel(sim.primary[0])[1, 1:, :, :, None]
    elif layout == "pdebench-groups":
        want = sim.fields_RTXYC[1][..., [sim.channels.index(c) for c in sim.primary]]
    else:
        names = {
            "pdebench-cfd": ["vx", "vy", "density", "pressure"],
            "pdearena-ns": [{"ns": "vorticity", "swe": "h", "cfd": "density"}.get(pde), "vx", "vy"],
            "the-well": [c for c in sim.channels if c not in ("vx", "vy")]
            + (["vx", "vy"] if "vx" in sim.channels else []),
        }[layout]
        want = np.stack([sim.channel(c)[1] for c in names], axis=-1)
    assert fields.shape == want.shape
    np.testing.assert_allclose(fields, want, rtol=1e-6, atol=1e-6)
    assert len(meta["t"]) == want.shape[0]


# ------------------------------------------------------------------------------------------ physics


def test_ns_shear_mode_decays_exactly() -> None:
    """w = cos(2 pi k x) is steady for the Euler part, so it must decay as exp(-nu (2 pi k)^2 t) (both schemes)."""
    res, k, visc, t_end = 32, 2, 1e-2, 1.0
    x = np.arange(res) / res
    w0 = np.broadcast_to(np.cos(2 * math.pi * k * x)[:, None], (res, res))[None].copy()
    for scheme in ("cn", "rk4"):
        cfg = NSConfig(visc=visc, record_interval=t_end, forcing=False, time_scheme=scheme)
        out = solve_ns(w0, 2, cfg)
        ratio = out[0, 1, :, :, 0] / w0[0]
        np.testing.assert_allclose(
            ratio[np.abs(w0[0]) > 0.5], math.exp(-visc * (2 * math.pi * k) ** 2 * t_end), rtol=1e-3
        )
        # velocity of w = cos(2 pi k x): psi = w / (2 pi k)^2, u = psi_y = 0, v = -psi_x = sin(2 pi k x) / (2 pi k)
        np.testing.assert_allclose(out[0, 0, :, :, 1], 0.0, atol=1e-12)
        np.testing.assert_allclose(out[0, 0, :, 0, 2], np.sin(2 * math.pi * k * x) / (2 * math.pi * k), atol=1e-12)


def test_ns_mean_vorticity_and_energy() -> None:
    """Mean vorticity stays 0 (forced); unforced kinetic energy falls every frame, faster with more viscosity."""
    forced = simulate("ns", 2, 32, 6, 3, visc=1e-3, record_interval=0.5)
    assert np.abs(forced.channel("vorticity").mean(axis=(2, 3))).max() < 1e-12
    energies = {}
    for visc in (1e-3, 1e-2):
        sim = simulate("ns", 2, 32, 6, 3, visc=visc, forcing=False, record_interval=0.5)
        e = 0.5 * (sim.channel("vx") ** 2 + sim.channel("vy") ** 2).mean(axis=(2, 3))  # [R, T]
        assert (np.diff(e, axis=1) < 0).all()
        energies[visc] = e[:, -1] / e[:, 0]
    assert (energies[1e-2] < energies[1e-3]).all()


def test_swe_mass_conservation_and_symmetry() -> None:
    """Reflective walls: total water is conserved; the radial dam stays symmetric under x <-> y."""
    cfg = SWEConfig(bc="reflective", record_interval=0.3)
    h0, _ = swe_initial(sample_rngs(0, 2), 32, cfg)
    out = solve_swe(h0, 5, cfg)
    mass = out[..., 0].sum(axis=(2, 3))
    np.testing.assert_allclose(mass, np.broadcast_to(mass[:, :1], mass.shape), rtol=1e-12)
    np.testing.assert_allclose(out[..., 0], out[..., 0].transpose(0, 1, 3, 2), atol=1e-12)
    assert out[:, -1, ..., 0].max() < 2.0 and out[:, -1, ..., 0].min() > 0.3


def test_cfd_conserves_mass_momentum_energy() -> None:
    cfg = CFDConfig(record_interval=0.1)
    prim0 = cfd_initial(sample_rngs(1, 2), 24, cfg)
    out = solve_cfd(prim0, 4, cfg)
    rho, p, u, v = (out[..., i] for i in range(4))
    mass = rho.sum(axis=(2, 3))
    mom = (rho * u).sum(axis=(2, 3))
    energy = (p / (cfg.gamma - 1) + 0.5 * rho * (u * u + v * v)).sum(axis=(2, 3))
    for q in (mass, energy):
        np.testing.assert_allclose(q, np.broadcast_to(q[:, :1], q.shape), rtol=1e-11)
    np.testing.assert_allclose(mom, np.broadcast_to(mom[:, :1], mom.shape), atol=1e-9 * mass[0, 0])
    assert np.abs(out[:, -1] - out[:, 0]).max() > 1e-3  # it moved


def test_dr_stays_bounded_and_relaxes() -> None:
    """FitzHugh-Nagumo from N(0, 1) noise: the cubic term pulls u into [-1.5, 1.5] and diffusion smooths it."""
    sim = simulate("dr", 2, 32, 21, 0)  # t in [0, 1]
    u = sim.channel("u")
    assert np.isfinite(sim.fields_RTXYC).all()
    assert np.abs(u[:, -1]).max() < 1.5 < np.abs(u[:, 0]).max()
    rough = lambda a: np.abs(np.diff(a, axis=-1)).mean()  # noqa: E731
    assert rough(u[:, -1]) < 0.5 * rough(u[:, 0])


def test_unknown_parameter_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="unknown parameter"):
        simulate("ns", 1, 16, 2, 0, viscosity=1e-3)
    with pytest.raises(ValueError, match="res >= 8"):
        simulate("dr", 1, 4, 2, 0)


def test_trajectory_depends_only_on_seed_and_index() -> None:
    """Initial conditions come from per-trajectory generators, so n=1 gives the first trajectory of n=3."""
    one = simulate("swe", 1, 16, 3, 7)
    three = simulate("swe", 3, 16, 3, 7, batch_size=1)
    np.testing.assert_array_equal(one.fields_RTXYC[0], three.fields_RTXYC[0])


# ------------------------------------------------------------------------------------------ CLI


def test_tiny_sizes_stay_tiny(tmp_path: Path) -> None:
    """The tiny sizes the tests use give files of a few trajectories' bytes (not a wall-clock bound, which fails
    on a loaded machine): the size, not the machine, decides how long they take."""
    for pde in PDES:
        path = write_dataset(pde, "the-well", tmp_path / f"{pde}.h5", R, RES, STEPS, 0)
        payload = R * (STEPS + 1) * RES * RES * 4 * 8  # at most 4 channels of float64 per grid point and frame
        assert 0 < Path(path).stat().st_size < payload + 2**20, pde


def _load_cli():
    """`python -m nestor_ds.synth` imported, so most CLI checks run in-process (a fresh interpreter costs seconds)."""
    from nestor_ds.synth import cli

    return cli


def test_cli_script_demo_tiny(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "nestor_ds.synth", "--demo", str(tmp_path / "demo"), "--tiny", "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert len(names) == 4 and "2D_diff-react_NA_NA.h5" in names and any(n.startswith("ns_V1e-3") for n in names)


def test_cli_help_errors_and_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cli = _load_cli()
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "CFL" in out and "pdearena-ns" in out
    assert cli.main(["--pde", "dr", "--layout", "fno-mat", "--out", str(tmp_path / "x.mat"), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "cannot hold" in err
    assert cli.main(["--pde", "swe", "--param", "g", "--out", str(tmp_path / "y.h5"), "--quiet"]) != 0
    assert "KEY=VALUE" in capsys.readouterr().err
    rc = cli.main(
        [
            *TINY_NS,
            "--split",
            "valid",
            "--visc",
            "1e-4",
            "--record-interval",
            "0.1",
            "--out",
            str(tmp_path / "pda.h5"),
            "--quiet",
        ]
    )
    assert rc == 0
    with h5py.File(tmp_path / "pda.h5", "r") as f:
        assert f["valid/u"].shape == (1, 3, 16, 16)
        np.testing.assert_allclose(f["valid/t"][0], [0.0, 0.1, 0.2])


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--record-interval", "-1"], "--record-interval -1.0: expected a finite number > 0"),
        (["--record-interval", "0"], "--record-interval 0.0: expected a finite number > 0"),
        (["--record-interval", "nan"], "--record-interval nan: expected a finite number > 0"),
        (["--visc=-1e-3"], "--visc -0.001: expected a finite number > 0"),
        (["--n", "0"], "--n 0: expected an integer >= 1"),
        (["--res", "-16"], "--res -16: expected an integer >= 1"),
        (["--steps", "0"], "--steps 0: expected an integer >= 1"),
        (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
        (["--param", "record_interval=-1"], "ns: record_interval -1.0: expected a finite number > 0"),
    ],
)
def test_cli_rejects_nonpositive_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], needle: str
) -> None:
    """--record-interval -1 used to exit 0 and write identical frames at t = 0, -1, -2, ..."""
    cli = _load_cli()
    out = tmp_path / "x.h5"
    rc = cli.main(
        [
            *TINY_NS,
            *argv,
            "--out",
            str(out),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0
    assert err.strip().splitlines() == [f"gen_pde: error: {needle}"], err
    assert not out.exists()


def test_record_interval_must_be_positive_in_the_api() -> None:
    for bad in (0.0, -0.5, float("inf")):
        with pytest.raises(ValueError, match="record_interval .*expected a finite number > 0"):
            simulate("dr", 1, 8, 2, 0, record_interval=bad)
