"""Time and FLOP budgets (nestor_ds/engine/budget.py): the schedule follows the budget, runs stop when it is
spent, ranks agree, and a FLOP-budgeted run resumes exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nestor_ds.engine.budget import Budget
from nestor_ds.engine.optim import OptimConfig, lr_at

from train_fixtures import ds_config, entry_args, launch, tiny_config

TRAIN = "nestor_ds.train"  # run as a module (tests/conftest.py puts the repository on PYTHONPATH)
pytestmark = pytest.mark.timeout(900)


def _ok(proc) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_budget_fraction_schedule_and_checks():
    b = Budget(time_s=None, flops=10.0, flops_per_step=2.0)
    assert [b.fraction(s) for s in (0, 2, 5, 7)] == [0.0, 0.4, 1.0, 1.0]
    assert not b.exhausted(4) and b.exhausted(5) and not b.needs_check(3)
    cfg = OptimConfig(lr=1e-3, warmup_steps=2, schedule="onecycle", final_lr_ratio=0.01)
    # with max_steps far away the budget drives the decay: the final lr is reached when the budget is spent
    assert lr_at(4, 10**9, cfg, fraction=b.fraction(5)) == pytest.approx(1e-5)
    assert lr_at(4, 10**9, cfg, fraction=0.5) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert lr_at(4, 10**9, cfg, fraction=None) == pytest.approx(1e-3, rel=1e-6)
    t = Budget(time_s=10.0, flops=None, flops_per_step=1.0)
    assert t.needs_check(1)  # no step time known yet: agree after the first step
    t.agree(step=1, local_seconds=2.0, steps=1)  # single process: the agreement is the local value
    assert t.seconds == 2.0 and t.step_time == 2.0 and t.fraction(3) == pytest.approx(0.6)
    assert not t.needs_check(2) and t.needs_check(3)  # half of the 4 remaining steps
    assert not t.exhausted(1)
    t.agree(step=6, local_seconds=8.5, steps=5)
    assert t.exhausted(6) and t.metrics(6)["budget/fraction"] == 1.0
    state = t.state(6)
    again = Budget(time_s=10.0, flops=None, flops_per_step=1.0)
    again.load(state, 6)
    assert again.spent_seconds(6) == pytest.approx(10.5) and again.exhausted(6)


def test_flop_budget_stops_anneals_and_resumes_exactly(tiny_shards, tmp_path):
    from nestor_ds.config import load_config
    from nestor_ds.model.flops import account

    root, shards = tiny_shards
    cfg = tiny_config(
        tmp_path,
        shards,
        model={"moe": {"backend": "local"}},
        train={"max_steps": 100, "ckpt_every": 100, "input_noise": 5e-4, "log_every": 1},
        tracking={"enabled": False},
    )
    micro = 2
    per_step = 3.0 * account(load_config(str(cfg)).model).flops_per_sample * micro
    flops = f"train.flop_budget={5.5 * per_step!r}"
    ds = str(ds_config(tmp_path, micro=micro))
    full = launch(
        [TRAIN, "--ds_config", ds, "--config", str(cfg), "--run-name", "full", "--set", flops], ranks=1, cwd=tmp_path
    )
    _ok(full)
    rows = _rows(tmp_path / "runs" / "full")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # 6 x per_step >= 5.5 x per_step: stop after step 6
    assert rows[-1]["budget/fraction"] == 1.0 and rows[-1]["budget/flops"] == pytest.approx(6 * per_step)
    lrs = [r["train/lr"] for r in rows]
    # warm-up 2, then decay to the end
    assert lrs[1] == max(lrs) and all(a > b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    summary = json.loads((tmp_path / "runs" / "full" / "run_summary.json").read_text())
    assert summary["steps"] == 6 and "l2re_1step" in summary["final_eval"]["mean"]
    # resumed half-way: the same steps, the same losses
    cut = launch(
        entry_args(TRAIN, ds, str(cfg), "--run-name", "cut", "--set", flops, "--set", "train.stop_at=3"),
        ranks=1,
        cwd=tmp_path,
    )
    _ok(cut)
    resumed = launch(
        [TRAIN, "--ds_config", ds, "--config", str(cfg), "--run-name", "cut", "--set", flops, "--resume", "auto"],
        ranks=1,
        cwd=tmp_path,
    )
    _ok(resumed)
    again = _rows(tmp_path / "runs" / "cut")
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rows, again, strict=True):
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-6) and a["train/lr"] == b["train/lr"]


def test_time_budget_two_ranks_stop_together(tiny_shards, tmp_path):
    """Both ranks stop at the same step (no deadlock), the run ends finished, the budget is spent."""
    root, shards = tiny_shards
    cfg = tiny_config(
        tmp_path,
        shards,
        model={"moe": {"backend": "local"}},
        train={"max_steps": 100000, "ckpt_every": 100000, "log_every": 50, "time_budget_s": 4},
        tracking={"enabled": False},
    )
    proc = launch(
        [TRAIN, "--ds_config", str(ds_config(tmp_path)), "--config", str(cfg), "--run-name", "t"], ranks=2, cwd=tmp_path
    )
    _ok(proc)
    summary = json.loads((tmp_path / "runs" / "t" / "run_summary.json").read_text())
    assert 1 <= summary["steps"] < 100000 and summary["budget/fraction"] == 1.0
    assert summary["budget/seconds"] >= 4.0
    assert "budget spent at step" in proc.stderr
