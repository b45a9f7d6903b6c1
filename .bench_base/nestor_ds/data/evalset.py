"""Evaluation pass: every test trajectory once, in a fixed order, as (first t_in frames, all later frames).

The order is the manifest's test shards in order and the samples of each shard in tar order (shards behind
URLs are read sequentially in that order with webdataset);
`traj_index` is a trajectory's position in that order, so results of different ranks or runs can be
joined per trajectory. Frames are resized, padded and normalised exactly like training batches.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import numpy as np
import torch

from .config import DataConfig, DatasetSpec
from .schema import FIELDS_EXT, DataFormatError
from .stream import (DatasetInfo, iter_shard_samples, normalize_, padded_stats,
                     read_fields, resize_frames, write_frames)
from .urls import decode_sample, iter_url_samples


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
        for sample in samples:
            yield sample["__key__"], lambda s=sample: decode_sample(s, url)[0]
    finally:
        samples.close()


def _test_trajectories(info: DatasetInfo, limit: int | None, rank: int,
                       world_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(traj_index, fields [T, X, Y, c]) of this rank's test trajectories (index % world_size == rank);
    other ranks' trajectories are skipped without reading their data."""
    read = _url_samples if info.remote else _local_samples
    index = 0
    for location, _ in info.test:
        for key, fields in read(location):
            if limit is not None and index >= limit:
                return
            if index % world_size == rank:
                yield index, info.check(fields(), f"{location} key {key}")
            index += 1


def build_eval_batches(spec: DatasetSpec, cfg: DataConfig, dataset_id: int, batch_size: int,
                       max_trajectories: int | None = None, rank: int = 0,
                       world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Deterministic batches over the test split of one dataset.

    Each batch: x [B, R, R, t_in, C], y [B, R, R, T - t_in, C] (all frames after the input; the
    evaluator truncates to spec.rollout_steps), channel_mask [B, C], dataset_id [B], traj_index [B].
    Trajectories are split across ranks by traj_index % world_size (disjoint, together complete);
    the last batch of a rank may be smaller, and ranks may differ by one trajectory.
    """
    if batch_size < 1 or not (0 <= rank < world_size):
        raise ValueError(f"build_eval_batches: need batch_size >= 1 and 0 <= rank < world_size, "
                         f"got batch_size={batch_size} rank={rank} world_size={world_size}")
    info = DatasetInfo.from_spec(dataset_id, spec)
    T, _, _, c = info.shape
    if T <= cfg.t_in:
        raise ValueError(f"{spec.path}: T = {T} frames leaves no rollout target after t_in = {cfg.t_in}")
    if c > cfg.channels:
        raise ValueError(f"{spec.path}: {c} channels > data.channels = {cfg.channels}")
    if not info.test:
        if info.remote:
            raise ValueError(f"dataset {spec.name}: path {spec.path!r} gives no test URLs; write it as "
                             f"{{train: URLSPEC, test: URLSPEC}} to evaluate")
        raise ValueError(f"{spec.path}: manifest lists no test shards")
    R, C = cfg.resolution, cfg.channels
    mean, std = padded_stats(info, C)

    def make(items: list[tuple[int, np.ndarray]]) -> dict[str, torch.Tensor]:
        B = len(items)
        x = torch.zeros(B, R, R, cfg.t_in, C)
        y = torch.zeros(B, R, R, T - cfg.t_in, C)
        for b, (_, fields) in enumerate(items):
            frames = resize_frames(fields, R)
            write_frames(x.numpy()[b], frames[:cfg.t_in])
            write_frames(y.numpy()[b], frames[cfg.t_in:])
        if cfg.normalize:
            normalize_(x, np.tile(mean, (B, 1)), np.tile(std, (B, 1)))
            normalize_(y, np.tile(mean, (B, 1)), np.tile(std, (B, 1)))
        mask = torch.zeros(B, C, dtype=torch.bool)
        mask[:, :c] = True
        return {"x": x, "y": y, "channel_mask": mask,
                "dataset_id": torch.full((B,), dataset_id, dtype=torch.long),
                "traj_index": torch.tensor([i for i, _ in items], dtype=torch.long)}

    items: list[tuple[int, np.ndarray]] = []
    for item in _test_trajectories(info, max_trajectories, rank, world_size):
        items.append(item)
        if len(items) == batch_size:
            yield make(items)
            items = []
    if items:
        yield make(items)
