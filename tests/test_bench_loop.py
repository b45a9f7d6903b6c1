"""tools/bench_loop.py: the product's own set-up (`start_training`) and the bare loop, stepped side by side in one
process on tiny real shards; checks the JSON it prints (not the timings, which depend on the machine)."""

from __future__ import annotations

import json
import statistics
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
        [*cmd, "--rounds", "3", "--steps", "2", "--warmup", "1", "--json"], capture_output=True, text=True, timeout=580
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["samples_per_step"] == 2 and result["threads"] == 1 and result["tracking"] is False
    product, bare = result["product_ms_per_step"], result["bare_ms_per_step"]
    assert len(product) == len(bare) == 3
    assert all(v > 0 for v in product + bare)
    # the summary recomputed from the per-round times it printed: median and extremes of product / bare per round
    # (3 rounds: the median is no mean). The times are rounded to 0.01 ms, the ratios to 0.001: each printed ratio
    # must lie within what that rounding allows: a swapped ratio is caught, and a mean unless the ratios are symmetric
    low = [(p - 0.005) / (b + 0.005) for p, b in zip(product, bare, strict=True)]
    high = [(p + 0.005) / (b - 0.005) for p, b in zip(product, bare, strict=True)]
    for value, (lo, hi) in [
        (result["product_over_bare"], (statistics.median(low), statistics.median(high))),
        (result["product_over_bare_spread"][0], (min(low), min(high))),
        (result["product_over_bare_spread"][1], (max(low), max(high))),
    ]:
        assert lo - 0.0005 <= value <= hi + 0.0005, (value, lo, hi, result)
    # a missing config is one line naming it, before anything is built
    err = subprocess.run(
        [sys.executable, "-m", "tools.bench_loop", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert err.returncode == 2 and "nope.yaml" in err.stderr and len(err.stderr.strip().splitlines()) == 1
