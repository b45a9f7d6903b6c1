"""Shard builder: round trip per layout, statistics, determinism, bad input, --verify, --skip-bad, float16.

Fixtures are tiny h5py/scipy files written here with known arrays in every raw layout of
docs/data_format.md, on non-square grids (X != Y) so that any axis swap fails the round trip.
One test also builds files from `nestor_ds.synth.layouts` (the generator's own writers).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from nestor_ds.shards import cli as build_shards
from nestor_ds.shards import schema
from nestor_ds.shards.build import BuildConfig, build
from nestor_ds.shards.ingest import detect_layout
from nestor_ds.shards.read import read_trajectories
from nestor_ds.shards.verify import verify

ROOT = Path(__file__).resolve().parents[1]

R, T, X, Y = 5, 3, 6, 4
RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- fixtures: raw files


def _mat73(path: Path, u_logical: np.ndarray, t: np.ndarray) -> None:
    """MATLAB v7.3: HDF5 with a 512-byte user block; arrays stored with axes reversed."""
    with h5py.File(path, "w", userblock_size=512) as f:
        f["u"] = u_logical.transpose(3, 2, 1, 0)
        f["a"] = u_logical[..., 0].transpose(2, 1, 0)
        f["t"] = t[None, :].T
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116, b" "))


def make_fno73(d: Path) -> tuple[Path, list[np.ndarray], list[str]]:
    u = RNG.standard_normal((R, X, Y, T))  # float64 input
    path = d / "ns_V1e-3_N5_T3.mat"
    _mat73(path, u, np.arange(1, T + 1, dtype=np.float64))
    return path, [u[n].transpose(2, 0, 1)[..., None] for n in range(R)], ["w"]


def make_fno5(d: Path) -> tuple[Path, list[np.ndarray], list[str]]:
    u = RNG.standard_normal((R, X, Y, T)).astype(np.float32)
    path = d / "NavierStokes_V1e-5_N5_T3.mat"
    scipy.io.savemat(str(path), {"u": u, "a": u[..., 0], "t": np.arange(T, dtype=np.float32)[None]}, format="5")
    return path, [u[n].transpose(2, 0, 1)[..., None] for n in range(R)], ["w"]


def make_cfd(d: Path) -> tuple[Path, list[np.ndarray], list[str]]:
    data = {k: RNG.standard_normal((R, T, X, Y)).astype(np.float32) for k in ("density", "pressure", "Vx", "Vy")}
    path = d / "2D_CFD_Rand_M0.1_Eta0.01_Zeta0.01_periodic_6_Train.hdf5"
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f[k] = v
        f["x-coordinate"] = np.linspace(0, 1, X, dtype=np.float32)
        f["y-coordinate"] = np.linspace(0, 1, Y, dtype=np.float32)
        f["t-coordinate"] = np.linspace(0, 1, T + 1, dtype=np.float32)
        f.attrs.update({"eta": 0.01, "zeta": 0.01, "M": 0.1})
    order = ("Vx", "Vy", "density", "pressure")
    return path, [np.stack([data[k][n] for k in order], -1) for n in range(R)], list(order)


def make_groups(d: Path) -> tuple[Path, list[np.ndarray], list[str]]:
    arrays = [RNG.standard_normal((T, X, Y, 2)).astype(np.float32) for _ in range(R)]
    path = d / "2D_diff-react_NA_NA.h5"
    with h5py.File(path, "w") as f:
        for n, a in enumerate(arrays):
            g = f.create_group(f"{n:04d}")
            g["data"] = a
            g["grid/x"] = np.linspace(-1, 1, X, dtype=np.float32)
            g["grid/y"] = np.linspace(-1, 1, Y, dtype=np.float32)
            g["grid/t"] = np.linspace(0, 5, T, dtype=np.float32)
            g.attrs["config"] = f"sim:\n  seed: {n}\n"
    return path, arrays, ["u", "v"]


def make_1d(d: Path) -> tuple[Path, list[np.ndarray], list[str]]:
    tensor = RNG.standard_normal((R, T, X)).astype(np.float32)
    path = d / "1D_Burgers_Sols_Nu0.01.hdf5"
    with h5py.File(path, "w") as f:
        f["tensor"] = tensor
        f["x-coordinate"] = np.linspace(0, 1, X, dtype=np.float32)
        f["t-coordinate"] = np.linspace(0, 1, T + 1, dtype=np.float32)
    return path, [tensor[n][:, :, None, None] for n in range(R)], ["u"]


def make_pdearena(d: Path) -> tuple[Path, list[np.ndarray], list[str]]:
    """Groups `train` (3) and `valid` (2): the file's own split decides (valid -> test)."""
    path = d / "NavierStokes2D_train_1_0.5.h5"
    arrays = {}
    with h5py.File(path, "w") as f:
        for g, n in (("train", 3), ("valid", 2)):
            chans = {c: RNG.standard_normal((n, T, X, Y)) for c in ("u", "vx", "vy")}
            for c, v in chans.items():
                f[f"{g}/{c}"] = v
            f[f"{g}/t"] = np.tile(np.arange(T, dtype=np.float64), (n, 1))
            f[f"{g}/x"] = np.tile(np.linspace(0, 32, X), (n, 1))
            f[f"{g}/y"] = np.tile(np.linspace(0, 32, Y), (n, 1))
            f[f"{g}/dt"] = np.full(n, 1.5)
            f[f"{g}/buo_y"] = np.full(n, 0.5)
            arrays[g] = [np.stack([chans[c][i] for c in ("u", "vx", "vy")], -1) for i in range(n)]
    return path, arrays["train"] + arrays["valid"], ["u", "vx", "vy"]


