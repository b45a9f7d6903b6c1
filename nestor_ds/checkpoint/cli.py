"""Export a DeepSpeed checkpoint (any ep_size) to one safetensors file in the single-process layout.

    python -m nestor_ds.checkpoint --checkpoint runs/x/checkpoints --out nestor.safetensors

Gathers the non-expert weights and every expert-parallel rank's expert files, converts the token MoEs
to the `local` backend layout, checks that a model built from the saved config loads them, and writes
FILE.safetensors (run config in the metadata) plus FILE.json (the same config, for humans). The weights are
the fp32 master weights where the checkpoint has them (bf16/fp16 runs under ZeRO-1/2), written in fp32 unless
`--dtype bf16`.
Load it with `from nestor_ds import load_pretrained; model = load_pretrained("nestor.safetensors")`.

To also log the export as an MLflow pyfunc model and register it, use the tracking side's command with the same
arguments plus a model name (this package never imports MLflow code; docs/review_runs.md, "Registered models"):

    python -m nestor_ds.tracking.register --checkpoint runs/x/checkpoints --out nestor.safetensors --name nestor-x
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "python -m nestor_ds.checkpoint"


def add_export_arguments(p: argparse.ArgumentParser, out_help: str | None = None) -> None:
    """The export's options (shared with ``python -m nestor_ds.tracking.register``, which exports first; there
    ``out_help`` says when --out may be left out)."""
    p.add_argument("--checkpoint", required=True, help="checkpoint root (its 'latest' tag) or a tag directory")
    p.add_argument("--out", required=out_help is None, help=out_help or "output .safetensors file")
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="floating-point weights of the output (default fp32: a bf16 run's fp32 master weights)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def export_with_progress(args: argparse.Namespace) -> Path:
    """Export ``args.checkpoint`` to ``args.out`` under a progress bar; CheckpointError / OSError on a bad path.

    The checkpoint is resolved and checked where that is cheap before any progress output, so that a bad path is one
    error line, not a stray `export: 0%|` bar line followed by the error."""
    from tqdm import tqdm

    from nestor_ds.checkpoint.export import export_checkpoint
    from nestor_ds.checkpoint.layout import read_run_config, resolve_checkpoint

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
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(p)
    args = p.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        p.error(f"--out {args.out}: must end with .safetensors")
    return 0 if export_and_report(args, PROG) is not None else 2


def export_and_report(args: argparse.Namespace, prog: str) -> Path | None:
    """`export_with_progress`, then one line saying what was written; a failure is one line ``<prog>: error: ...``
    on stderr and None (the caller exits 2)."""
    try:
        out = export_with_progress(args)
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError
        text = str(err).strip().splitlines()
        print(f"{prog}: error: {text[0] if text else type(err).__name__}", file=sys.stderr, flush=True)
        return None
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {out.with_suffix('.json')}")
    return out


if __name__ == "__main__":
    sys.exit(main())
