"""tools/bench_loop.py: the product's own set-up (`start_training`) and the bare loop, stepped side by side in one
process on tiny real shards; checks the JSON it prints (not the timings, which depend on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from train_fixtures import ds_config, tiny_config

pytestmark = pytest.mark.timeout(600)


def test_bench_loop_steps_product_and_bare_side_by_side(tiny_shards, tmp_path):
    root, shards = tiny_shards
    cfg = tiny_config(tmp_path, shards, train={"threads_per_rank": 1})
    ds = ds_config(tmp_path, stage=0, micro=2)
    cmd = [sys.executable, "-m", "tools.bench_loop", "--config", str(cfg), "--ds_config", str(ds)]
    out = subprocess.run(
        [*cmd, "--rounds", "2", "--steps", "2", "--warmup", "1", "--json"], capture_output=True, text=True, timeout=580
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["samples_per_step"] == 2 and result["threads"] == 1 and result["tracking"] is False
    assert len(result["product_ms_per_step"]) == len(result["bare_ms_per_step"]) == 2
    assert all(v > 0 for v in result["product_ms_per_step"] + result["bare_ms_per_step"])
    lo, hi = result["product_over_bare_spread"]
    assert lo <= result["product_over_bare"] <= hi
    # a missing config is one line naming it, before anything is built
    err = subprocess.run(
        [sys.executable, "-m", "tools.bench_loop", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert err.returncode == 2 and "nope.yaml" in err.stderr and len(err.stderr.strip().splitlines()) == 1