def _well_file(path: Path, b: int) -> list[np.ndarray]:
    str_t = h5py.string_dtype()
    p = RNG.standard_normal((b, T, X, Y)).astype(np.float32)
    rho = RNG.standard_normal((b, T, X, Y)).astype(np.float32)
    vel = RNG.standard_normal((b, T, X, Y, 2)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update(
            {"dataset_name": "toy", "grid_type": "cartesian", "n_spatial_dims": 2, "n_trajectories": b, "Re": 100.0}
        )
        f.attrs.create("simulation_parameters", np.array(["Re"], dtype=object), dtype=str_t)
        f["dimensions/time"] = np.arange(T, dtype=np.float32)
        f["dimensions/x"] = np.linspace(0, 1, X, dtype=np.float32)
        f["dimensions/y"] = np.linspace(0, 1, Y, dtype=np.float32)
        f.create_group("boundary_conditions/x_periodic").attrs["bc_type"] = "PERIODIC"
        t0 = f.create_group("t0_fields")
        t0.attrs.create("field_names", np.array(["pressure", "density"], dtype=object), dtype=str_t)
        t0["pressure"], t0["density"] = p, rho
        t1 = f.create_group("t1_fields")
        t1.attrs.create("field_names", np.array(["velocity"], dtype=object), dtype=str_t)
        t1["velocity"] = vel
        for ds in (t0["pressure"], t0["density"], t1["velocity"]):
            ds.attrs.update({"time_varying": True, "sample_varying": True})
        f.create_group("t2_fields").attrs.create("field_names", np.array([], dtype=object), dtype=str_t)
    return [np.stack([p[i], rho[i], vel[i, ..., 0], vel[i, ..., 1]], -1) for i in range(b)]


def make_well(d: Path) -> tuple[Path, list[np.ndarray], list[str]]:
    """A The Well dataset directory: data/train (3 trajectories) and data/valid (2 -> test split)."""
    root = d / "toy" / "data"
    arrays = _well_file(root / "train" / "toy_0.hdf5", 3) + _well_file(root / "valid" / "toy_0.hdf5", 2)
    return root, arrays, ["pressure", "density", "velocity_x", "velocity_y"]


# layout -> (maker, number of train trajectories with --test-fraction 0.4)
LAYOUT_CASES = {
    "fno-mat": (make_fno73, 3),
    "fno-mat-v5": (make_fno5, 3),
    "pdebench-cfd": (make_cfd, 3),
    "pdebench-groups": (make_groups, 3),
    "pdebench-1d": (make_1d, 3),
    "pdearena-ns": (make_pdearena, 3),
    "the-well": (make_well, 3),
}


def _build(src: Path | list[Path], out: Path, **kw) -> dict:
    inputs = [str(s) for s in (src if isinstance(src, list) else [src])]
    return build(BuildConfig(inputs=inputs, out=str(out), progress=False, **kw))


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = build_shards.main([*argv, "--no-progress"] if "--verify" not in argv else list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _tree_bytes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_round_trip_every_layout(tmp_path: Path, case: str) -> None:
    maker, n_train = LAYOUT_CASES[case]
    src, arrays, channels = maker(tmp_path)
    layout = "fno-mat" if case.startswith("fno") else case
    if src.is_file():
        assert detect_layout(src) == layout
    out = tmp_path / "shards"
    # 1 trajectory per shard: exercises multi-shard ordering too.
    m = _build(src, out, test_fraction=0.4, shard_size_mb=1e-6, name="toy")
    assert m["layout"] == layout and m["channels"] == channels
    assert m["shape"] == [T, X, Y if case != "pdebench-1d" else 1, len(channels)]
    assert m["splits"]["train"]["count"] == n_train and m["splits"]["test"]["count"] == R - n_train
    assert len(m["splits"]["train"]["shards"]) == n_train
    train = list(read_trajectories(out, "train"))
    test = list(read_trajectories(out, "test"))
    got = [f for f, _ in train + test]
    assert len(got) == R
    for g, want in zip(got, arrays, strict=True):
        assert g.dtype == np.float32 and g.flags.c_contiguous
        np.testing.assert_array_equal(g, want.astype(np.float32))
    for split, items in (("train", train), ("test", test)):
        for _, meta in items:
            assert meta["channels"] == channels and meta["layout"] == layout and meta["split"] == split
            assert len(meta["t"]) == T and len(meta["x"]) == m["shape"][1] and len(meta["y"]) == m["shape"][2]
            assert isinstance(meta["params"], dict) and "source_file" in meta
    if case in ("fno-mat", "pdebench-cfd", "pdebench-groups", "pdebench-1d"):
        assert [meta["source_index"] for _, meta in train + test] == list(range(R))
        assert train[0][1]["source_file"] == src.name
    if case == "fno-mat":
        assert train[0][1]["params"] == {"nu": 1e-3} and train[0][1]["t"] == [1.0, 2.0, 3.0]
    if case == "pdebench-cfd":
        assert train[0][1]["params"] == {"eta": 0.01, "zeta": 0.01, "M": 0.1}
    if case == "pdearena-ns":
        assert train[0][1]["params"]["buo_y"] == 0.5 and train[0][1]["dt"] == 1.5
    if case == "the-well":
        assert train[0][1]["params"]["Re"] == 100.0
    # Statistics over the training split equal numpy's, in float64.
    stack = np.stack([f for f, _ in train]).astype(np.float64).reshape(-1, len(channels))
    np.testing.assert_allclose(m["stats"]["mean"], stack.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(m["stats"]["std"], stack.std(0), rtol=1e-12)
    np.testing.assert_array_equal(m["stats"]["min"], stack.min(0))
    np.testing.assert_array_equal(m["stats"]["max"], stack.max(0))
    assert schema.read_manifest(out) == m
    assert verify(out, progress=False)["train"] == n_train
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_layout_writers_files_build_and_verify(tmp_path: Path) -> None:
    """Files from the generator's writers (gen_pde) build, verify and keep their values."""
    lw = pytest.importorskip("nestor_ds.synth.layouts")
    for layout, pde in (
        ("fno-mat", "ns"),
        ("fno-mat-v5", "ns"),
        ("pdebench-groups", "dr"),
        ("pdebench-cfd", "cfd"),
        ("pdearena-ns", "ns"),
        ("the-well", "dr"),
    ):
        src = lw.write_dataset(pde, layout, tmp_path / f"{layout}.h5", n=2, res=8, steps=3, seed=1)
        out = tmp_path / f"out-{layout}"
        m = _build(src, out, test_fraction=0.5)
        assert m["shape"][:3] == [3, 8, 8], (layout, m["shape"])
        assert verify(out, progress=False)["train"] >= 1
        if layout == "pdebench-groups":
            with h5py.File(src) as f:
                np.testing.assert_array_equal(next(read_trajectories(out, "train"))[0], f["0000/data"][()])


# ----------------------------------------------------------------------------- determinism, options


def test_rebuild_is_byte_identical_and_worker_independent(tmp_path: Path) -> None:
    src, _, _ = make_groups(tmp_path)
    a = _build(src, tmp_path / "a", shard_size_mb=1e-6)
    b = _build(src, tmp_path / "b", shard_size_mb=1e-6, workers=2)
    assert a == b
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")


def test_seed_permutes_training_split_only(tmp_path: Path) -> None:
    src, _, _ = make_1d(tmp_path)
    plain = _build(src, tmp_path / "plain", test_fraction=0.2)
    s1 = _build(src, tmp_path / "s1", test_fraction=0.2, seed=3, shard_size_mb=1e-6)
    _build(src, tmp_path / "s1b", test_fraction=0.2, seed=3, shard_size_mb=1e-6)
    assert _tree_bytes(tmp_path / "s1") == _tree_bytes(tmp_path / "s1b")
    order = [m["source_index"] for _, m in read_trajectories(tmp_path / "s1", "train")]
    assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3]
    assert [m["source_index"] for _, m in read_trajectories(tmp_path / "s1", "test")] == [4]
    np.testing.assert_allclose(plain["stats"]["mean"], s1["stats"]["mean"], rtol=1e-12)


def test_float16_option(tmp_path: Path) -> None:
    src, arrays, _ = make_cfd(tmp_path)
    m = _build(src, tmp_path / "h", dtype="float16", test_fraction=0.2)
    assert m["dtype"] == "float16"
    got = [f for f, _ in read_trajectories(tmp_path / "h", "train")]
    assert all(g.dtype == np.float16 for g in got)
    for g, want in zip(got, arrays, strict=False):
        np.testing.assert_array_equal(g, want.astype(np.float16))
    stack = np.stack(got).astype(np.float64).reshape(-1, 4)
    np.testing.assert_allclose(m["stats"]["mean"], stack.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(m["stats"]["std"], stack.std(0), rtol=1e-12)
    assert verify(tmp_path / "h", progress=False)["dtype"] == "float16"
    # Values beyond the float16 range are an error naming the file.
    with h5py.File(src, "r+") as f:
        f["density"][1, 0, 0, 0] = 1e6
    with pytest.raises(schema.DataFormatError, match="key .*trajectory 1 overflows float16"):
        _build(src, tmp_path / "h2", dtype="float16")
    assert not (tmp_path / "h2").exists()


def test_skip_bad_counts_nan_trajectories(tmp_path: Path, capsys) -> None:
    src, arrays, _ = make_1d(tmp_path)
    with h5py.File(src, "r+") as f:
        f["tensor"][1, 2, 3] = np.nan
        f["tensor"][3, 0, 0] = np.inf
    out = tmp_path / "skip"
    code, stdout, err = _cli(
        capsys,
        "--input",
        str(src),
        "--out",
        str(out),
        "--skip-bad",
        "--test-fraction",
        "0.2",
        "--shard-size-mb",
        "1e-6",
    )
    assert code == 0, err
    m = schema.read_manifest(out)
    assert m["skipped_bad"] == 2 and m["splits"]["train"]["count"] == 2 and m["splits"]["test"]["count"] == 1
    assert [s["file"] for s in m["splits"]["train"]["shards"]] == ["train-000000.tar", "train-000001.tar"]
    kept = list(read_trajectories(out, "train"))
    assert [meta["source_index"] for _, meta in kept] == [0, 2]
    np.testing.assert_array_equal(kept[1][0], arrays[2])
    assert "2 skipped" in stdout
    assert _cli(capsys, "--verify", str(out))[0] == 0


# ----------------------------------------------------------------------------- bad input


def _bad_unknown(d: Path) -> tuple[Path, list[str], str]:
    p = d / "weird.h5"
    with h5py.File(p, "w") as f:
        f["foo"] = np.zeros(3)
    return p, [], "unknown layout"


def _bad_missing_key(d: Path) -> tuple[Path, list[str], str]:
    p = d / "nou.h5"
    with h5py.File(p, "w") as f:
        f["a"] = np.zeros((4, 4, 2))
    return p, ["--format", "fno-mat"], "missing key 'u'"


def _bad_rank(d: Path) -> tuple[Path, list[str], str]:
    p = d / "rank.mat"
    with h5py.File(p, "w") as f:
        f["u"] = np.zeros((3, 4, 5))
    return p, ["--format", "fno-mat"], "key 'u' has shape (3, 4, 5): expected 4 dims"


def _bad_shape(d: Path) -> tuple[Path, list[str], str]:
    p, _, _ = make_cfd(d)
    with h5py.File(p, "r+") as f:
        del f["Vy"]
        f["Vy"] = np.zeros((R, T, X, Y + 1), np.float32)
    return p, [], f"key 'Vy' has shape ({R}, {T}, {X}, {Y + 1}): expected"


def _bad_unreadable(d: Path) -> tuple[Path, list[str], str]:
    p = d / "junk.h5"
    p.write_bytes(b"not a dataset at all" * 10)
    return p, [], "unreadable"


def _bad_truncated(d: Path) -> tuple[Path, list[str], str]:
    p, _, _ = make_cfd(d)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p, [], "truncated"


def _bad_truncated_mat5(d: Path) -> tuple[Path, list[str], str]:
    p, _, _ = make_fno5(d)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p, [], "MATLAB v5"


def _bad_nan(d: Path) -> tuple[Path, list[str], str]:
    p, _, _ = make_fno73(d)
    with h5py.File(p, "r+") as f:
        f["u"][1, 2, 3, 4] = np.nan  # (T, Y, X, R): trajectory 4
    return p, [], "key 'u' trajectory 4 contains NaN/Inf"


def _bad_well_scalar_time(d: Path) -> tuple[Path, list[str], str]:
    p = d / "toy_0.hdf5"
    _well_file(p, 3)
    with h5py.File(p, "r+") as f:
        del f["dimensions/time"]
        f["dimensions/time"] = np.float32(3.0)  # a scalar: used to crash with IndexError in scan()
    return p, [], "key 'dimensions/time' has shape () dtype float32: expected numbers"


def _bad_well_attr(d: Path) -> tuple[Path, list[str], str]:
    p = d / "toy_0.hdf5"
    _well_file(p, 3)
    with h5py.File(p, "r+") as f:
        f.attrs["n_trajectories"] = "three"
    return p, [], "attr 'n_trajectories' is 'three': expected an integer"


def _bad_fno_t_strings(d: Path) -> tuple[Path, list[str], str]:
    p, _, _ = make_fno73(d)
    with h5py.File(p, "r+") as f:
        del f["t"]
        f["t"] = np.array([b"a", b"b", b"c"])  # optional key, present with the wrong dtype
    return p, [], "key 't' has dtype |S1 shape (3,): expected numbers"


def _bad_groups_grid_strings(d: Path) -> tuple[Path, list[str], str]:
    """Per-sample metadata is only read with the trajectory (in the shard writer), not by scan()."""
    p, _, _ = make_groups(d)
    with h5py.File(p, "r+") as f:
        del f["0003/grid/x"]
        f["0003/grid/x"] = np.array([b"x"] * X)
    return p, ["--shard-size-mb", "1e-6"], "key '0003/grid/x' has dtype |S1 shape (6,): expected numbers"


def _bad_pdearena_short_param(d: Path) -> tuple[Path, list[str], str]:
    """A per-sample key with fewer rows than trajectories: h5py's IndexError becomes a one-line error."""
    p, _, _ = make_pdearena(d)
    with h5py.File(p, "r+") as f:
        del f["train/dt"]
        f["train/dt"] = np.full(1, 1.5)
    return p, [], "key 'train/u', 'train/vx', 'train/vy' trajectory 1: read failed (IndexError: "


def _bad_cfd_coord_compound(d: Path) -> tuple[Path, list[str], str]:
    p, _, _ = make_cfd(d)
    with h5py.File(p, "r+") as f:
        del f["t-coordinate"]
        f["t-coordinate"] = np.zeros(T + 1, dtype=[("a", "f4"), ("b", "f4")])
    return p, [], "key 't-coordinate' has dtype [('a', '<f4'), ('b', '<f4')] shape (4,): expected numbers"


BAD_CASES = {
    "unknown": _bad_unknown,
    "missing": _bad_missing_key,
    "rank": _bad_rank,
    "shape": _bad_shape,
    "unreadable": _bad_unreadable,
    "truncated": _bad_truncated,
    "truncated-mat5": _bad_truncated_mat5,
    "nan": _bad_nan,
    "well-scalar-time": _bad_well_scalar_time,
    "well-attr": _bad_well_attr,
    "fno-t-strings": _bad_fno_t_strings,
    "groups-grid-strings": _bad_groups_grid_strings,
    "pdearena-short-param": _bad_pdearena_short_param,
    "cfd-coord-compound": _bad_cfd_coord_compound,
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line_error_and_leaves_nothing(tmp_path: Path, capsys, case: str) -> None:
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src, extra, needle = BAD_CASES[case](src_dir)
    out = tmp_path / "new" / "deeper" / "out"  # parents a failed build must not leave behind
    code, _, err = _cli(capsys, "--input", str(src), "--out", str(out), *extra)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"build_shards: error: {src}: "), lines[0]
    assert needle in lines[0], lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no temp or parent directory either


def test_failed_build_keeps_parents_that_existed(tmp_path: Path) -> None:
    """Only the parent directories this build created are removed; a successful build keeps its parents."""
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src, _, needle = _bad_nan(src_dir)
    (tmp_path / "have").mkdir()
    with pytest.raises(schema.DataFormatError, match=needle):
        _build(src, tmp_path / "have" / "a" / "b" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["have", "src"]
    assert list((tmp_path / "have").iterdir()) == []
    good, _, _ = make_1d(src_dir)
    _build(good, tmp_path / "have" / "a" / "b" / "out")
    assert (tmp_path / "have" / "a" / "b" / "out" / schema.MANIFEST_NAME).is_file()


@pytest.mark.parametrize(
    "argv",
    [
        ["--shard-size-mb", "inf"],
        ["--shard-size-mb", "nan"],
        ["--shard-size-mb", "0"],
        ["--shard-size-mb", "-1"],
        ["--workers", "-2"],
        ["--workers", "0"],
    ],
)
def test_bad_numeric_options_are_usage_errors(tmp_path: Path, capsys, argv: list[str]) -> None:
    src, _, _ = make_1d(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        build_shards.main(["--input", str(src), "--out", str(out), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert f"argument {argv[0]}: '{argv[1]}': expected" in err.strip().splitlines()[-1], err
    assert not out.exists()


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"shard_size_mb": float("inf")}, "shard size inf MB"),
        ({"shard_size_mb": float("nan")}, "shard size nan MB"),
        ({"workers": -2}, "workers -2"),
        ({"layout": "npz"}, "layout 'npz'"),
    ],
)
def test_build_config_rejects_bad_options(tmp_path: Path, kw: dict, needle: str) -> None:
    src, _, _ = make_1d(tmp_path)
    with pytest.raises(ValueError, match=needle):
        _build(src, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_unexpected_error_is_one_line_and_leaves_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    """Last resort: an exception no handler anticipated (here raised by the stdlib tar writer) still gives
    one line, a non-zero exit, and no output, temp or parent directory."""
    (tmp_path / "src").mkdir()
    src, _, _ = make_1d(tmp_path / "src")

    def broken_addfile(self, tarinfo, fileobj=None):
        raise ZeroDivisionError("boom\nsecond line")

    monkeypatch.setattr(tarfile.TarFile, "addfile", broken_addfile)
    out = tmp_path / "new" / "out"
    code, _, err = _cli(capsys, "--input", str(src), "--out", str(out))
    assert code == 1
    assert err.strip().splitlines() == ["build_shards: error: ZeroDivisionError: boom (please report)"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_bad_input_keeps_existing_output_and_cli_exit_code(tmp_path: Path) -> None:
    """Subprocess run: real exit status; a failed --overwrite rebuild leaves the old dataset intact."""
    src, _, _ = make_1d(tmp_path)
    out = tmp_path / "out"
    _build(src, out)
    before = _tree_bytes(out)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"garbage")
    r = subprocess.run(
        [sys.executable, "-m", "nestor_ds.shards", "--input", str(bad), "--out", str(out), "--overwrite"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 1 and r.stderr.startswith(f"build_shards: error: {bad}: unreadable"), r.stderr
    assert _tree_bytes(out) == before


# ----------------------------------------------------------------------------- verify


def test_verify_catches_a_changed_byte(tmp_path: Path, capsys) -> None:
    src, _, _ = make_groups(tmp_path)
    out = tmp_path / "v"
    _build(src, out, shard_size_mb=1e-6)
    code, stdout, _ = _cli(capsys, "--verify", str(out))
    assert code == 0 and "ok" in stdout
    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01  # inside the first member's payload
    shard.write_bytes(bytes(data))
    code, _, err = _cli(capsys, "--verify", str(out))
    assert code == 1
    assert err.strip() == err.strip().splitlines()[0]
    assert f"{shard}: sha256" in err


def test_verify_catches_wrong_count_and_unlisted_shard(tmp_path: Path) -> None:
    src, _, _ = make_1d(tmp_path)
    out = tmp_path / "v"
    m = _build(src, out, shard_size_mb=1e-6)
    m["splits"]["train"]["shards"][0]["count"] = 2
    m["splits"]["train"]["count"] += 1
    schema.write_manifest(out, m)
    with pytest.raises(schema.DataFormatError, match="train-000000.tar: holds 1 samples: manifest says 2"):
        verify(out, progress=False)
    (out / "train-000099.tar").write_bytes(b"")
    with pytest.raises(schema.DataFormatError, match="train-000099.tar: shard file not listed"):
        verify(out, progress=False)


def test_cli_help_and_usage_errors() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "nestor_ds.shards", "--help"], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0 and "--verify" in r.stdout and "--skip-bad" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "nestor_ds.shards", "--out", "x"], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 2


def test_build_streams_with_bounded_memory(tmp_path: Path) -> None:
    """A 210 MiB PDEBench-CFD file builds with peak RSS far below its size (< 25% of it): trajectories are streamed.

    The build runs in a fresh interpreter that reports its own peak RSS (ru_maxrss of RUSAGE_SELF); the
    baseline is the same script on a tiny file, so imports (torch is not among them) are not counted.
    """
    n, t, xy = 40, 21, 128
    big = tmp_path / "2D_CFD_Rand_M0.1_Eta0.01_Zeta0.01_periodic_128_Train.hdf5"
    rng = np.random.default_rng(0)
    with h5py.File(big, "w") as f:  # written one trajectory at a time: the test itself stays small
        dsets = {k: f.create_dataset(k, (n, t, xy, xy), dtype=np.float32) for k in ("Vx", "Vy", "density", "pressure")}
        for i in range(n):
            for ds in dsets.values():
                ds[i] = rng.random((t, xy, xy), dtype=np.float32)
        f["x-coordinate"] = np.linspace(0, 1, xy, dtype=np.float32)
        f["y-coordinate"] = np.linspace(0, 1, xy, dtype=np.float32)
        f["t-coordinate"] = np.linspace(0, 1, t + 1, dtype=np.float32)
    size = big.stat().st_size
    assert size > 200 * 2**20
    small, _, _ = make_cfd(tmp_path)
    script = textwrap.dedent("""
        import resource, sys
        from nestor_ds.shards.build import BuildConfig, build
        m = build(BuildConfig(inputs=[sys.argv[1]], out=sys.argv[2], progress=False, test_fraction=0.1))
        print(m["splits"]["train"]["count"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """)

    def peak_rss(src: Path, out: Path) -> tuple[int, int]:
        r = subprocess.run(
            [sys.executable, "-c", script, str(src), str(out), str(ROOT)], capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, r.stderr
        count, rss = map(int, r.stdout.split())
        return count, rss

    try:
        _, base = peak_rss(small, tmp_path / "small")
        count, peak = peak_rss(big, tmp_path / "big")
        assert count == 36
        shards = list((tmp_path / "big").glob("*.tar"))
        assert sum(p.stat().st_size for p in shards) > size  # everything was written (float32, + headers)
        assert peak - base < 0.25 * size, f"peak RSS {peak / 2**20:.0f} MiB vs baseline {base / 2**20:.0f} MiB"
        # Measured: ~6 MiB above the baseline (a few trajectories of ~5.5 MiB), vs 210 MiB of input.
    finally:
        big.unlink()
        for p in (tmp_path / "big").glob("*"):
            p.unlink()


# ----------------------------------------------------------------------------- export_checkpoint CLI


def _load_export_cli():
    from nestor_ds.checkpoint import cli

    return cli


def test_export_cli_bad_checkpoint_is_one_line_without_progress_bar(tmp_path: Path, capsys) -> None:
    """The checkpoint is resolved before the progress bar opens: no stray `export: 0%|` line before the error.

    (Kept here with the other data-tool CLI checks; tests/test_export.py covers the export itself.)
    """
    pytest.importorskip("torch")
    cli = _load_export_cli()
    (tmp_path / "step_1").mkdir()
    (tmp_path / "step_1" / "mp_rank_00_model_states.pt").write_bytes(b"")
    cases = [
        (tmp_path / "nope", "no such file"),
        (tmp_path / "empty", "not a checkpoint"),
        (tmp_path / "step_1", "nestor_config.json: missing"),
    ]
    (tmp_path / "empty").mkdir()
    for ckpt, needle in cases:
        code = cli.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x.safetensors")])
        err = capsys.readouterr().err
        assert code == 2
        assert err.strip().splitlines() == [err.strip()] and err.startswith(
            "python -m nestor_ds.checkpoint: error: "
        ), err
        assert needle in err and "%|" not in err, err
    assert not (tmp_path / "x.safetensors").exists()


def test_worker_error_crosses_process_pool_and_cleans_up(tmp_path: Path) -> None:
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src, _, needle = _bad_nan(src_dir)
    with pytest.raises(schema.DataFormatError, match=needle) as err:
        _build(src, tmp_path / "out", shard_size_mb=1e-6, workers=2)
    assert err.value.file == str(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ----------------------------------------------------------------------------- concurrent and repeated builds
# (issue 11 §3)


def test_second_build_into_a_locked_output_stops_with_a_line(tmp_path: Path, capsys) -> None:
    """The lock is a real flock held by this process, as a running build holds it."""
    import fcntl

    src, _, _ = make_cfd(tmp_path)
    out = tmp_path / "out"
    with open(tmp_path / ".out.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, _, err = _cli(capsys, "--input", str(src), "--out", str(out))
    assert code == 1 and "another build into this output is running" in err and not out.exists(), err
    assert _cli(capsys, "--input", str(src), "--out", str(out))[0] == 0  # released: builds


def test_two_concurrent_builds_never_both_succeed(tmp_path: Path) -> None:
    """Two real build processes into one --out: A is frozen (SIGSTOP) in the middle of its build while B runs,
    then resumed. Exactly one may succeed and the output must be the winner's dataset (before the lock both
    reported success and B's dataset was silently replaced)."""
    import signal
    import time

    n = 48
    src_a = tmp_path / "a.hdf5"
    with h5py.File(src_a, "w") as f:  # ~12 MB: the build takes long enough to be caught in the middle
        for k in ("density", "pressure", "Vx", "Vy"):
            f[k] = np.full((n, 8, 48, 32), 1.0, dtype=np.float32) + np.arange(n, dtype=np.float32)[:, None, None, None]
    src_b = make_cfd(tmp_path)[0]
    out = tmp_path / "out"
    tool = [sys.executable, "-m", "nestor_ds.shards", "--no-progress", "--out", str(out)]
    a = subprocess.Popen(
        [*tool, "--input", str(src_a), "--name", "a", "--shard-size-mb", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        end = time.monotonic() + 120  # a bound against hanging, not a timing assertion
        while a.poll() is None and not list(tmp_path.glob(".out.building-*")) and time.monotonic() < end:
            time.sleep(0.005)
        a.send_signal(signal.SIGSTOP)
        b = subprocess.run([*tool, "--input", str(src_b), "--name", "b"], capture_output=True, text=True, timeout=300)
    finally:
        a.send_signal(signal.SIGCONT)
    a_err = a.communicate(timeout=300)[1]
    results = {"a": (a.returncode, a_err), "b": (b.returncode, b.stderr)}
    winners = [k for k, (rc, _) in results.items() if rc == 0]
    assert len(winners) == 1, results
    loser_err = next(err for rc, err in results.values() if rc != 0)
    assert "another build into this output is running" in loser_err or "is not empty" in loser_err, loser_err
    assert verify(out)["name"] == winners[0]


def test_final_rename_rechecks_the_output(tmp_path: Path) -> None:
    from nestor_ds.shards.output import swap_into_place

    tmp, out = tmp_path / ".out.building-1", tmp_path / "out"
    tmp.mkdir()
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # published by someone else meanwhile
    with pytest.raises(schema.DataFormatError, match="output appeared while this build ran"):
        swap_into_place(tmp, out, overwrite=False)
    assert (out / "manifest.json").read_text() == "{}"


def test_one_file_by_two_paths_is_read_once(tmp_path: Path, caplog) -> None:
    src_dir = tmp_path / "raw"
    src_dir.mkdir()
    src, arrays, _ = make_cfd(src_dir)
    (tmp_path / "link.hdf5").symlink_to(src)
    m = _build([src, src_dir / ".." / "raw" / src.name, tmp_path / "link.hdf5"], tmp_path / "out", test_fraction=0.4)
    assert m["splits"]["train"]["count"] + m["splits"]["test"]["count"] == len(arrays)
    assert "is the same file as" in caplog.text


def test_plan_refuses_a_trajectory_in_both_splits(tmp_path: Path) -> None:
    from nestor_ds.shards.build import assign_splits, check_disjoint, scan_sources

    src, _, _ = make_cfd(tmp_path)
    infos = scan_sources([str(src), str(tmp_path / "." / src.name)], "auto")  # bypassing the input de-duplication
    with pytest.raises(schema.DataFormatError, match="is in both the train and the test split"):
        check_disjoint(assign_splits(infos, 0.5, None))


def test_stale_temporary_dirs_of_dead_builds_are_removed(tmp_path: Path, capsys, caplog) -> None:
    src, _, _ = make_cfd(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    stale = tmp_path / f".out.building-{pid}"
    stale.mkdir()
    (stale / "train-000000.tar").write_bytes(b"half")
    code, _, err = _cli(capsys, "--input", str(src), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert not stale.exists() and f"removed {stale}" in caplog.text


def _fno_partial(path: Path, declared: int, written: int) -> None:
    """A v7.3 FNO file whose writer declared `declared` trajectories and stopped after `written`."""
    with h5py.File(path, "w", userblock_size=512) as f:
        u = f.create_dataset("u", shape=(T, Y, X, declared), dtype="f4", chunks=(T, Y, X, 1), maxshape=(T, Y, X, None))
        if written:
            u[..., :written] = RNG.standard_normal((T, Y, X, written)).astype(np.float32)


@pytest.mark.parametrize("declared, written", [(8, 3), (10**9, 2)], ids=["interrupted", "huge-declared"])
def test_unwritten_hdf5_storage_is_refused(tmp_path: Path, capsys, declared: int, written: int) -> None:
    src = tmp_path / "ns_V1e-3_partial.mat"
    _fno_partial(src, declared, written)
    code, _, err = _cli(capsys, "--input", str(src), "--out", str(tmp_path / "out"), "--format", "fno-mat")
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert (
        line.startswith(f"build_shards: error: {src}: key 'u'")
        and f"{declared - written} of its {declared} trajectories were never written" in line
    ), line


def test_zero_trajectories_says_so(tmp_path: Path, capsys) -> None:
    src = tmp_path / "ns_V1e-3_empty.mat"
    _fno_partial(src, 0, 0)
    code, _, err = _cli(capsys, "--input", str(src), "--out", str(tmp_path / "out"), "--format", "fno-mat")
    assert code == 1 and "0 trajectories" in err, err
