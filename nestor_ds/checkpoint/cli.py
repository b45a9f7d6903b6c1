"""Export a DeepSpeed checkpoint (any ep_size) to one safetensors file in the single-process layout.

    python -m nestor_ds.checkpoint --checkpoint runs/x/checkpoints --out nestor.safetensors

Gathers the non-expert weights and every expert-parallel rank's expert files, converts the token MoEs
to the `local` backend layout, checks that a model built from the saved config loads them, and writes
FILE.safetensors (run config in the metadata) plus FILE.json (the same config, for humans). The weights are
the fp32 master weights where the checkpoint has them (bf16/fp16 runs under ZeRO-1/2), written in fp32 unless
`--dtype bf16`.
Load it with `from nestor_ds import load_pretrained; model = load_pretrained("nestor.safetensors")`.

With `--register NAME` the file is also logged as an MLflow pyfunc model -- to the training run that wrote
the checkpoint when the store holds it, else to a new run `export-<NAME>` -- and registered as a new version
of NAME, tagged with that run's last evaluation metrics (docs/review_runs.md, "Registered models").

    python -m nestor_ds.checkpoint --checkpoint runs/x/checkpoints --out nestor.safetensors --register nestor-x
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "python -m nestor_ds.checkpoint"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint root (its 'latest' tag) or a tag directory")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="floating-point weights of the output (default fp32: a bf16 run's fp32 master weights)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--register",
        metavar="NAME",
        default=None,
        help="also log the export as an MLflow pyfunc model and register it under NAME",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store for --register (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    args = p.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        p.error(f"--out {args.out}: must end with .safetensors")

    from tqdm import tqdm

    from nestor_ds.checkpoint.export import export_checkpoint
    from nestor_ds.checkpoint.layout import read_run_config, resolve_checkpoint

    try:
        # Resolve and check what can be checked cheaply before any progress output, so that a bad path
        # is one error line, not a stray `export: 0%|` bar line followed by the error.
        source = resolve_checkpoint(args.checkpoint)
        if source.is_dir():
            read_run_config(source)
        bar = tqdm(total=1, desc="export", unit="ckpt", disable=True if args.no_progress else None)
        try:
            out = export_checkpoint(source, args.out, dtype=args.dtype)
        except BaseException:
            bar.leave = False  # erase the unfinished bar: the error line stands alone
            bar.close()
            raise
        bar.update()
        bar.close()
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError
        text = str(err).strip().splitlines()
        print(f"{PROG}: error: {text[0] if text else type(err).__name__}", file=sys.stderr, flush=True)
        return 2
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB) and {out.with_suffix('.json')}")
    if args.register:
        try:
            version = register(out, args.register, args.tracking_uri)
        except Exception as err:  # noqa: BLE001 - the export itself succeeded: one line, exit 1
            text = str(err).strip().splitlines()
            print(
                f"{PROG}: error: --register {args.register}: {type(err).__name__}: {text[0] if text else ''}"[:500],
                file=sys.stderr,
                flush=True,
            )
            return 1
        print(f"registered models:/{args.register}/{version}")
    return 0


def register(weights: Path, name: str, tracking_uri: str | None) -> str:
    """Log `weights` as a pyfunc model to its training run (or a new export run) and register it; the version."""
    import os

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    from nestor_ds.checkpoint.safe_load import read_safetensors
    from nestor_ds.tracking import Tracker, TrackingConfig
    from nestor_ds.tracking.model_logging import log_pyfunc_model
    from nestor_ds.tracking.tracker import resolve_tracking_uri

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


if __name__ == "__main__":
    sys.exit(main())
