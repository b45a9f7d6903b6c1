"""Evaluation pass over the test split, in a fixed order, as (t_in input frames, the frames that follow).

Two window sets (``windows``):
- ``"all"`` (default, as DPOT-style evaluation does): every start frame s with t_in frames before it,
  s = t_in .. T-1, input frames [s - t_in, s), targets [s, s + horizon) cut at the trajectory's end
  (``y_steps`` says how many target frames are real; the rest are zeros).
- ``"first"``: one window per trajectory, input = the first t_in frames, targets = all later frames.

The order is the manifest's test shards in order, the samples of each shard in tar order (shards behind
URLs are read sequentially in that order with webdataset, or staged first with data.shard_cache and read as local
shards), then the start frames in order;
`traj_index` is a trajectory's position in that order and `start_frame` the window's s, so results of
different ranks or runs can be joined per window. Frames are resized, padded and normalised exactly like
training batches.

Shape legend: B samples in a batch, X, Y grid points (X = Y = data.resolution), T frames (T_in inputs, T_y
target frames of a window), C channels (data.channels; a dataset's own c <= C, the rest is padding).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import torch

from nestor_ds.data.config import DataConfig, DatasetSpec
from nestor_ds.data.frames import normalize_, padded_stats, resize_frames, write_frames
from nestor_ds.data.trajectories import DatasetInfo, stage_checked
from nestor_ds.errors import UserError
from nestor_ds.shards.schema import FIELDS_EXT, DataFormatError
from nestor_ds.shards.tar import decode_sample, iter_shard_samples, read_fields
from nestor_ds.shards.urls import iter_url_samples


def _local_samples(path: str) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(key, read fields) of each sample of a local shard in tar order; data is read only when asked."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for key, members in iter_shard_samples(fd, path):
            if FIELDS_EXT not in members:
                raise DataFormatError(path, f"sample '{key}' has no .{FIELDS_EXT} member")
            yield key, lambda m=members[FIELDS_EXT], w=f"{path} key {key}": read_fields(fd, *m, w)
    finally:
        os.close(fd)


def _url_samples(url: str) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(key, decode fields) of each sample of a shard URL, read sequentially (other ranks' samples are
    downloaded with the stream but not decoded)."""
    samples = iter_url_samples(url)
    try:
        for key, members in samples:
            yield key, lambda k=key, m=members: decode_sample(k, m, url)[0].astype(np.float32, copy=False)
    finally:
        samples.close()


def _staged_samples(
    info: DatasetInfo, cfg: DataConfig
) -> Callable[[str], Iterator[tuple[str, Callable[[], np.ndarray]]]]:
    """Sample reader of test shard URLs through the staging cache (data.shard_cache): each shard staged as for
    training (downloaded once per node, sha256-checked, kept from eviction while it is read), then read as a local
    shard. Why: every evaluation reads the whole test split again; streamed, each pass downloads it again."""

    def read(url: str) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
        path, lease = stage_checked(url, info, cfg.shard_cache, cfg.shard_cache_max_bytes)
        try:
            yield from _local_samples(path)
        finally:
            lease.close()

    return read


