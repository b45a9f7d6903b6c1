"""Equal-compute study: a matrix {model} x {seed} x {budget} trained and scored through the real pipeline.

    python -m tools.study --spec configs/study_cpu32.yaml            # docs/study/cpu32/ (resumable)
    python -m tools.study --quick --out /tmp/study_quick              # four tiny trials, about a minute
    python -m tools.study --spec configs/study_cpu32.yaml --report-only

Every trial runs the commands a user runs: ``python -m nestor_ds.synth`` -> ``python -m nestor_ds.shards`` ->
``python -m nestor_ds.train`` (one process, ZeRO-0, a wall-clock budget ``train.time_budget_s`` that the learning-rate
schedule follows) -> ``python -m nestor_ds.evaluate`` on the test split. A trial whose JSON exists is skipped, so an
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

The report (``report.md`` + PNG figures, written by ``tools/study_report.py``) is rebuilt from the trial JSONs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from nestor_ds.config import deep_merge  # one merge for run configs
from nestor_ds.engine.report import USAGE_LOG  # the trainer's expert-usage records

ROOT = Path(__file__).resolve().parent.parent

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
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the trial JSONs and exit")
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


def run(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
    """Run one pipeline command, its output in log_path; a failure names the command and the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-5:]
        raise RuntimeError(
            f"study: `{' '.join(cmd[:3])} ...` failed (exit {proc.returncode}); log {log_path}:\n" + "\n".join(tail)
        )


# ---------------------------------------------------------------------------------------------- data


def build_data(spec: dict[str, Any], work: Path) -> dict[str, dict[str, Path]]:
    """Raw files and shards of every family: {family: {"dev": dir (train + validation), "test": dir}}."""
    d = spec["data"]
    out: dict[str, dict[str, Path]] = {}
    py = sys.executable
    for i, fam in enumerate(d["families"]):
        dev, test = work / "shards" / f"{fam}_dev", work / "shards" / f"{fam}_test"
        out[fam] = {"dev": dev, "test": test}
        if (dev / "manifest.json").is_file() and (test / "manifest.json").is_file():
            continue
        raw = work / "raw" / fam
        if raw.exists():
            shutil.rmtree(raw)
        raw.mkdir(parents=True)
        seed = int(d.get("seed", 1000)) + 10 * i
        common = ["--pde", fam, "--res", str(d["resolution"]), "--steps", str(d["frames"]), "--quiet"]
        n_dev = int(d["train"]) + int(d["val"])
        run(
            [
                py,
                "-m",
                "nestor_ds.synth",
                *common,
                "--n",
                str(n_dev),
                "--seed",
                str(seed),
                "--out",
                str(raw / f"{fam}_dev.h5"),
            ],
            work / "logs" / "data.log",
        )
        # the test file holds the test trajectories plus one that lands in its (unused) train split
        run(
            [
                py,
                "-m",
                "nestor_ds.synth",
                *common,
                "--n",
                str(int(d["test"]) + 1),
                "--seed",
                str(seed + 1),
                "--out",
                str(raw / f"{fam}_test.h5"),
            ],
            work / "logs" / "data.log",
        )
        for name, src, frac in (
            (dev, raw / f"{fam}_dev.h5", int(d["val"]) / n_dev),
            (test, raw / f"{fam}_test.h5", int(d["test"]) / (int(d["test"]) + 1)),
        ):
            run(
                [
                    py,
                    "-m",
                    "nestor_ds.shards",
                    "--input",
                    str(src),
                    "--out",
                    str(name),
                    "--name",
                    name.name,
                    "--test-fraction",
                    f"{frac:.6f}",
                    "--overwrite",
                    "--no-progress",
                ],
                work / "logs" / "data.log",
            )
    return out


