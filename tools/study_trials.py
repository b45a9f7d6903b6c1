"""One trial of the study (tools/study.py): its run config, the training and scoring commands, and the record the
trial JSON holds (read back from what the trainer and the evaluator wrote).

Kinds: `matrix` and `usage` (train, then evaluate on test), `search` (validation only), `gap` (the product and
tools/bare_loop.py side by side) and `transfer` (pre-train, fine-tune, and from scratch).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from nestor_ds.config import deep_merge  # one merge for run configs
from nestor_ds.engine.report import USAGE_LOG  # the trainer's expert-usage records
from tools.study_data import data_section, run

Trial = tuple[str, str, str, int, float]  # (trial id, kind, model or variant, seed, budget s)


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
