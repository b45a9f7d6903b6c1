"""Export a DeepSpeed checkpoint (any ep_size) to one safetensors file in the single-process layout.

    python tools/export_checkpoint.py --checkpoint runs/x/checkpoints --out nestor.safetensors

Gathers the non-expert weights and every expert-parallel rank's expert files, converts the token MoEs
to the `local` backend layout, checks that a model built from the saved config loads them, and writes
FILE.safetensors (run config in the metadata) plus FILE.json (the same config, for humans).
Load it with `from nestor_ds import load_pretrained; model = load_pretrained("nestor.safetensors")`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


PROG = "export_checkpoint"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint root (its 'latest' tag) or a tag directory")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        p.error(f"--out {args.out}: must end with .safetensors")

    from tqdm import tqdm

    from nestor_ds.checkpoint_io import export_checkpoint, read_run_config, resolve_checkpoint

    try:
        # Resolve and check what can be checked cheaply before any progress output, so that a bad path
        # is one error line, not a stray `export: 0%|` bar line followed by the error.
        source = resolve_checkpoint(args.checkpoint)
        if source.is_dir():
            read_run_config(source)
        bar = tqdm(total=1, desc="export", unit="ckpt", disable=True if args.no_progress else None)
        try:
            out = export_checkpoint(source, args.out)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
