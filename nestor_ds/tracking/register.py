"""Log a model export as an MLflow pyfunc model and register it: a new version of a registered model.

    python -m nestor_ds.tracking.register --checkpoint runs/x/checkpoints --out nestor.safetensors --name nestor-x
    python -m nestor_ds.tracking.register --checkpoint nestor.safetensors --name nestor-x     # an existing export

A DeepSpeed checkpoint is exported first, exactly as `python -m nestor_ds.checkpoint` does (same options); an
existing .safetensors export is registered as it is. The model is logged to the training run that wrote the
checkpoint when the store holds it, else to a new run `export-<NAME>`, and the version is tagged with that run's
last evaluation metrics (docs/review_runs.md, "Registered models").

Why here and not in the checkpoint package: registering needs MLflow and this package, which already reads
checkpoints; the checkpoint package never imports tracking, so the two form no import cycle.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nestor_ds.checkpoint.cli import add_export_arguments, export_and_report

PROG = "python -m nestor_ds.tracking.register"


def register(weights: Path, name: str, tracking_uri: str | None) -> str:
    """Log `weights` as a pyfunc model to its training run (or a new export run) and register it; the version."""
    import os

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    from nestor_ds.checkpoint.safe_load import read_safetensors
    from nestor_ds.tracking.model_logging import log_pyfunc_model
    from nestor_ds.tracking.tracker import Tracker, TrackingConfig, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    _, run_config = read_safetensors(weights)
    client = MlflowClient(uri)
    run_id, tags = run_config.get("mlflow_run_id") or None, {}
    if run_id:
        try:
            run = client.get_run(run_id)
            tags = {
                k: f"{v:.6g}"
                for k, v in run.data.metrics.items()
                if k.startswith("eval/") and k.endswith(("l2re_1step", "l2re_rollout"))
            }
        except Exception:  # noqa: BLE001 - the training run lives in another store
            run_id = None
    if run_id is None:
        tracker = Tracker(
            TrackingConfig(tracking_uri=uri, system_metrics=False), rank=0, entry="export", run_name=f"export-{name}"
        )
        if not tracker.active:
            raise RuntimeError(f"cannot open an MLflow run in {tracker.tracking_uri}")
        run_id = tracker.run_id
        tracker.set_tags({"nestor.checkpoint_run_id": run_config.get("mlflow_run_id") or "unknown"})
        tracker.finish()
    return str(log_pyfunc_model(uri, run_id, weights, run_config, register_as=name, tags=tags)["version"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(p, out_help="output .safetensors file (not needed when --checkpoint is an export already)")
    p.add_argument("--name", required=True, metavar="NAME", help="the registered model's name (a new version of it)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    args = p.parse_args(argv)
    if args.out is None and not args.checkpoint.endswith(".safetensors"):
        p.error("--out FILE.safetensors is needed to export a DeepSpeed checkpoint before registering it")
    if args.out is not None and not args.out.endswith(".safetensors"):
        p.error(f"--out {args.out}: must end with .safetensors")
    return args


def main(argv: list[str] | None = None) -> int:
    """Export (unless given an export), then register; each failure is one line and a non-zero exit status."""
    args = parse_args(argv)
    weights = Path(args.checkpoint)
    if args.out is not None:
        exported = export_and_report(args, PROG)
        if exported is None:
            return 2
        weights = exported
    elif not weights.is_file():
        print(f"{PROG}: error: {weights}: no such file", file=sys.stderr, flush=True)
        return 2
    try:
        version = register(weights, args.name, args.tracking_uri)
    except Exception as err:  # noqa: BLE001 - the export itself succeeded: one line, exit 1
        text = str(err).strip().splitlines()
        print(
            f"{PROG}: error: --name {args.name}: {type(err).__name__}: {text[0] if text else ''}"[:500],
            file=sys.stderr,
            flush=True,
        )
        return 1
    print(f"registered models:/{args.name}/{version}")
    return 0


if __name__ == "__main__":
    from nestor_ds.cli import run_cli

    run_cli(main)
