"""CFDBench ingest: a tiny case tree in the public layout (written by `nestor_ds.synth.cfdbench`), detected, built
into shards by the real CLI, verified, and read back equal to the written arrays; bad cases give one-line errors.

The tree holds all four problems (cavity, tube, cylinder, dam) with 45 frames per case, so each case gives two
20-frame windows and drops 5 trailing frames; the grid is 16 x 16, and the fields come from the seeded NS solver.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nestor_ds.shards import cli as build_shards
from nestor_ds.shards.ingest import detect_layout, open_reader
from nestor_ds.shards.ingest.cfdbench import CHANNELS, FRAMES
from nestor_ds.shards.read import read_trajectories
from nestor_ds.synth.cfdbench import write_cfdbench
from nestor_ds.synth.solvers import simulate

RES, T_CASE, CASES = 16, 45, 2
PROBLEMS = ("cavity", "tube", "cylinder", "dam")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<root>/<problem>/prop/case000{0,1}` for the four problems; cylinder stored as float64, the rest float32."""
    root = tmp_path_factory.mktemp("cfdbench") / "CFDBench"
    sim = simulate("ns", CASES, RES, T_CASE, seed=3, record_interval=0.05)
    for problem in PROBLEMS:
        write_cfdbench(root, sim, problem, "prop", float64=problem == "cylinder")
    return root


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = build_shards.main([*argv, "--no-progress"] if "--verify" not in argv else list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _expected(case: Path, start: int) -> np.ndarray:
    """What the reader must give for the window at `start`: u, v transposed to [T, X, Y], and a mask that is 0
    exactly where the writer stopped the flow (the obstacle)."""
    u, v = np.load(case / "u.npy"), np.load(case / "v.npy")
    w = slice(start, start + FRAMES)
    fluid = ~((u == 0) & (v == 0)).all(axis=0)  # (height, width): at rest in every frame = solid
    mask = np.broadcast_to(fluid.astype(u.dtype), u[w].shape)
    return np.stack([u[w], v[w], mask], axis=-1).transpose(0, 2, 1, 3)


def test_detect_and_read_each_problem(tree: Path) -> None:
    for problem in PROBLEMS:
        case = tree / problem / "prop" / "case0001"
        assert detect_layout(case / "case.json") == "cfdbench"
        with open_reader(case / "case.json") as reader:
            info = reader.scan()
            assert info.shape == (FRAMES, RES, RES, 3) and info.channels == CHANNELS
            assert [e.local for e in info.entries] == [0, FRAMES]  # 45 frames: two windows, 5 dropped
            for entry, fields, meta in reader.read(info.entries):
                np.testing.assert_array_equal(fields, _expected(case, entry.local))
                assert meta["problem"] == problem and meta["subset"] == "prop"
                assert meta["case"] == f"{problem}/prop/case0001" and meta["frame_start"] == entry.local
                assert meta["params"] == json.loads((case / "case.json").read_text())
                assert len(meta["t"]) == FRAMES and len(meta["x"]) == len(meta["y"]) == RES
        solid = int((fields[0, :, :, 2] == 0).sum())
        assert (solid > 0) == (problem in ("cylinder", "dam")), (problem, solid)


def test_build_verify_and_read_back(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cfdbench"
    code, stdout, err = _cli(
        capsys, "--input", str(tree), "--out", str(out), "--name", "cfdbench", "--test-fraction", "0.25"
    )
    assert code == 0, err
    assert "cfdbench cfdbench shape [20, 16, 16, 3] channels ['u', 'v', 'mask']: 12 train, 4 test" in stdout
    code, stdout, err = _cli(capsys, "--verify", str(out))
    assert code == 0, err
    cases = sorted(tree.rglob("case.json"))  # the builder's input order: sorted paths, then windows in order
    windows = [(c.parent, k * FRAMES) for c in cases for k in range(T_CASE // FRAMES)]
    got = [*read_trajectories(out, "train"), *read_trajectories(out, "test")]
    assert len(got) == len(windows) == 16
    for (case, start), (fields, meta) in zip(windows, got, strict=True):
        assert fields.dtype == np.float32 and meta["layout"] == "cfdbench"
        assert meta["case"] == "/".join(case.parts[-3:]) and meta["frame_start"] == start
        np.testing.assert_array_equal(fields, _expected(case, start).astype(np.float32))
        assert meta["channels"] == list(CHANNELS)


def _copy_case(tree: Path, tmp_path: Path, problem: str = "cylinder") -> Path:
    case = tmp_path / "raw" / problem / "bc" / "case0000"
    shutil.copytree(tree / problem / "prop" / "case0000", case)
    return case


@pytest.mark.parametrize("bad", ["missing_u", "v_shape", "u_rank", "missing_radius", "not_json"])
def test_bad_case_is_one_line_error(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str) -> None:
    case = _copy_case(tree, tmp_path)
    if bad == "missing_u":
        (case / "u.npy").unlink()
        where, what = case / "u.npy", "missing file"
    elif bad == "v_shape":
        np.save(case / "v.npy", np.zeros((T_CASE, RES, RES - 1)))
        shape, like = f"({T_CASE}, {RES}, {RES - 1})", f"({T_CASE}, {RES}, {RES})"
        where, what = case / "v.npy", f"key 'v' has shape {shape}: expected {like} like u.npy"
    elif bad == "u_rank":
        np.save(case / "u.npy", np.zeros((T_CASE, RES)))
        where, what = case / "u.npy", f"key 'u' has shape ({T_CASE}, {RES}): expected 3 dims"
    elif bad == "missing_radius":
        params = json.loads((case / "case.json").read_text())
        del params["radius"]
        (case / "case.json").write_text(json.dumps(params))
        where, what = case / "case.json", "missing key 'radius'"
    else:
        (case / "case.json").write_text("{not json")
        where, what = case / "case.json", "unreadable case parameters"
    out = tmp_path / "out"
    code, _, err = _cli(capsys, "--input", str(tmp_path / "raw"), "--out", str(out))
    assert code == 1 and not out.exists()
    assert err.count("\n") == 1 and err.startswith(f"build_shards: error: {where}: {what}"), err


def test_short_case_and_mixed_grids_are_refused(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = _copy_case(tree, tmp_path, "tube")
    np.save(case / "u.npy", np.load(case / "u.npy")[: FRAMES - 1])
    np.save(case / "v.npy", np.load(case / "v.npy")[: FRAMES - 1])
    code, _, err = _cli(capsys, "--input", str(case / "case.json"), "--out", str(tmp_path / "o1"))
    assert code == 1 and f"{case / 'u.npy'}: key 'u' has shape ({FRAMES - 1}, {RES}, {RES}): expected at least" in err
    other = tmp_path / "raw2" / "cavity" / "geo" / "case0007"
    sim = simulate("ns", 1, RES // 2, FRAMES, seed=1, record_interval=0.05)
    write_cfdbench(other.parents[2], sim, "cavity", "geo", start=7)
    code, _, err = _cli(capsys, "--input", str(tree / "cavity"), str(other.parents[2]), "--out", str(tmp_path / "o2"))
    assert code == 1 and "case.json: trajectories have shape" in err and "(20, 8, 8, 3)" in err, err
