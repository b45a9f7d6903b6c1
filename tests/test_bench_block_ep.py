"""tools/bench_block_ep.py on 2 gloo ranks: both paths run, and one exchange per block makes 4 forward collectives
per block (the group-size all_reduce, the count exchange, the row exchange and its inverse) where the per-call path
makes 1 + 3 per called image expert. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_one_exchange_per_block_makes_fewer_collectives():
    cmd = [sys.executable, "-m", "tools.bench_block_ep", "--micro-batch", "4", "--rounds", "1", "--steps", "1"]
    proc = subprocess.run([*cmd, "--json"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    calls = result["forward_collectives_per_step"]
    depth = 2  # the study's nestor-64
    assert calls["one_exchange"] == 4 * depth
    assert calls["per_call"] > calls["one_exchange"] and (calls["per_call"] - depth) % 3 == 0
    step_s = result["step_s"]
    assert set(step_s) == {"per_call", "one_exchange"} and len(step_s["per_call"]) == len(step_s["one_exchange"]) == 1
    # speedup = per-call time / one-exchange time (not its inverse), recomputed from the times it printed
    assert result["speedup"] == result["speedup_per_round"][0] == step_s["per_call"][0] / step_s["one_exchange"][0]
