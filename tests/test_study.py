"""tools/study.py --quick: the equal-compute study end to end (gen_pde -> build_shards -> train.py with a time
budget -> evaluate), its report, and that a second call skips the finished trials."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(900)


def test_quick_study_runs_reports_and_resumes(tmp_path):
    out, work = tmp_path / "report", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "tools.study", "--quick", "--out", str(out), "--work", str(work)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=880, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "3 trials, 0 done, 3 to run" in first.stdout
    trials = {p.stem: json.loads(p.read_text()) for p in (out / "trials").glob("*.json")}
    assert set(trials) == {"afno-s0-b4", "nestor-s0-b4", "gap-afno-s0-b4"}
    gap = trials.pop("gap-afno-s0-b4")
    # the bare loop spent the same budget and was scored by the same evaluator on the same test split
    bare, product = gap["bare"], gap["product"]
    assert product["steps"] >= 1 and product["test"]["settings"] == bare["test"]["settings"]
    assert bare["steps"] >= 1 and bare["train_seconds"] >= 4.0 and bare["test"]["settings"]["windows"] == "all"
    assert set(bare["test"]["datasets"]) == {"dr_test", "swe_test"} and 0 < bare["test"]["mean"]["l2re_1step"] < 10
    for t in trials.values():
        assert t["steps"] >= 1 and t["train_seconds"] >= 4.0  # the budget was spent, then the run stopped
        assert set(t["test"]["datasets"]) == {"dr_test", "swe_test"}  # test split: the separately seeded files
        assert set(t["validation"]["datasets"]) == {"dr_dev", "swe_dev"}  # trainer's final eval: validation split
        assert 0 < t["test"]["mean"]["l2re_1step"] < 10 and t["test"]["settings"]["windows"] == "all"
    assert trials["nestor-s0-b4"]["expert_usage"]["0"]["datasets"] == ["dr_dev", "swe_dev"]
    report = (out / "report.md").read_text()
    assert "| afno | 4 | 1 |" in report and "| nestor | 4 | 1 |" in report
    ratio = product["test"]["mean"]["l2re_1step"] / bare["test"]["mean"]["l2re_1step"]
    assert "## Product vs a bare loop" in report and f"| {ratio:.3f} |" in report
    for png in ("l2re_vs_time.png", "l2re_vs_flops.png", "rollout_growth.png", "expert_heatmap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png})" in report
    # every trial is an MLflow run of one experiment (training + its test evaluation)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("study-quick").experiment_id])
    assert {r.info.run_name for r in runs} >= {"afno-s0-b4", "nestor-s0-b4"}
    # resumable: finished trials are skipped, the report is rebuilt from their JSONs
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert second.returncode == 0 and "3 trials, 3 done, 0 to run" in second.stdout, second.stderr[-3000:]
    assert (out / "report.md").read_text() == report
