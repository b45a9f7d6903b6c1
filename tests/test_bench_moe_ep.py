"""tools/bench_moe_ep.py's `profiled` input: rows shifted until rank 0's experts get the share a routing profile
measured, with its padding fraction; checked on the shift alone and on a real 2-rank run (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools.bench_moe_ep import rank0_share, shift_for_share

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("target", [0.56, 0.7])
def test_shift_gives_rank0_the_target_share(target):
    gate_ED = torch.randn(6, 64, generator=torch.Generator().manual_seed(3)) * 0.05
    shift, reached = shift_for_share(gate_ED, target, k=2)
    assert reached == pytest.approx(target, abs=0.01)
    # on fresh rows, not the calibration sample: the share carries over
    x = torch.randn(8192, 64, generator=torch.Generator().manual_seed(11)) + shift
    assert rank0_share(x, gate_ED, 2) == pytest.approx(target, abs=0.02)


def test_a_target_below_the_unshifted_share_needs_no_shift():
    gate_ED = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    shift, reached = shift_for_share(gate_ED, 0.0, k=2)
    assert torch.count_nonzero(shift) == 0 and 0.0 < reached < 1.0


def test_profiled_input_on_two_ranks_matches_the_profile(tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"ep": {"2": {"rank_imbalance": 1.2, "padding_fraction": 0.125}}}))
    cmd = [sys.executable, "-m", "tools.bench_moe_ep", "--tokens", "256", "--reps", "1", "--scenarios", "tokens"]
    cmd += ["--contenders", "new", "legacy", "local", "--profile", str(profile), "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout)["profiled"]["256"]
    assert row["padding_fraction"] == 0.125  # 32 of 256 rows
    assert row["rank0_expert_share"] == pytest.approx(0.6, abs=0.05)  # imbalance 1.2 = rank 0 gets 0.6
    assert row["ratio_vs_local_ep1"] > 0 and row["new"]["all_to_all_bytes_per_rank"] > 0
    # the ceiling is local ep 1 against the legacy layer, and the speedup factors through it
    rate = {name: row[name]["tokens_per_s_per_rank"] for name in ("new", "legacy", "local")}
    assert row["ceiling_vs_legacy"] == pytest.approx(rate["local"] / rate["legacy"], rel=1e-9)
    assert row["speedup_vs_legacy"] == pytest.approx(row["ratio_vs_local_ep1"] * row["ceiling_vs_legacy"], rel=1e-9)
    # the legacy layer routes, sends and computes the padding rows: it moves more bytes than the new path
    assert row["legacy"]["all_to_all_bytes_per_rank"] > row["new"]["all_to_all_bytes_per_rank"]


def test_a_profile_without_an_ep2_row_is_refused(tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"ep": {"3": {}}}))
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench_moe_ep", "--profile", str(profile)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no ep 2 row" in proc.stderr


def test_one_device_compares_local_with_the_legacy_layer_in_one_process(tmp_path):
    """`--one-device` (what tools.gpu_check runs on a GPU): no ranks, local ep 1 against the legacy layer at ep 1,
    same routing; here on the CPU in fp32."""
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"ep": {"2": {"rank_imbalance": 1.2, "padding_fraction": 0.125}}}))
    cmd = [sys.executable, "-m", "tools.bench_moe_ep", "--one-device", "--tokens", "256", "--reps", "1", "--json"]
    proc = subprocess.run(cmd + ["--profile", str(profile)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert (result["device"], result["dtype"]) == ("cpu", "float32")
    for scenario, padding in (("tokens", 0.0), ("skewed_padded", 0.25), ("profiled", 0.125)):
        row = result[scenario]["256"]
        assert set(row) >= {"local", "legacy", "ceiling_vs_legacy"} and "new" not in row
        assert row["padding_fraction"] == padding
        rate = {name: row[name]["tokens_per_s_per_rank"] for name in ("local", "legacy")}
        assert row["ceiling_vs_legacy"] == pytest.approx(rate["local"] / rate["legacy"], rel=1e-9)
    # the skewed input's largest expert gets more than a balanced router gives it
    assert result["skewed_padded"]["256"]["max_expert_share"] > result["tokens"]["256"]["max_expert_share"] + 0.1


def test_gpu_check_legacy_part_reads_the_one_device_result():
    """tools.gpu_check's `legacy` part (run on a GPU) is the one-device bench in a child process, its stdout parsed
    as JSON: here on the CPU with a small input, on the trained-routing profile it ships with."""
    from tools.gpu_check import legacy_ceiling

    result = legacy_ceiling(tokens=(256,), reps=1)
    assert "error" not in result, result
    assert result["profiled"]["profile"]["file"].endswith("nestor-64-s0-b480.json")
    assert result["profiled"]["256"]["ceiling_vs_legacy"] > 0
