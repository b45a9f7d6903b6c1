"""Evaluate a checkpoint on the test split of shard datasets: one-step and rollout L2RE, error curve, spectra.

    python -m nestor_ds.evaluate --checkpoint runs/x/checkpoints --data shards/dr_pdb shards/swe_pdb --out report.json
    torchrun --nproc_per_node 2 -m nestor_ds.evaluate --checkpoint model.safetensors --data shards/dr_pdb

The model is always loaded as a single-process model (local MoE backend, ep_size 1); under torchrun
the test trajectories are split over ranks and the sums are all-reduced, so the report is the same
as a single process's.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nestor_ds.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint root (the run's own nestor_latest tag when complete, else the highest complete step_* tag, "
        "else DeepSpeed's 'latest'), a tag directory, or an exported .safetensors file",
    )
    p.add_argument("--data", nargs="+", required=True, metavar="SHARD_DIR", help="built shard directories to score")
    p.add_argument(
        "--rollout-steps",
        type=int,
        default=None,
        help="autoregressive steps; default min(available, the dataset's rollout_steps)",
    )
    p.add_argument(
        "--windows",
        choices=("all", "first"),
        default="all",
        help="all: every start frame with t_in frames before it (DPOT-style, default); "
        "first: only the first window of each trajectory",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-trajectories", type=int, default=None, help="score only the first N test trajectories")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; never the URI a checkpoint "
        "names)",
    )
    p.add_argument("--run-name", default=None, help="MLflow run name (default: evaluate-<checkpoint name>)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.rollout_steps is not None and args.rollout_steps < 1):
        p.error("--batch-size and --rollout-steps must be >= 1")
    return args


def dataset_specs(dirs: list[str], run_cfg: dict[str, Any]) -> list[Any]:
    """One DatasetSpec per shard dir; name and rollout_steps from the training config when it lists that path."""
    from nestor_ds.data import DatasetSpec, load_manifest

    known = {
        str(Path(d["path"]).resolve()): d
        for d in (run_cfg.get("data") or {}).get("datasets", [])
        if isinstance(d, dict) and "path" in d
    }
    specs = []
    for d in dirs:
        manifest = load_manifest(d)  # one-line error naming the file for a bad directory
        trained = known.get(str(Path(d).resolve()), {})
        spec = DatasetSpec(name=trained.get("name") or manifest.get("name") or Path(d).name, path=str(d))
        if "rollout_steps" in trained:
            spec.rollout_steps = int(trained["rollout_steps"])
        specs.append(spec)
    return specs


def data_config(run_cfg: dict[str, Any], model_cfg: Any) -> Any:
    """The training run's data settings (normalisation etc.); grid, t_in and channels always from the model."""
    from nestor_ds.data import DataConfig

    data = {k: v for k, v in (run_cfg.get("data") or {}).items() if k != "datasets"}
    try:
        cfg = DataConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        from nestor_ds.checkpoint.layout import CheckpointError

        raise CheckpointError(f"data section of the checkpoint's config: {err}") from None
    cfg.t_in, cfg.resolution, cfg.channels = model_cfg.t_in, model_cfg.resolution, model_cfg.in_channels
    return cfg