def _test_trajectories(
    info: DatasetInfo, cfg: DataConfig, limit: int | None, rank: int, world_size: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(traj_index, fields [T, X, Y, c]) of this rank's test trajectories (index % world_size == rank);
    other ranks' trajectories are skipped without reading their data."""
    if not info.remote:
        read = _local_samples
    else:
        read = _staged_samples(info, cfg) if cfg.shard_cache else _url_samples
    index = 0
    for location, _ in info.test:
        for key, fields in read(location):
            if limit is not None and index >= limit:
                return
            if index % world_size == rank:
                yield index, info.check(fields(), f"{location} key {key}")
            index += 1


WINDOWS = ("all", "first")


def _check_args(batch_size: int, rank: int, world_size: int, windows: str, horizon: int | None) -> None:
    """One-line ValueError for arguments no evaluation pass can use."""
    if batch_size < 1 or not (0 <= rank < world_size):
        raise ValueError(
            f"build_eval_batches: need batch_size >= 1 and 0 <= rank < world_size, "
            f"got batch_size={batch_size} rank={rank} world_size={world_size}"
        )
    if windows not in WINDOWS:
        raise ValueError(f"build_eval_batches: windows={windows!r}, expected one of {WINDOWS}")
    if horizon is not None and horizon < 1:
        raise ValueError(f"build_eval_batches: horizon={horizon} must be >= 1 (or None)")


def _test_split_info(spec: DatasetSpec, cfg: DataConfig, dataset_id: int) -> DatasetInfo:
    """The dataset's manifest facts, refusing one that has no test split or whose frames do not fit the config."""
    info = DatasetInfo.from_spec(dataset_id, spec, cfg.verify_shards)  # digests: staged shards' names, checks
    T, _, _, c = info.shape
    if T <= cfg.t_in:
        raise UserError(f"{spec.path}: T = {T} frames leaves no rollout target after t_in = {cfg.t_in}")
    if c > cfg.channels:
        raise UserError(f"{spec.path}: {c} channels > data.channels = {cfg.channels}")
    if not info.test:
        if info.remote:
            raise UserError(
                f"dataset {spec.name}: path {spec.path!r} gives no test URLs; write it as "
                f"{{train: URLSPEC, test: URLSPEC}} to evaluate"
            )
        raise UserError(f"{spec.path}: manifest lists no test shards")
    return info


def _make_batch(
    items: list[tuple[int, int, np.ndarray]],
    cfg: DataConfig,
    info: DatasetInfo,
    n_target: int,
    stats: tuple[np.ndarray, np.ndarray],
) -> dict[str, torch.Tensor]:
    """items: (traj_index, start frame s, resized frames [T, X, Y, c]) -> one batch with T_y = n_target."""
    B, res, C, c = len(items), cfg.resolution, cfg.channels, info.shape[3]
    x = torch.zeros(B, res, res, cfg.t_in, C)
    y = torch.zeros(B, res, res, n_target, C)
    steps = []
    for b, (_, s, frames) in enumerate(items):
        target = frames[s : s + n_target]
        write_frames(x.numpy()[b], frames[s - cfg.t_in : s])
        if len(target) == n_target:
            write_frames(y.numpy()[b], target)
        else:  # write_frames needs a contiguous destination: stage the short window
            part = np.zeros((res, res, len(target), C), np.float32)
            write_frames(part, target)
            y[b, :, :, : len(target)] = torch.from_numpy(part)
        steps.append(len(target))
    if cfg.normalize:
        mean_BC, std_BC = np.tile(stats[0], (B, 1)), np.tile(stats[1], (B, 1))
        normalize_(x, mean_BC, std_BC)
        normalize_(y, mean_BC, std_BC)
        for b, n in enumerate(steps):  # frames past the trajectory's end stay exactly zero
            y[b, :, :, n:] = 0
    mask = torch.zeros(B, C, dtype=torch.bool)
    mask[:, :c] = True
    return {
        "x": x,
        "y": y,
        "y_steps": torch.tensor(steps, dtype=torch.long),
        "channel_mask": mask,
        "dataset_id": torch.full((B,), info.index, dtype=torch.long),
        "traj_index": torch.tensor([i for i, _, _ in items], dtype=torch.long),
        "start_frame": torch.tensor([s for _, s, _ in items], dtype=torch.long),
    }


def build_eval_batches(
    spec: DatasetSpec,
    cfg: DataConfig,
    dataset_id: int,
    batch_size: int,
    max_trajectories: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    windows: str = "all",
    horizon: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Deterministic batches over the test split of one dataset.

    Each batch: x [B, X, Y, T_in, C], y [B, X, Y, T_y, C], y_steps [B] (real target frames in y),
    channel_mask [B, C], dataset_id [B], traj_index [B], start_frame [B].
    windows="first": one window per trajectory, T_y = T - t_in (all later frames; the evaluator truncates to
    its rollout length). windows="all": every start frame, T_y = min(horizon, T - t_in) (horizon None = T - t_in),
    windows near the end carry fewer real frames (y_steps < T_y).
    Trajectories are split across ranks by traj_index % world_size (disjoint, together complete);
    the last batch of a rank may be smaller, and ranks may differ by one trajectory.
    """
    _check_args(batch_size, rank, world_size, windows, horizon)
    info = _test_split_info(spec, cfg, dataset_id)
    T = info.shape[0]
    n_target = T - cfg.t_in if windows == "first" or horizon is None else min(horizon, T - cfg.t_in)
    stats = padded_stats(info, cfg.channels)
    starts = range(cfg.t_in, cfg.t_in + 1) if windows == "first" else range(cfg.t_in, T)
    items: list[tuple[int, int, np.ndarray]] = []
    for index, fields in _test_trajectories(info, cfg, max_trajectories, rank, world_size):
        frames = resize_frames(fields, cfg.resolution)
        for s in starts:
            items.append((index, s, frames))
            if len(items) == batch_size:
                yield _make_batch(items, cfg, info, n_target, stats)
                items = []
    if items:
        yield _make_batch(items, cfg, info, n_target, stats)
