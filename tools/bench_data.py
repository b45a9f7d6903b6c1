#!/usr/bin/env python
"""Benchmark the streaming loader against random-access HDF5 reads (how DPOT reads) and raw disk speed.

Writes its own temporary data: a PDEBench-CFD-like HDF5 file (Vx, Vy, density, pressure, each
[R, T, X, Y] float32) and the same trajectories as shards built by the real builder. Then, cold
(files evicted from the page cache before each pass) and warm:
  sequential  read every tar file front to back in 8 MiB chunks: the disk ceiling
  stream      TrainStream batches (t_in past + t_ar next frames, --windows windows per trajectory)
  h5py        the same number of random windows read as u[i, t:t + t_in + t_ar] per channel from the
              HDF5 file (file kept open per worker), written into the same batch layout
Both loaders run with the same --workers (torch DataLoader processes) and produce identical batch
tensors [B, X, Y, T, C]. With --json the last output line is one JSON object.

    python -m tools.bench_data --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from nestor_ds.data import DataConfig, DatasetSpec, TrainStream
from nestor_ds.data.frames import new_batch_tensor, write_frames
from nestor_ds.shards.build import META_BYTES_ESTIMATE, BuildConfig, build

CHANNELS = ("Vx", "Vy", "density", "pressure")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trajectories", type=int, default=64, help="trajectories in the data set (default 64)")
    p.add_argument("--frames", type=int, default=21, help="frames per trajectory (default 21)")
    p.add_argument("--res", type=int, default=128, help="grid size X = Y (default 128)")
    p.add_argument("--windows", type=int, default=4, help="windows per trajectory (default 4)")
    p.add_argument("--t-in", type=int, default=10, help="input frames per window (default 10)")
    p.add_argument("--t-ar", type=int, default=1, help="target frames per window (default 1)")
    p.add_argument("--batch", type=int, default=4, help="micro-batch size (default 4)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for both loaders (default 0)")
    p.add_argument("--shards", type=int, default=8, help="training shards (default 8)")
    p.add_argument("--repeats", type=int, default=1, help="passes per measurement; the best is kept (default 1)")
    p.add_argument("--dir", default=None, help="work directory (default: a fresh temporary one, removed after)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    if args.t_in + args.t_ar > args.frames:
        p.error(f"--t-in + --t-ar = {args.t_in + args.t_ar} > --frames = {args.frames}")
    if args.trajectories < args.shards or args.shards < max(1, args.workers):
        p.error(
            f"need --trajectories >= --shards >= --workers (got {args.trajectories}, {args.shards}, {args.workers})"
        )
    return args


# ------------------------------------------------------------------------------------------ data


def write_data(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The HDF5 file and its shard directory (built by the project's builder, train split only)."""
    n, t, r = args.trajectories, args.frames, args.res
    h5 = work / "2D_CFD_bench_Train.hdf5"
    rng = np.random.default_rng(0)
    with h5py.File(h5, "w") as f:
        for name in CHANNELS:
            ds = f.create_dataset(name, shape=(n, t, r, r), dtype="f4")
            for i in tqdm(range(n), desc=f"write {name}", leave=False, disable=None):
                ds[i] = rng.standard_normal((t, r, r), dtype=np.float32)
        f.create_dataset("x-coordinate", data=np.linspace(0, 1, r, dtype=np.float32))
        f.create_dataset("y-coordinate", data=np.linspace(0, 1, r, dtype=np.float32))
        f.create_dataset("t-coordinate", data=np.linspace(0, 1, t + 1, dtype=np.float32))
        f.attrs.update({"eta": 0.1, "zeta": 0.1, "M": 1.0})
    per_shard = -(-n // args.shards)
    sample_bytes = t * r * r * len(CHANNELS) * 4 + META_BYTES_ESTIMATE
    shards = work / "shards"
    build(
        BuildConfig(
            inputs=[str(h5)],
            out=str(shards),
            layout="pdebench-cfd",
            name="bench",
            test_fraction=0.0,
            shard_size_mb=(per_shard * sample_bytes + 0.5) / 2**20,
            workers=1,
            progress=None,
            overwrite=True,
        )
    )
    return h5, shards


def evict(paths: list[Path]) -> None:
    """Drop the files from the page cache (written data is flushed first; DONTNEED skips dirty pages)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(8 << 20):
                pass


# ------------------------------------------------------------------------------------------ passes


def sequential_pass(tars: list[Path]) -> tuple[float, int]:
    """Seconds and bytes to read every tar file front to back."""
    buf = bytearray(8 << 20)
    total = 0
    start = time.perf_counter()
    for path in tars:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return time.perf_counter() - start, total


def stream_pass(shards: Path, args: argparse.Namespace, n_batches: int) -> float:
    cfg = DataConfig(
        datasets=[DatasetSpec("bench", str(shards))],
        t_in=args.t_in,
        t_ar=args.t_ar,
        resolution=args.res,
        channels=len(CHANNELS),
        windows_per_trajectory=args.windows,
        num_workers=args.workers,
        steps_per_epoch=n_batches,
    )
    start = time.perf_counter()
    stream = TrainStream(cfg, micro_batch=args.batch, seed=0)
    for batch in itertools.islice(stream.batches(), n_batches):
        assert batch["x"].shape[0] == args.batch
    return time.perf_counter() - start


class H5Windows(Dataset):
    """DPOT-style random access: batch k holds windows (i, t) read as ds[i, t:t + L] per channel."""

    def __init__(self, h5: Path, windows: list[tuple[int, int]], args: argparse.Namespace):
        self.h5, self.windows, self.args = h5, windows, args
        self.file: h5py.File | None = None  # opened lazily in each worker process

    def __len__(self) -> int:
        return len(self.windows) // self.args.batch

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if self.file is None:
            self.file = h5py.File(self.h5, "r")
        a, B, L = self.args, self.args.batch, self.args.t_in + self.args.t_ar
        x = new_batch_tensor((B, a.res, a.res, a.t_in, len(CHANNELS)), zero=False)  # as the stream does
        y = new_batch_tensor((B, a.res, a.res, a.t_ar, len(CHANNELS)), zero=False)
        for b, (i, t) in enumerate(self.windows[k * B : (k + 1) * B]):
            frames = np.stack([self.file[c][i, t : t + L] for c in CHANNELS], axis=-1)  # [L, X, Y, C]
            write_frames(x.numpy()[b], frames[: a.t_in])
            write_frames(y.numpy()[b], frames[a.t_in :])
        return {"x": x, "y": y}


def h5py_pass(h5: Path, args: argparse.Namespace, n_batches: int) -> float:
    rng = np.random.default_rng(0)
    n_starts = args.frames - args.t_in - args.t_ar + 1
    windows = [(i, int(t)) for i in range(args.trajectories) for t in rng.integers(0, n_starts, args.windows)]
    order = rng.permutation(len(windows))
    windows = [windows[j] for j in order][: n_batches * args.batch]
    start = time.perf_counter()
    loader = DataLoader(H5Windows(h5, windows, args), batch_size=None, shuffle=False, num_workers=args.workers)
    for batch in loader:
        assert batch["x"].shape[0] == args.batch
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        h5, shards = write_data(work, args)
        tars = sorted(shards.glob("train-*.tar"))
        traj_bytes = args.frames * args.res * args.res * len(CHANNELS) * 4
        n_batches = args.trajectories * args.windows // args.batch
        n_windows = n_batches * args.batch
        res: dict[str, float] = {}
        for mode in ("cold", "warm"):
            best = {"seq": float("inf"), "stream": float("inf"), "h5py": float("inf")}
            for _ in tqdm(range(args.repeats), desc=f"{mode} passes", leave=False, disable=None):
                for name, run, files in (
                    ("seq", lambda: sequential_pass(tars)[0], tars),
                    ("stream", lambda: stream_pass(shards, args, n_batches), tars),
                    ("h5py", lambda: h5py_pass(h5, args, n_batches), [h5]),
                ):
                    evict(files) if mode == "cold" else warm(files)
                    best[name] = min(best[name], run())
            seq_bytes = sum(p.stat().st_size for p in tars)
            sfx = "" if mode == "cold" else "_warm"
            res[f"sequential_bytes_per_s{sfx}"] = seq_bytes / best["seq"]
            res[f"stream_windows_per_s{sfx}"] = n_windows / best["stream"]
            res[f"h5py_windows_per_s{sfx}"] = n_windows / best["h5py"]
            res[f"ratio_vs_h5py{sfx}"] = best["h5py"] / best["stream"]
            res[f"fraction_of_sequential{sfx}"] = (
                res[f"stream_windows_per_s{sfx}"] / args.windows * traj_bytes / res[f"sequential_bytes_per_s{sfx}"]
            )
        res.update(
            {
                "trajectories": args.trajectories,
                "frames": args.frames,
                "res": args.res,
                "windows_per_trajectory": args.windows,
                "t_in": args.t_in,
                "t_ar": args.t_ar,
                "batch": args.batch,
                "workers": args.workers,
                "windows_per_pass": n_windows,
                "trajectory_mb": traj_bytes / 2**20,
                "torch_threads": torch.get_num_threads(),
            }
        )
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    print(f"{'':12s} {'cold':>12s} {'warm':>12s}")
    print(
        f"{'sequential':12s} {res['sequential_bytes_per_s'] / 1e6:9.0f} MB/s "
        f"{res['sequential_bytes_per_s_warm'] / 1e6:7.0f} MB/s"
    )
    for name in ("stream", "h5py"):
        print(f"{name:12s} {res[f'{name}_windows_per_s']:8.1f} win/s {res[f'{name}_windows_per_s_warm']:6.1f} win/s")
    print(f"{'ratio':12s} {res['ratio_vs_h5py']:11.2f}x {res['ratio_vs_h5py_warm']:11.2f}x   (stream / h5py)")
    print(
        f"{'of seq.':12s} {res['fraction_of_sequential']:12.2f} {res['fraction_of_sequential_warm']:12.2f}"
        f"   (trajectory bytes consumed per s / sequential read rate)"
    )
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError) as err:  # bad input or disk trouble: one line, non-zero exit
        print(f"bench_data: error: {err}", file=sys.stderr)
        sys.exit(2)