def data_section(spec: dict[str, Any], data: dict[str, dict[str, Path]], families: list[str]) -> dict[str, Any]:
    """The run config's `data:` for training on `families` (validation = the dev dirs' test split)."""
    d = spec["data"]
    return {
        "datasets": [
            {
                "name": f"{fam}_dev",
                "path": str(data[fam]["dev"]),
                "weight": 1.0,
                "rollout_steps": int(d.get("rollout_steps", 5)),
            }
            for fam in families
        ],
        "t_in": int(d["t_in"]),
        "t_ar": 1,
        "resolution": int(d["resolution"]),
        "channels": int(d.get("channels", 4)),
        **(d.get("loader") or {}),
    }


# -------------------------------------------------------------------------------------------- trials


def model_sections(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """The config sections of a model of `models:` or of a search variant (its base model <- its overrides)."""
    if name in spec["models"]:
        return spec["models"][name] or {}
    variant = dict(spec["search"]["variants"][name])
    return deep_merge(spec["models"][variant.pop("base")] or {}, variant)


def describe_variant(spec: dict[str, Any], name: str) -> str:
    """A search variant as the report shows it: `<base> + {its overrides}` in one line."""
    own = {k: v for k, v in spec["search"]["variants"][name].items() if k != "base"}
    flow = yaml.safe_dump(own, default_flow_style=True, width=10**6).strip()
    return spec["search"]["variants"][name]["base"] + (f" + {flow}" if own else "")


def trial_config(
    spec: dict[str, Any], model: str, seed: int, budget_s: float, data: dict[str, Any], run_dir: Path
) -> dict[str, Any]:
    """Run config YAML of one trial: common sections <- the model's sections <- seed, budget, data, output."""
    cfg = deep_merge(spec.get("common") or {}, model_sections(spec, model))
    cfg = deep_merge(
        cfg,
        {
            "data": data,
            "train": {
                "seed": seed,
                "time_budget_s": float(budget_s),
                "max_steps": 10**9,
                "eval_every": 0,
                "ckpt_every": 10**9,
                "keep_last": 1,
                "output_dir": str(run_dir),
            },
            "tracking": {"experiment": f"study-{spec['name']}"},
        },
    )
    return cfg


def prepare_trial(trial_id: str, cfg: dict[str, Any], work: Path) -> tuple[Path, Path, dict[str, str]]:
    """A trial starts over: its run directory and log are removed (it was interrupted before its JSON was written),
    its config written. Returns (config path, log path, environment)."""
    run_dir = Path(cfg["train"]["output_dir"]) / trial_id
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg_path = work / "configs" / f"{trial_id}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = work / "logs" / f"{trial_id}.log"
    if log.exists():
        log.unlink()
    return cfg_path, log, {**os.environ, "PYTHONUNBUFFERED": "1"}


def train_and_score(
    spec: dict[str, Any],
    trial_id: str,
    cfg: dict[str, Any],
    test_dirs: list[Path],
    work: Path,
    entry: str = "nestor_ds.train",
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """`python -m nestor_ds.train` (or `nestor_ds.finetune`) with `cfg`, then evaluate on `test_dirs`; returns
    the trial record."""
    run_root = Path(cfg["train"]["output_dir"])
    cfg_path, log, env = prepare_trial(trial_id, cfg, work)
    t0 = time.time()
    run(
        [
            sys.executable,
            "-m",
            entry,
            "--ds_config",
            "ds_configs/zero0.json",
            "--config",
            str(cfg_path),
            "--run-name",
            trial_id,
            *(extra or []),
        ],
        log,
        env,
    )
    wall = time.time() - t0
    run_dir = run_root / trial_id
    test = score(spec, trial_id, run_dir / "checkpoints", test_dirs, work, log, env)
    return {"test": test, **read_run(run_dir), "wall_s": wall}


def score(
    spec: dict[str, Any],
    trial_id: str,
    checkpoint: Path,
    test_dirs: list[Path],
    work: Path,
    log: Path,
    env: dict[str, str],
    mlflow: bool = True,
) -> dict[str, Any]:
    """`python -m nestor_ds.evaluate` of a checkpoint (root or exported file) on `test_dirs`: the test report."""
    report = work / "reports" / f"{trial_id}.json"
    tracking = (
        ["--tracking-uri", os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")]
        if mlflow
        else ["--no-mlflow"]
    )
    run(
        [
            sys.executable,
            "-m",
            "nestor_ds.evaluate",
            "--checkpoint",
            str(checkpoint),
            "--data",
            *map(str, test_dirs),
            "--rollout-steps",
            str(int(spec["data"].get("rollout_steps", 5))),
            "--out",
            str(report),
            "--run-name",
            f"{trial_id}-test",
            *tracking,
        ],
        log,
        env,
    )
    test = json.loads(report.read_text())
    if str(test.get("checkpoint", "")).startswith(str(work)):  # no machine paths in the report
        test["checkpoint"] = str(Path(test["checkpoint"]).relative_to(work))
    return test


def bare_and_score(
    spec: dict[str, Any], trial_id: str, cfg: dict[str, Any], test_dirs: list[Path], work: Path
) -> dict[str, Any]:
    """The same trial trained by `tools/bare_loop.py` (no engine, no stream, no logging), scored identically."""
    out = Path(cfg["train"]["output_dir"]) / trial_id
    cfg_path, log, env = prepare_trial(trial_id, cfg, work)
    t0 = time.time()
    run([sys.executable, "-m", "tools.bare_loop", "--config", str(cfg_path), "--out", str(out)], log, env)
    wall = time.time() - t0
    # not an MLflow run: it runs beside the product's trial, whose runs own the SQLite store
    test = score(spec, trial_id, out / "model.safetensors", test_dirs, work, log, env, mlflow=False)
    return {"test": test, **json.loads((out / "summary.json").read_text()), "wall_s": wall}


def train_only(spec: dict[str, Any], trial_id: str, cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """A recipe-search trial: trained like a matrix trial, scored on the validation split only (the trainer's final
    evaluation); the test split is not read."""
    cfg_path, log, env = prepare_trial(trial_id, cfg, work)
    t0 = time.time()
    cmd = [sys.executable, "-m", "nestor_ds.train", "--ds_config", "ds_configs/zero0.json", "--config", str(cfg_path)]
    run([*cmd, "--run-name", trial_id], log, env)
    return {**read_run(Path(cfg["train"]["output_dir"]) / trial_id), "wall_s": time.time() - t0}


def product_vs_bare(
    spec: dict[str, Any], trial_id: str, cfg: dict[str, Any], test_dirs: list[Path], work: Path
) -> dict[str, Any]:
    """The product and the bare loop on one trial config, at the same time, one thread each: {"product": record,
    "bare": record}.

    Why at the same time: this shared machine's speed drifts by up to 2x over minutes, so two runs one after the
    other got budgets worth 958 and 1399 steps of the same per-step cost (py-spy: equal CPU per step). Running side by
    side, both see the same machine; each gets one of the two cores."""
    from concurrent.futures import ThreadPoolExecutor

    one_thread = deep_merge(cfg, {"train": {"threads_per_rank": 1}})
    with ThreadPoolExecutor(2) as pool:
        product = pool.submit(train_and_score, spec, f"{trial_id}-product", one_thread, test_dirs, work)
        bare = pool.submit(bare_and_score, spec, f"{trial_id}-bare", one_thread, test_dirs, work)
        return {"product": product.result(), "bare": bare.result()}


def read_run(run_dir: Path) -> dict[str, Any]:
    """What the trainer wrote (metrics.jsonl, run_summary.json): steps, budget spent, throughput, model size,
    validation scores, expert usage."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    sps = [r["perf/samples_per_s"] for r in rows[len(rows) // 10 :] if "perf/samples_per_s" in r]
    return {
        "steps": summary["steps"],
        "train_seconds": summary.get("budget/seconds"),
        "train_flops": summary.get("budget/flops"),
        "samples_per_s": sum(sps) / max(1, len(sps)),
        "final_loss": rows[-1]["train/loss"],
        "loss_curve": [(r["step"], r.get("budget/seconds"), r["train/loss"]) for r in rows],
        "stats": summary.get("model_stats", {}),
        "validation": summary.get("final_eval", {}),
        "expert_usage": summary.get("expert_usage", {}),
        "usage_curve": usage_curve(run_dir / USAGE_LOG),
    }


def usage_curve(path: Path) -> list[dict[str, Any]]:
    """Specialisation over training from the trainer's expert_usage.jsonl (``train.usage_every``): per record its
    step, training seconds and, per block, the dataset x image-expert counts of the steps since the previous record
    and their mutual information."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [
        {
            "step": r["step"],
            "seconds": r.get("budget/seconds"),
            "mi_bits": {b: u["mi_bits"] for b, u in r["blocks"].items()},
            "dataset_expert": {b: u["dataset_expert"] for b, u in r["blocks"].items()},
        }
        for r in rows
    ]


Trial = tuple[str, str, str, int, float]  # (trial id, kind, model or variant, seed, budget s)


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


def run_trial(spec: dict[str, Any], trial: Trial, data: dict[str, dict[str, Path]], work: Path) -> dict[str, Any]:
    """Train and score one trial of any kind; returns its record (what the trial JSON holds)."""
    trial_id, kind, model, seed, budget = trial
    fams, runs, started = spec["data"]["families"], work / "runs", time.time()
    if kind == "transfer":
        held = spec["transfer"]["held_out"]
        record = run_transfer(spec, trial_id, model, seed, data, held, [f for f in fams if f != held], runs, work)
    else:
        cfg = trial_config(spec, model, seed, budget, data_section(spec, data, fams), runs)
        test_dirs = [data[f]["test"] for f in fams]
        if kind in ("matrix", "usage"):
            record = train_and_score(spec, trial_id, cfg, test_dirs, work)
        elif kind == "search":
            record = {**train_only(spec, trial_id, cfg, work), "overrides": model_sections(spec, model)}
            record["describe"] = describe_variant(spec, model)
        else:
            record = product_vs_bare(spec, trial_id, cfg, test_dirs, work)
    threads = ((spec.get("common") or {}).get("train") or {}).get("threads_per_rank")
    record.update({"id": trial_id, "kind": kind, "model": model, "seed": seed, "budget_s": budget})
    record.update({"parallel": int(spec.get("parallel", 1)), "threads_per_rank": threads})
    record.update({"started": started, "ended": time.time()})  # epoch s: shows which trials ran side by side
    return record


def main(argv: list[str] | None = None) -> int:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tools import study_report

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
        done = [p for p in plan if (trials_dir / f"{p[0]}.json").is_file()]
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


def run_transfer(
    spec: dict[str, Any],
    trial_id: str,
    model: str,
    seed: int,
    data: dict[str, dict[str, Path]],
    held: str,
    rest: list[str],
    runs: Path,
    work: Path,
) -> dict[str, Any]:
    """Pre-train on the other families, then fine-tune on the held-out one, against the same model trained from
    scratch on the held-out family with the fine-tune budget (the paper's transfer claim)."""
    tr = spec["transfer"]
    pre_id, scratch_id = f"{trial_id}-pretrain", f"{trial_id}-scratch"
    pre_cfg = trial_config(spec, model, seed, tr["pretrain_budget_s"], data_section(spec, data, rest), runs)
    pre = train_and_score(spec, pre_id, pre_cfg, [data[f]["test"] for f in rest], work)
    held_data = data_section(spec, data, [held])
    ft_cfg = trial_config(spec, model, seed, tr["finetune_budget_s"], held_data, runs)
    ft_cfg["finetune"] = {"load": "all"}
    ft = train_and_score(
        spec,
        trial_id,
        ft_cfg,
        [data[held]["test"]],
        work,
        entry="nestor_ds.finetune",
        extra=["--pretrained", str(runs / pre_id / "checkpoints")],
    )
    scratch_cfg = trial_config(spec, model, seed, tr["finetune_budget_s"], held_data, runs)
    scratch = train_and_score(spec, scratch_id, scratch_cfg, [data[held]["test"]], work)
    return {**ft, "pretrain": pre, "scratch": scratch, "held_out": held}


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
