#!/usr/bin/env python
"""Build WebDataset shards from raw PDE files, or verify a built shard directory.

  python -m nestor_ds.shards --input ns_V1e-3_N5000_T50.mat --out shards/ns2d_fno_1e-3 --test-fraction 0.04
  python -m nestor_ds.shards --verify shards/ns2d_fno_1e-3
  python -m nestor_ds.shards --input raw/ns --out s3://bucket/shards/ns2d   (then --verify s3://bucket/shards/ns2d)

The format is described in docs/data_format.md. Errors are one line naming file, key and shape,
with a non-zero exit status; nothing is left in the output directory after a failed build. An s3:// output is
built locally and uploaded shards first, manifest.json last (endpoint and credentials: the standard AWS_* variables
or profiles; docs/data_pipeline.md, "Shards in S3").
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from nestor_ds.shards.build import BuildConfig, build
from nestor_ds.shards.schema import DTYPES, LAYOUTS, DataFormatError
from nestor_ds.shards.verify import verify

PROG = "build_shards"


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (inf/nan would only fail later, deep inside planning)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number > 0")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def _line(exc: BaseException) -> str:
    """First line of an exception's message: the CLI contract is one line per error."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = BuildConfig(inputs=[], out="")
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", metavar="PATH", help="source files or directories (searched recursively)")
    p.add_argument("--out", metavar="DIR",
                   help="output shard directory (built atomically), or s3://BUCKET/PREFIX (manifest uploaded last)")
    p.add_argument("--verify", metavar="DIR",
                   help="verify a built directory or s3://BUCKET/PREFIX against its manifest and exit")
    p.add_argument("--format", default=d.layout, choices=("auto", *LAYOUTS), help="raw layout (default: auto-detect)")
    p.add_argument("--name", default=None, help="dataset name used in sample keys (default: first input's stem)")
    p.add_argument("--test-fraction", type=float, default=d.test_fraction,
                   help="last fraction of trajectories put in the test split, for files without their own split "
                        f"(default {d.test_fraction})")
    p.add_argument("--shard-size-mb", type=positive_float, default=d.shard_size_mb,
                   help=f"target shard size in MiB (default {d.shard_size_mb:g})")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help=f"stored dtype (default {d.dtype})")
    p.add_argument("--workers", type=positive_int, default=d.workers,
                   help="worker processes, one shard each at a time (>= 1)")
    p.add_argument("--skip-bad", action="store_true", help="skip NaN/Inf trajectories (counted as skipped_bad)")
    p.add_argument("--seed", type=int, default=None, help="permute training trajectories across shards with this seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing built directory at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.verify is None and (not args.input or not args.out):
        p.error("either --verify DIR, or --input PATH [PATH ...] and --out DIR")
    if args.verify is not None and (args.input or args.out):
        p.error("--verify cannot be combined with --input/--out")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = False if args.no_progress else None
    try:
        if args.verify is not None:
            report = verify(args.verify, progress=progress)
            print(f"{PROG}: ok: {args.verify}: {json.dumps(report)}")
            return 0
        cfg = BuildConfig(inputs=args.input, out=args.out, layout=args.format, name=args.name,
                          test_fraction=args.test_fraction, shard_size_mb=args.shard_size_mb, dtype=args.dtype,
                          workers=args.workers, skip_bad=args.skip_bad, seed=args.seed, overwrite=args.overwrite,
                          progress=progress)
        m = build(cfg)
    except (DataFormatError, ValueError, OSError, RuntimeError) as exc:  # RuntimeError: a worker died
        print(f"{PROG}: error: {_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, not bad input; build() has already removed what it wrote
        print(f"{PROG}: error: {type(exc).__name__}: {_line(exc)} (please report)", file=sys.stderr)
        return 1
    n_shards = sum(len(m["splits"][s]["shards"]) for s in ("train", "test"))
    print(f"{PROG}: wrote {args.out}: {m['name']} {m['layout']} shape {m['shape']} channels {m['channels']}: "
          f"{m['splits']['train']['count']} train, {m['splits']['test']['count']} test in {n_shards} shards"
          f" ({m['skipped_bad']} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
