"""Equal-compute study: a matrix {model} x {seed} x {budget} trained and scored through the real pipeline.

    python -m tools.study --spec configs/study_cpu32.yaml            # docs/study/cpu32/ (resumable)
    python -m tools.study --quick --out /tmp/study_quick              # four tiny trials, about a minute
    python -m tools.study --spec configs/study_cpu32.yaml --report-only

Every trial runs the commands a user runs: ``python -m nestor_ds.synth`` -> ``python -m nestor_ds.shards`` ->
``python -m nestor_ds.train`` (one process, ZeRO-0, a wall-clock budget ``train.time_budget_s`` that the learning-rate
schedule follows) -> ``python -m nestor_ds.evaluate`` on the test split. A trial whose record exists is skipped, so an
interrupted study continues where it stopped.

Side by side: with ``parallel: N`` in the spec, N consecutive trials of the plan (the models of one seed and budget)
run at the same time, each with ``train.threads_per_rank`` threads (1 on a 2-core machine). On a shared machine whose
speed drifts over minutes this is what makes two models' budgets equal: both see the same machine.

Recipe search: the spec's ``search:`` section trains variants (a model of ``models:`` plus config overrides) and
scores them on the validation split only (no test evaluation), so hyper-parameters are never chosen on test.

Splits: each family's data comes from two seeded raw files. The first holds train + validation trajectories and
is built with the validation share as its `test` split (the validation split is cut from the training file);
the second holds the test trajectories. Training reads the first's train split, the trainer's final evaluation
scores the validation split (what hyper-parameters may be chosen on), and only ``evaluate`` reads the test split.

The report (``report.md`` + PNG figures, written by ``tools/study_report.py``) is rebuilt from the trial records:
``trials/<id>.json``, or packed in ``trials.jsonl.xz`` for the repository (``tools/study_records.py``).
This module plans and schedules the trials; ``tools/study_data.py`` builds the data and ``tools/study_trials.py`` runs
one trial.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tools.study_data import ROOT, build_data
from tools.study_trials import Trial, run_trial

QUICK_SPEC = ROOT / "configs" / "study_quick.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--spec",
        default=None,
        help="study YAML (see configs/study_cpu32.yaml); default with --quick: configs/study_quick.yaml",
    )
    p.add_argument("--quick", action="store_true", help="the tiny study (CI, four trials); implies --spec study_quick")
    p.add_argument("--out", default=None, help="report directory (default docs/study/<name>)")
    p.add_argument("--work", default=None, help="data and run directory (default .cache/study/<name>)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the trial records and exit")
    p.add_argument("--only", default=None, metavar="SUBSTRING", help="run only trials whose id contains this")
    args = p.parse_args(argv)
    if args.spec is None:
        if not args.quick:
            p.error("give --spec FILE or --quick")
        args.spec = str(QUICK_SPEC)
    return args


def load_spec(path: str) -> dict[str, Any]:
    """The study YAML with its required keys checked (one line naming the key on error)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--spec {p}: file not found")
    spec = yaml.safe_load(p.read_text()) or {}
    for key in ("name", "data", "models", "seeds", "budgets_s"):
        if key not in spec:
            raise ValueError(f"{p}: missing key '{key}'")
    data = spec["data"]
    for key in ("families", "resolution", "frames", "t_in", "train", "val", "test"):
        if key not in data:
            raise ValueError(f"{p}: missing key 'data.{key}'")
    if not isinstance(spec["models"], dict) or not spec["models"]:
        raise ValueError(f"{p}: 'models' must map names to config sections")
    for section in ("bare", "usage"):
        for m in (spec.get(section) or {}).get("models", []):
            if m not in spec["models"]:
                raise ValueError(f"{p}: {section}.models names {m!r}, which is not one of models")
    for v, sec in ((spec.get("search") or {}).get("variants") or {}).items():
        if not isinstance(sec, dict) or sec.get("base") not in spec["models"]:
            raise ValueError(f"{p}: search.variants.{v}.base must name one of models")
        if v in spec["models"]:
            raise ValueError(f"{p}: search.variants.{v} has the name of a model; give the variant its own name")
    if int(spec.get("parallel", 1)) < 1:
        raise ValueError(f"{p}: parallel must be >= 1, got {spec.get('parallel')!r}")
    transfer = spec.get("transfer")
    if transfer and transfer.get("held_out") not in data["families"]:
        raise ValueError(f"{p}: transfer.held_out={transfer.get('held_out')!r} is not one of data.families")
    return spec