def init_process_group(device: str) -> tuple[int, int]:
    """(rank, world_size); starts torch.distributed when launched by torchrun / deepspeed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.startswith("cuda"):  # one GPU per rank: NCCL communicators and host-side reductions use it
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def log_to_mlflow(report: dict[str, Any], args: argparse.Namespace, run_cfg: dict[str, Any]) -> None:
    """Metrics, the rollout-curve figure and the report as an artifact; skipped if tracking is unavailable."""
    try:
        from nestor_ds.tracking import Tracker, TrackingConfig, flatten, rollout_error_curve
        from nestor_ds.tracking.tracker import resolve_tracking_uri
    except ImportError:
        return
    tracking = TrackingConfig(
        **{k: v for k, v in (run_cfg.get("tracking") or {}).items() if k in TrackingConfig.__dataclass_fields__}
    )
    # --no-mlflow decides, not whether the training run tracked. The store is this evaluation's own (flag,
    # $MLFLOW_TRACKING_URI, else the local default), never the one a checkpoint names: a checkpoint from someone else
    # must not make this machine contact a server it chose
    tracking.enabled = True
    tracking.tracking_uri = resolve_tracking_uri(args.tracking_uri)
    tracking.system_metrics = False
    name = args.run_name or f"evaluate-{Path(args.checkpoint).resolve().name}"
    tracker = Tracker(tracking, rank=0, entry="evaluate", run_name=name)
    try:
        if run_cfg.get("mlflow_run_id"):  # the training run that wrote the checkpoint
            tracker.set_tags({"nestor.checkpoint_run_id": run_cfg["mlflow_run_id"]})
        from nestor_ds.tracking.datasets import describe_all

        tracker.log_inputs(describe_all(dataset_specs(args.data, run_cfg), "evaluation"))  # dataset lineage
        tracker.log_params(
            {"checkpoint": str(args.checkpoint), "data": ",".join(args.data), **flatten(report["settings"], "eval")}
        )
        metrics = {}
        for ds, r in report["datasets"].items():
            metrics[f"eval/{ds}/l2re_1step"] = r["l2re_1step"]
            metrics[f"eval/{ds}/l2re_rollout"] = r["l2re_rollout"]
            for band, v in r["spectrum_err_rollout"].items():
                metrics[f"eval/{ds}/spectrum_err_rollout_{band}"] = v
        metrics.update({f"eval/mean/{k}": v for k, v in report["mean"].items()})
        tracker.log_metrics(metrics, step=0)
        for ds, r in report["datasets"].items():  # the curve as a metric history: step = rollout step
            for k, v in enumerate(r["l2re_curve"], start=1):
                tracker.log_metrics({f"eval/{ds}/l2re_step": v}, step=k)
        tracker.log_figure(
            rollout_error_curve({ds: r["l2re_curve"] for ds, r in report["datasets"].items()}), "rollout_error_curve"
        )
        tracker.log_dict(report, "eval_report.json")
    finally:
        tracker.finish()


def print_summary(report: dict[str, Any]) -> None:
    bands = report["settings"]["spectrum_bands"]
    print(
        f"windows: {report['settings']['windows']} "
        "(n = scored one-step windows; rollout over windows with K frames left)"
    )
    print(
        f"{'dataset':24s} {'n':>5s} {'K':>4s} {'L2RE 1-step':>12s} {'L2RE rollout':>13s}  "
        + " ".join(f"spec-{b:>5s}" for b in bands)
    )
    for ds, r in report["datasets"].items():
        spec = " ".join(f"{r['spectrum_err_rollout'][b]:10.4f}" for b in bands)
        print(
            f"{ds:24s} {r['n_samples']:5d} {r['rollout_steps']:4d} {r['l2re_1step']:12.5f} "
            f"{r['l2re_rollout']:13.5f}  {spec}"
        )
    print(f"{'mean':24s} {'':5s} {'':4s} {report['mean']['l2re_1step']:12.5f} {report['mean']['l2re_rollout']:13.5f}")


def main(argv: list[str] | None = None) -> int:
    from nestor_ds.checkpoint.load import load_pretrained
    from nestor_ds.eval import evaluate_model

    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = init_process_group(device)
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    torch.manual_seed(0)
    model = load_pretrained(args.checkpoint, device=device)
    run_cfg = model.run_config
    specs = dataset_specs(args.data, run_cfg)
    report = evaluate_model(
        model,
        specs,
        data_config(run_cfg, model.cfg),
        rollout_steps=args.rollout_steps,
        batch_size=args.batch_size,
        device=device,
        rank=rank,
        world_size=world,
        max_trajectories=args.max_trajectories,
        windows=args.windows,
    )
    report["checkpoint"] = str(args.checkpoint)
    if rank == 0:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2))
        print_summary(report)
        if not args.no_mlflow:
            log_to_mlflow(report, args, run_cfg)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def cli() -> None:
    """The user's mistakes (bad checkpoint, bad shard dir, config mismatch) -> one line on stderr, exit 2; bugs keep
    their traceback (nestor_ds.cli.run_cli, as every entry)."""
    from nestor_ds.cli import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()
