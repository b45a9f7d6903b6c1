#!/usr/bin/env python
"""Where the device path's host time goes: the packed stream (`TrainStream.packed_batches`) timed with its stages
switched on one at a time, per window, for fp32 and fp16 shards.

Why: `tools.bench_data` gives one rate per path; to know what to make cheaper, the host cost of device windowing is
split here into (cumulative rows, each adds one stage to the one above):
  bookkeeping   sampler, shuffle, mixture, tar header walk, mapping (madvise), packing: the finite check replaced by
                nothing and no copy
  faults        + one byte read per 4 KiB page of each sent trajectory: the page faults of its mapped view
  check         + the real per-frame NaN/Inf check (`finite_frames`; it takes the faults itself)
  copy_fresh    + a copy of each sent trajectory into fresh memory (`clone()`: what tools.bench_data charges; a
                DataLoader worker's copy into new shared memory is of this kind)
  copy_reused   the check, then a copy into one reused buffer instead (the copy through the CUDA driver's staging
                buffers or into the pin thread's cached pinned blocks is of this kind)
Microseconds of process CPU time (time.process_time) per window, median [min-max] of --repeats passes after a warm-up
pass, torch threads 1, num_workers 0; data as tools.bench_data writes it (random trajectories built by the real
builder, then dropped from the page cache so that the warm-up pass reads them from disk as a training run does).
With --json the last output line is one JSON object.

    OMP_NUM_THREADS=1 python -m tools.bench_data_stages --json --windows 4,8,11
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import nestor_ds.data.device_windows as device_windows
from nestor_ds.data import TrainStream
from tools.bench_data_compare import evict
from tools.bench_data_files import stream_cfg, write_data

PAGE = 4096
REAL_CHECK = device_windows.finite_frames  # patched per row, restored after each pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trajectories", type=int, default=64, help="trajectories in the data set (default 64)")
    p.add_argument("--frames", type=int, default=21, help="frames per trajectory (default 21)")
    p.add_argument("--res", type=int, default=128, help="grid size X = Y (default 128)")
    p.add_argument("--windows", default="4", help="comma-separated windows per trajectory (default 4)")
    p.add_argument("--shards", type=int, default=8, help="training shards (default 8)")
    p.add_argument("--batch", type=int, default=4, help="micro-batch size (default 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per row (default 5)")
    p.add_argument("--dir", default=None, help="work directory (default: a fresh temporary one, removed after)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    args.t_in, args.t_ar, args.workers = 10, 1, 0
    args.counts = [int(n) for n in args.windows.split(",")]
    if args.t_in + args.t_ar > args.frames or args.trajectories < args.shards:
        p.error("need --frames >= 11 and --trajectories >= --shards")
    return args


def _touch(arr: np.ndarray) -> None:
    """Read one byte of every page: the page faults of a mapped view, and nothing else (all frames pass)."""
    arr.reshape(-1).view(np.uint8)[::PAGE].sum()


def stages() -> dict[str, tuple[Callable[[np.ndarray], object], str | None]]:
    """Row name -> (the finite check used, the copy made of each sent trajectory)."""
    return {
        "bookkeeping": (lambda arr: None, None),
        "faults": (_touch, None),
        "check": (REAL_CHECK, None),
        "copy_fresh": (REAL_CHECK, "fresh"),
        "copy_reused": (REAL_CHECK, "reused"),
    }


def one_pass(path: str, args: argparse.Namespace, windows: int, check: Callable, copy: str | None) -> float:
    """Host microseconds per window of one pass of the packed stream with `check` as the finite check."""
    a = argparse.Namespace(**{**vars(args), "windows": windows})
    n_batches = args.trajectories * windows // args.batch
    buffers: dict[tuple, torch.Tensor] = {}
    device_windows.finite_frames = check
    try:
        packed_batches = TrainStream(stream_cfg(path, a, n_batches), micro_batch=args.batch, seed=0).packed_batches()
        cpu = 0.0
        for _ in range(n_batches):
            c0 = time.process_time()
            packed = next(packed_batches)
            for t in packed["new_data"]:
                if copy == "fresh":
                    t.clone()
                elif copy == "reused":
                    buffers.setdefault((t.shape, t.dtype), torch.empty(t.shape, dtype=t.dtype)).copy_(t)
            cpu += time.process_time() - c0
        packed_batches.close()
    finally:
        device_windows.finite_frames = REAL_CHECK
    return cpu / (n_batches * args.batch) * 1e6


def measure(path: str, args: argparse.Namespace, windows: int) -> dict[str, dict[str, float]]:
    """Each row's median, min and max microseconds per window (rows interleaved pass by pass: drift hits all)."""
    rows = stages()
    for check, copy in rows.values():
        one_pass(path, args, windows, check, copy)  # warm-up: imports, sha256 check, page cache
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, (check, copy) in rows.items():
            times[name].append(one_pass(path, args, windows, check, copy))
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_data_stages_"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"res": args.res, "frames": args.frames, "repeats": args.repeats, "us_per_window": {}}
    try:
        paths = {"fp32": write_data(work, args)[1], "fp16": write_data(work, args, "float16")[1]}
        evict([f for p in paths.values() for f in p.glob("*.tar")])  # read from disk, as tools.bench_data does
        for n in args.counts:
            for dtype, path in paths.items():
                res["us_per_window"][f"{dtype}_w{n}"] = measure(str(path), args, n)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    for key, rows in res["us_per_window"].items():
        print(f"{key}: " + ", ".join(f"{k} {r['median']:.0f} [{r['min']:.0f}-{r['max']:.0f}]" for k, r in rows.items()))
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