def make_plan(spec: dict[str, Any]) -> list[Trial]:
    """Every trial of the study in run order: recipe search (validation only), the matrix (budgets outer, then seeds,
    then models: side-by-side batches hold the models of one seed and budget), product-vs-bare pairs, transfer, and
    the `usage:` runs (matrix trials of their own, e.g. re-run later with ``train.usage_every`` to follow expert
    specialisation over training, kept out of the matrix's means)."""
    plan: list[Trial] = []
    search = spec.get("search") or {}
    for b in search.get("budgets_s", [180]):
        for s in search.get("seeds", [0]):
            plan += [(f"search-{v}-s{s}-b{int(b)}", "search", v, s, b) for v in search.get("variants") or {}]
    for b in spec["budgets_s"]:
        for s in spec["seeds"]:
            plan += [(f"{m}-s{s}-b{int(b)}", "matrix", m, s, b) for m in spec["models"]]
    bare = spec.get("bare") or {}
    for s in bare.get("seeds", spec["seeds"]):  # seeds outer: a partial run already covers every model
        for m in bare.get("models", []):
            for b in bare.get("budgets_s", spec["budgets_s"]):
                plan.append((f"gap-{m}-s{s}-b{int(b)}", "gap", m, s, b))
    tr = spec.get("transfer")
    if tr:
        for s in tr.get("seeds", spec["seeds"]):
            for m in tr.get("models", list(spec["models"])):
                plan.append((f"transfer-{m}-s{s}", "transfer", m, s, tr["finetune_budget_s"]))
    usage = spec.get("usage") or {}
    for b in usage.get("budgets_s", []):
        for s in usage.get("seeds", [0]):
            plan += [(f"usage-{m}-s{s}-b{int(b)}", "usage", m, s, b) for m in usage.get("models", [])]
    return plan


def batches(todo: list[Trial], parallel: int) -> list[list[Trial]]:
    """Groups of up to `parallel` consecutive trials of one kind and budget that run at the same time; a gap pair
    (already two processes side by side) runs alone."""
    out: list[list[Trial]] = []
    for t in todo:
        last = out[-1] if out else None
        if last and len(last) < parallel and t[1] != "gap" and (last[0][1], last[0][4]) == (t[1], t[4]):
            last.append(t)
        else:
            out.append([t])
    return out


def main(argv: list[str] | None = None) -> int:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tools import study_records, study_report

    args = parse_args(argv)
    spec = load_spec(args.spec)
    name = spec["name"]
    out = Path(args.out or ROOT / "docs" / "study" / name)
    work = Path(args.work or ROOT / ".cache" / "study" / name).resolve()
    trials_dir = out / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    work.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        if os.environ["MLFLOW_TRACKING_URI"].startswith("sqlite:"):  # schema made once, not by two trials at once
            from mlflow.tracking import MlflowClient

            MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_experiments(max_results=1)
        print(f"study {name}: data -> {work / 'shards'}", flush=True)
        data = build_data(spec, work)
        plan = make_plan(spec)
        finished = study_records.trial_ids(out)  # JSON files and packed records
        done = [p for p in plan if p[0] in finished]
        todo = [p for p in plan if p not in done and (args.only or "") in p[0]]
        skipped = f", {len(plan) - len(done) - len(todo)} not matching --only" if args.only else ""
        print(f"study {name}: {len(plan)} trials, {len(done)} done, {len(todo)} to run{skipped}", flush=True)
        parallel = int(spec.get("parallel", 1))
        for n, batch in enumerate(batches(todo, parallel), 1):
            t0 = time.time()
            print(f"[batch {n}] {' + '.join(t[0] for t in batch)} ...", flush=True)
            failed: list[BaseException] = []
            with ThreadPoolExecutor(len(batch)) as pool:  # a failed trial does not lose its partner's record
                for future in as_completed([pool.submit(run_trial, spec, t, data, work) for t in batch]):
                    if future.exception() is not None:
                        failed.append(future.exception())
                        continue
                    record = future.result()
                    (trials_dir / f"{record['id']}.json").write_text(json.dumps(record, indent=1))
                    scored = record.get("product", record)
                    split = "validation" if record["kind"] == "search" else "test"
                    print(
                        f"[batch {n}] {record['id']}: {split} one-step {scored[split]['mean']['l2re_1step']:.4f} "
                        f"({time.time() - t0:.0f} s)",
                        flush=True,
                    )
            if failed:
                raise failed[0]
    study_report.write_report(spec, out)
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
