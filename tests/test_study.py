"""tools/study.py --quick: the equal-compute study end to end (gen_pde -> build_shards -> train.py with a time
budget -> evaluate), its report, and that a second call skips the finished trials, also once packed; the committed
cpu32 study's report is what its packed trials give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train_fixtures import reference_mi_bits

pytestmark = pytest.mark.timeout(900)


def test_quick_study_runs_reports_and_resumes(tmp_path):
    out, work = tmp_path / "report", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "tools.study", "--quick", "--out", str(out), "--work", str(work)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=880, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "4 trials, 0 done, 4 to run" in first.stdout
    trials = {p.stem: json.loads(p.read_text()) for p in (out / "trials").glob("*.json")}
    assert set(trials) == {"search-nestor-lr2e3-s0-b4", "afno-s0-b4", "nestor-s0-b4", "gap-afno-s0-b4"}
    gap = trials.pop("gap-afno-s0-b4")
    # the recipe-search variant: its base model with the override, scored on validation only (no test report)
    search = trials.pop("search-nestor-lr2e3-s0-b4")
    assert search["overrides"]["optim"]["lr"] == 2.0e-3 and search["overrides"]["model"]["preset"] == "nestor-tiny"
    assert "test" not in search and set(search["validation"]["datasets"]) == {"dr_dev", "swe_dev"}
    assert not (work / "reports" / "search-nestor-lr2e3-s0-b4.json").exists()
    # parallel: 2 -> the matrix's two models ran at the same time, one thread each
    a, b = trials["afno-s0-b4"], trials["nestor-s0-b4"]
    assert max(a["started"], b["started"]) < min(a["ended"], b["ended"]) and a["threads_per_rank"] == 1
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
    assert (
        "## Recipe search (validation split only)" in report
        and "| nestor-lr2e3 | nestor | nestor + {optim: {lr: 0.002}} |" in report
    )
    assert "trials ran 2 at a time side by side" in report
    mi = trials["nestor-s0-b4"]["expert_usage"]["0"]["mi_bits"]
    assert f"nestor block 0: {mi:.3f}. Heat map: nestor-s0-b4." in report  # one seed: the value, no spread
    # specialisation over training: a record every 5 steps (train.usage_every) and one at the end
    curve = trials["nestor-s0-b4"]["usage_curve"]
    steps = [r["step"] for r in curve]
    assert len(curve) >= 2 and steps[-1] == trials["nestor-s0-b4"]["steps"], steps
    assert all(s % 5 == 0 for s in steps[:-1])
    for r in curve:  # each record's mutual information is that of its own counts
        assert r["mi_bits"]["0"] == pytest.approx(reference_mi_bits(r["dataset_expert"]["0"]), abs=1e-9)
    assert curve[-1]["mi_bits"]["0"] == mi  # the end of the run: run_summary.json's usage is the last record
    assert "### Over training" in report and f"nestor-s0-b4 block 0: {curve[0]['mi_bits']['0']:.3f} at" in report
    from nestor_ds.tracking import mutual_information_bits

    pooled = mutual_information_bits(sum(np.array(r["dataset_expert"]["0"]) for r in curve))  # counts of all records
    assert f"pooled over the run {pooled:.3f}" in report
    assert trials["afno-s0-b4"]["usage_curve"] == []  # no experts, no records
    r1 = trials["nestor-s0-b4"]["test"]["mean"]["l2re_1step"] / trials["afno-s0-b4"]["test"]["mean"]["l2re_1step"]
    rr = trials["nestor-s0-b4"]["test"]["mean"]["l2re_rollout"] / trials["afno-s0-b4"]["test"]["mean"]["l2re_rollout"]
    assert "## NESTOR vs AFNO at equal wall-clock" in report and f"| afno | nestor | {r1:.3f} / {rr:.3f} |" in report
    for png in (
        "l2re_vs_time.png",
        "l2re_vs_flops.png",
        "rollout_growth.png",
        "expert_heatmap.png",
        "specialisation_over_training.png",
    ):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png})" in report
    # every trial is an MLflow run of one experiment (training + its test evaluation)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("study-quick").experiment_id])
    assert {r.info.run_name for r in runs} >= {"afno-s0-b4", "nestor-s0-b4"}
    # resumable: finished trials are skipped, the report is rebuilt from their records, here once packed into
    # trials.jsonl.xz as the repository keeps them (tools/study_records.py)
    from tools.study_records import PACKED, pack

    csv_before = (out / "trials.csv").read_text()
    pack(out)
    assert not (out / "trials").exists() and (out / PACKED).is_file()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert second.returncode == 0 and "4 trials, 4 done, 0 to run" in second.stdout, second.stderr[-3000:]
    assert (out / "report.md").read_text() == report and (out / "trials.csv").read_text() == csv_before


def test_committed_study_report_is_what_its_packed_trials_give(tmp_path):
    """docs/study/cpu32 keeps its trials packed (trials.jsonl.xz, loss curves thinned); its report.md, trials.csv
    and study.json, which docs/study.md and README quote, are rebuilt from them unchanged."""
    import shutil

    import yaml

    from tools.study_records import PACKED, load_trials
    from tools.study_report import write_report

    study = Path(__file__).resolve().parents[1] / "docs" / "study" / "cpu32"
    assert not (study / "trials").exists(), "pack the trials: python -m tools.study_records docs/study/cpu32 --pack"
    shutil.copy(study / PACKED, tmp_path / PACKED)
    spec = yaml.safe_load((study.parents[2] / "configs" / "study_cpu32.yaml").read_text())
    write_report(spec, tmp_path)
    assert len(load_trials(tmp_path)) == 62
    for name in ("report.md", "trials.csv", "study.json"):
        assert (tmp_path / name).read_text() == (study / name).read_text(), name


def test_head_to_head_crossings_follow_the_power_laws():
    """The report's NESTOR-vs-AFNO row: ratios per budget, where the two power laws cross, and the step cost NESTOR
    would need (checked against values worked out by hand for laws err = c * x^b)."""
    from tools.study_report import head_to_head_section

    def trial(err, steps, flops):
        return {"test": {"mean": {"l2re_1step": err, "l2re_rollout": 2 * err}}, "steps": steps, "train_flops": flops}

    # AFNO: err = 0.1 * steps^-0.2 at 100 and 400 s (10 ms per step); NESTOR: err = 1.0 * steps^-0.4 (40 ms per step)
    groups = {
        ("afno", 100.0): [trial(0.1 * 10000**-0.2, 10000, 1e12)],
        ("afno", 400.0): [trial(0.1 * 40000**-0.2, 40000, 4e12)],
        ("nestor", 100.0): [trial(2500**-0.4, 2500, 1e12)],
        ("nestor", 400.0): [trial(10000**-0.4, 10000, 4e12)],
    }
    row = [
        line for line in head_to_head_section({"compare": [["afno", "nestor"]]}, groups) if line.startswith("| afno")
    ]
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    r100, r400 = (2500**-0.4) / (0.1 * 10000**-0.2), (10000**-0.4) / (0.1 * 40000**-0.2)
    assert cells[2] == f"{r100:.3f} / {r100:.3f}" and cells[3] == f"{r400:.3f} / {r400:.3f}"
    # time: where 0.1 (100 t)^-0.2 = (25 t)^-0.4, found by bisection on the laws themselves
    lo, hi = 1.0, 1e9
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if 0.1 * (100 * mid) ** -0.2 < (25 * mid) ** -0.4 else (lo, mid)
    assert cells[4] == f"{lo:.0f}"
    assert cells[5] == "100000"  # steps: 0.1 s^-0.2 = s^-0.4 -> s^0.2 = 10
    assert cells[6] == f"{lo * 1e10 / 1e12:.2f}"  # both models spend 1e10 FLOPs per second here
    # NESTOR now: 400 s / 10000 steps; AFNO reaches NESTOR's 400 s error (10000^-0.4) after (0.1 / 10000^-0.4)^5
    # = 1000 steps = 10 s, so NESTOR's 10000 steps would have to take 1 ms each
    assert cells[7] == "40.00" and cells[8] == "1.00"


@pytest.mark.parametrize("arch", ["nestor", "afno"])
def test_recipe_presets_are_the_study_winners_and_load(arch, tiny_shards):
    """configs/recipe_nestor_small.yaml and configs/recipe_afno_small.yaml carry the model, optimiser and loss of the
    cpu32 study's `nestor-tuned` and `afno-tuned` (common sections <- the model's), and each is a valid run config
    once `data:` names existing shards."""
    import yaml

    from nestor_ds.config import config_from_dict, deep_merge

    repo = Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((repo / "configs" / "study_cpu32.yaml").read_text())
    preset = yaml.safe_load((repo / "configs" / f"recipe_{arch}_small.yaml").read_text())
    study = deep_merge(spec["common"], spec["models"][f"{arch}-tuned"])
    for section in ("model", "optim", "loss"):
        assert preset[section] == study[section], section
    assert preset["train"]["input_noise"] == study["train"]["input_noise"]
    _, shards = tiny_shards
    data = {"datasets": [{"name": n, "path": str(p), "weight": 1.0} for n, p in shards.items()]}
    cfg = config_from_dict(deep_merge(preset, {"data": data}))
    assert cfg.model.depth == preset["model"]["depth"] and cfg.optim.lr == preset["optim"]["lr"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"search": {"variants": {"fast": {"base": "nope"}}}}, "search.variants.fast.base must name one of models"),
        ({"search": {"variants": {"afno": {"base": "afno"}}}}, "search.variants.afno has the name of a model"),
        ({"parallel": 0}, "parallel must be >= 1"),
        ({"bare": {"models": ["nope"]}}, "bare.models names 'nope'"),
        ({"usage": {"models": ["nope"], "budgets_s": [4]}}, "usage.models names 'nope'"),
    ],
)
def test_bad_study_specs_fail_with_one_line_naming_the_key(tmp_path, change, message):
    import yaml

    from tools.study import QUICK_SPEC, load_spec

    spec = {**yaml.safe_load(QUICK_SPEC.read_text()), **change}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=message) as err:
        load_spec(str(path))
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_usage_runs_are_planned_apart_from_the_matrix():
    """`usage:` trials (e.g. re-runs that record expert usage over training) get their own ids and kind, after the
    rest of the plan, in side-by-side batches like the matrix; the matrix is unchanged by them."""
    import yaml

    from tools.study import QUICK_SPEC, batches, make_plan

    spec = yaml.safe_load(QUICK_SPEC.read_text())
    before = make_plan(spec)
    spec["usage"] = {"models": ["afno", "nestor"], "seeds": [0], "budgets_s": [8]}
    plan = make_plan(spec)
    assert plan[: len(before)] == before
    assert plan[len(before) :] == [
        ("usage-afno-s0-b8", "usage", "afno", 0, 8),
        ("usage-nestor-s0-b8", "usage", "nestor", 0, 8),
    ]
    assert batches(plan[len(before) :], 2) == [plan[len(before) :]]
