"""`python -m tools.bench_data --compare`: the older loader comparison (docs/benchmarks.md, "Data loader").

TrainStream batches against DPOT-style random-access HDF5 reads and a sequential read of the tar files (the disk
ceiling), cold (files evicted from the page cache before each pass) and warm; both loaders run with the same
--workers and produce identical batch tensors [B, X, Y, T, C].
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nestor_ds.data import TrainStream
from nestor_ds.data.frames import new_batch_tensor, write_frames
from tools.bench_data_files import CHANNELS, stream_cfg


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
    """Read the files once so that they are in the page cache."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(8 << 20):
                pass


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
    """Seconds for n_batches of TrainStream.batches() on a shard directory."""
    cfg = stream_cfg(str(shards), args, n_batches)
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
    """Seconds for the same number of windows read DPOT-style from the HDF5 file."""
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


def compare(h5: Path, shards: Path, args: argparse.Namespace) -> dict[str, float]:
    """The older figures: stream vs h5py random access vs a sequential read of the tars, cold and warm (best pass)."""
    tars = sorted(shards.glob("train-*.tar"))
    traj_bytes = args.frames * args.res * args.res * len(CHANNELS) * 4
    n_batches = args.trajectories * args.windows // args.batch
    n_windows = n_batches * args.batch
    res: dict[str, float] = {}
    for mode in ("cold", "warm"):
        best = {"seq": float("inf"), "stream": float("inf"), "h5py": float("inf")}
        for _ in range(args.repeats):
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
    return res
