"""Training data stream: shard datasets -> random windows -> shuffled, resized, padded batches.

Per dataset, each (rank, worker) reads its own disjoint share of the training shards, in a fresh
seeded order every pass (shards permuted, each read round from a seeded start position), forever (a
resampled stream never runs out, so every rank runs exactly `steps_per_epoch` batches per epoch and no
DeepSpeed collective waits on a rank whose data ended).
Each trajectory read gives `windows_per_trajectory` random windows of t_in + t_ar consecutive
frames; windows pass a shuffle buffer, and each batch element picks its dataset by weight.

This module is the sampler, the shuffle, the mixture and the DataLoader; trajectories come from
trajectories.py and windows become batch tensors in frames.py. Speed: a shard is memory-mapped and each
trajectory is a zero-copy numpy view of its `fields.npy` member (no tarfile, no bytes copies, npy decoded
from its header; the kernel reads each trajectory ahead as it is reached), and a window is written into the
batch with one transposing copy that moves all channels of a grid point at once (the [T, X, Y, C] ->
[X, Y, T, C] transpose done on C*4-byte items instead of 4-byte floats). See docs/data_pipeline.md.

Shards behind URLs (a dataset `path` that is a WebDataset URL spec, see nestor_ds/shards/urls.py) go through
the same sampler, windows, shuffle, mixture and assembly; only the trajectory source differs (a `ShardReader`:
`mapped_trajectories` for local files, `url_trajectories` reading each shard sequentially with webdataset, or
with data.shard_cache `staged_trajectories`, which downloads each shard whole once and then maps it).

Workers: `num_workers = 0` (the default) means the main process on a CPU machine, and GPU_DEFAULT_WORKERS
DataLoader workers with pinned memory when a GPU is present (the GPU would otherwise wait for batch assembly);
set data.num_workers >= 1 to choose. Determinism: batch `s` of rank `r` comes from logical worker `w = s mod W`
(W = max(1, effective workers)),
whose epoch `e = s // steps_per_epoch` stream is seeded by (seed, e, r, w). Resuming at `s` rebuilds
that epoch stream and fast-forwards it without reading trajectory data. The shard positions come from
the manifest, so a URL dataset gives the same batches as the same shards in a local directory.

Device windowing (`TrainStream.packed_batches` + `WindowCutter`, both sides in device_windows.py): the same
sampler, windows, shuffle and mixture, but instead of cutting each window on the host (t_in + t_ar frames copied
per window, then copied again to the device), a packed batch carries each trajectory once, as stored (float16
stays float16), the first time one of its windows is used, plus (trajectory key, t0) per element; `WindowCutter`
keeps the trajectories on the device and cuts, resizes, pads and normalises there. Bytes moved per window drop
from (t_in + t_ar) frames to T / windows_per_trajectory frames, and the host's per-window copy disappears
(docs/data_pipeline.md, "Loader capacity"). The batches equal `batches()` element for element
(tests/test_device_windows.py).

Shape legend: B samples in a batch, X, Y grid points (X = Y = data.resolution in a batch), T frames (T_in
inputs, T_ar targets), C channels (data.channels; a dataset's own c <= C, the rest is padding), M datasets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nestor_ds.data.config import DataConfig
from nestor_ds.data.device_windows import Packer, WindowCutter
from nestor_ds.data.frames import new_batch_tensor, normalize_, padded_stats, resize_frames, write_frames
from nestor_ds.data.trajectories import DatasetInfo, ShardReader, Trajectory, shard_reader
from nestor_ds.errors import UserError
from nestor_ds.shards.schema import DataFormatError

# Seed-sequence tags: keep the random streams of different purposes independent.
_TAG_SHARDS = 0x5A4D  # per-epoch shard permutation, shared by all ranks and workers
_TAG_WINDOWS = 0x57A1  # per-(epoch, rank, worker, dataset) shard order, window starts, shuffle buffer
_TAG_MIX = 0x313C  # per-(epoch, rank, worker) dataset choice of each batch element

_log = logging.getLogger("nestor_ds.data.stream")


def slot_shares(counts: list[int], perm: np.ndarray, slot: int, n_slots: int) -> list[tuple[int, int, int]]:
    """This slot's share of the shards as (shard index, modulus, residue): it reads the samples of that
    shard whose position p has p % modulus == residue.

    With at least as many shards as slots, shards are dealt out whole (perm[slot::n_slots]); with
    fewer, a shard is shared by the slots k with k % n == its position and split by sample position.
    Either way the shares of all slots are disjoint and together cover every sample.
    """
    n = len(counts)
    if n >= n_slots:
        return [(int(i), 1, 0) for i in perm[slot::n_slots]]
    sharers = len(range(slot % n, n_slots, n))
    return [(int(perm[slot % n]), sharers, slot // n)]


class _WindowSource:
    """The windows of one dataset for one (epoch, rank, worker): shards -> trajectories -> windows -> shuffle."""

    def __init__(
        self,
        info: DatasetInfo,
        cfg: DataConfig,
        seed: int,
        epoch: int,
        rank: int,
        worker: int,
        n_workers: int,
        world_size: int,
    ):
        self.info, self.cfg = info, cfg
        counts = [c for _, c in info.train]
        perm = np.random.default_rng([seed, _TAG_SHARDS, epoch, info.index]).permutation(len(counts))
        self.share = slot_shares(counts, perm, rank * n_workers + worker, world_size * n_workers)
        got = sum(len(range(res, counts[i], mod)) for i, mod, res in self.share)
        if got == 0:
            raise UserError(
                f"dataset {info.spec.name}: rank {rank} worker {worker} gets no training "
                f"trajectory ({len(counts)} shards, {sum(counts)} trajectories, "
                f"{world_size * n_workers} rank-worker slots); use fewer workers or ranks"
            )
        self.rng = np.random.default_rng([seed, _TAG_WINDOWS, epoch, rank, worker, info.index])
        self.eager = True
        self._it = self._shuffled()

    def next(self) -> tuple[Trajectory, int]:
        return next(self._it)

    def close(self) -> None:
        """Drop the shuffle buffer and the shard being read now, not at the garbage collector's next cycle pass (the
        generators and this source refer to each other): a staged shard stays leased, and unevictable, while one of
        its trajectories is held (data.shard_cache_max_gb)."""
        self._it.close()

    def _trajectories(self) -> Iterator[Trajectory]:
        """The share's trajectories, pass after pass: shards in a seeded order, each one read from a seeded start
        position round to the one before it.

        Why the rotation: an epoch (`steps_per_epoch`) is usually shorter than a pass over the data, and every
        epoch builds its sources afresh; read from their first trajectory, a shard's later trajectories were
        never reached (measured: 30 of 64 per dataset ever trained on, docs/data_pipeline.md)."""
        read: ShardReader = shard_reader(self.info, self.cfg.shard_cache, self.cfg.shard_cache_max_bytes)
        while True:
            for j in self.rng.permutation(len(self.share)):
                shard, mod, res = self.share[j]
                location, count = self.info.train[shard]
                start = int(self.rng.integers(len(range(res, count, mod))))
                yield from read(location, count, mod, res, self.info, lambda: self.eager, start, None)
                yield from read(location, count, mod, res, self.info, lambda: self.eager, 0, start)

    def _windows(self) -> Iterator[tuple[Trajectory, int]]:
        length = self.cfg.t_in + self.cfg.t_ar
        n_starts = self.info.shape[0] - length + 1
        k = self.cfg.windows_per_trajectory
        for traj in self._trajectories():
            for t0 in self.rng.choice(n_starts, size=k, replace=n_starts < k):
                yield traj, int(t0)

    def _shuffled(self) -> Iterator[tuple[Trajectory, int]]:
        buffer: list[tuple[Trajectory, int]] = []
        capacity = self.cfg.shuffle_buffer
        for window in self._windows():
            if len(buffer) < capacity:
                buffer.append(window)
                continue
            j = int(self.rng.integers(capacity))
            out, buffer[j] = buffer[j], window
            yield out


class _EpochStream:
    """Batches of one (epoch, rank, logical worker): a weighted mixture of the dataset window sources."""

    def __init__(self, owner: TrainStream, epoch: int, worker: int, n_workers: int):
        self.owner, self.epoch, self.worker, self.n_workers = owner, epoch, worker, n_workers
        self.rng = np.random.default_rng([owner.seed, _TAG_MIX, epoch, owner.rank, worker])
        self.sources: dict[int, _WindowSource] = {}

    def _source(self, d: int) -> _WindowSource:
        if d not in self.sources:
            o = self.owner
            self.sources[d] = _WindowSource(
                o.infos[d], o.cfg, o.seed, self.epoch, o.rank, self.worker, self.n_workers, o.world_size
            )
        return self.sources[d]

    def next_batch(self, materialize: bool = True, packer: Packer | None = None) -> dict[str, torch.Tensor] | None:
        """The next batch: assembled on the host, or packed for device windowing when a packer is given (which
        also counts the windows a resume fast-forward skips, so each trajectory is released after its last)."""
        o = self.owner
        choice = self.rng.choice(len(o.infos), size=o.micro_batch, p=o.probs)
        windows = []
        for d in choice:
            src = self._source(int(d))
            src.eager = materialize
            windows.append((int(d), *src.next()))
        if packer is not None:
            return packer.pack(windows) if materialize else packer.skip(windows)
        return o.assemble(windows) if materialize else None


class _RankDataset(IterableDataset):
    """IterableDataset whose DataLoader workers each produce whole batches (batch_size=None)."""

    def __init__(self, stream: TrainStream, start_step: int, packed: bool = False):
        super().__init__()
        self.stream, self.start_step, self.packed = stream, start_step, packed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        j, n = (0, 1) if info is None else (info.id, info.num_workers)
        return self.stream.steps(self.start_step, j, n, packed=self.packed)


GPU_DEFAULT_WORKERS = 2  # DataLoader workers per rank when data.num_workers = 0 and a GPU is present


def effective_workers(num_workers: int) -> int:
    """DataLoader workers actually used: the configured count, or GPU_DEFAULT_WORKERS for 0 on a GPU machine."""
    return num_workers if num_workers > 0 or not torch.cuda.is_available() else GPU_DEFAULT_WORKERS


class TrainStream:
    """The endless training batches of one rank (see the module docstring for the guarantees)."""

    def __init__(self, cfg: DataConfig, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        cfg.validate()
        if micro_batch < 1 or not (0 <= rank < world_size):
            raise ValueError(
                f"TrainStream: need micro_batch >= 1 and 0 <= rank < world_size, "
                f"got micro_batch={micro_batch} rank={rank} world_size={world_size}"
            )
        self.cfg, self.micro_batch, self.rank, self.world_size, self.seed = cfg, micro_batch, rank, world_size, seed
        self.infos = [DatasetInfo.from_spec(i, s, cfg.verify_shards) for i, s in enumerate(cfg.datasets)]
        weights = np.asarray([s.weight for s in cfg.datasets], dtype=np.float64)
        self.probs = weights / weights.sum()
        self._stats = [padded_stats(info, cfg.channels) for info in self.infos]

    @property
    def n_workers(self) -> int:
        return max(1, effective_workers(self.cfg.num_workers))

    def batches(self, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches start_step, start_step + 1, ... forever (identical to an uninterrupted run)."""
        yield from self._loader(start_step, packed=False)

    def packed_batches(self, start_step: int = 0) -> Iterator[dict]:
        """The batches of `batches(start_step)` packed for device windowing: feed them, in order, to one
        `WindowCutter` (`self.cutter(device)`), which returns batches equal to `batches()`'s.

        A packed batch: `worker` (logical worker, a key namespace), `new_keys` [n] and `new_data` (n host
        tensors [T, X, Y, c] in the stored dtype, float32 or float16: trajectories sent for the first time), `key`,
        `t0`, `dataset_id`, `skipped` [B] (one window per element), `release` [r] (keys whose last window this
        batch uses)."""
        yield from self._loader(start_step, packed=True)

    def source(self, device: torch.device) -> Callable[[int], Iterator[dict]]:
        """What the trainer iterates from a step on: `batches` (windows cut on the host), or with
        ``data.device_windows`` the same batches cut on `device` from trajectories sent there once."""
        if not self.cfg.device_windows:
            return self.batches
        _log.info("data: windows cut on %s from trajectories sent there once (data.device_windows)", device)

        def cut_on_device(start_step: int) -> Iterator[dict]:
            cutter = self.cutter(device)
            for packed in self.packed_batches(start_step):
                yield cutter(packed)

        return cut_on_device

    def cutter(self, device: torch.device | str) -> WindowCutter:
        """A fresh `WindowCutter` for one pass of `packed_batches` (its trajectory cache starts empty)."""
        return WindowCutter(self.cfg, self._stats, device)

    def _loader(self, start_step: int, packed: bool) -> Iterator[dict]:
        if start_step < 0:
            raise ValueError(f"TrainStream.batches: start_step must be >= 0, got {start_step}")
        workers = effective_workers(self.cfg.num_workers)
        if workers == 0:
            yield from self.steps(start_step, 0, 1, packed=packed)
            return
        # pinned batches: the trainer copies them to the GPU with non_blocking=True (engine/hot_loop.py)
        loader = DataLoader(
            _RankDataset(self, start_step, packed),
            batch_size=None,
            num_workers=workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )
        yield from loader

    def steps(self, start_step: int, j: int, n_workers: int, packed: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of DataLoader worker j of n: steps start_step + j, start_step + j + n, ...

        They all belong to logical worker w = (start_step + j) % n, so the round-robin order of the
        DataLoader reproduces the global step order no matter where the run resumed. `packed`: packed
        batches for device windowing (see `packed_batches`) instead of assembled ones.
        """
        spe = self.cfg.steps_per_epoch
        w = (start_step + j) % n_workers
        s = start_step + j
        epoch: _EpochStream | None = None
        packer = Packer(self, w) if packed else None
        while True:
            e = s // spe
            if epoch is None or epoch.epoch != e:
                if packer is not None:
                    packer.new_epoch()
                if epoch is not None:
                    for source in epoch.sources.values():
                        source.close()
                epoch = _EpochStream(self, e, w, n_workers)
                first = e * spe + (w - e * spe) % n_workers  # first step of epoch e owned by w
                for _ in range((s - first) // n_workers):  # fast-forward: no trajectory reads
                    epoch.next_batch(materialize=False, packer=packer)
            yield epoch.next_batch(packer=packer)
            s += n_workers

    def assemble(self, windows: list[tuple[int, Trajectory, int]]) -> dict[str, torch.Tensor]:
        """Cut, resize, pad and normalise the chosen windows into one batch dict."""
        cfg = self.cfg
        B, res, C = len(windows), cfg.resolution, cfg.channels
        zero = any(self.infos[d].shape[3] < C for d, _, _ in windows)
        x = new_batch_tensor((B, res, res, cfg.t_in, C), zero)
        y = new_batch_tensor((B, res, res, cfg.t_ar, C), zero)
        xa, ya = x.numpy(), y.numpy()
        mask = torch.zeros(B, C, dtype=torch.bool)
        dataset_id = torch.empty(B, dtype=torch.long)
        skipped = torch.zeros(B, dtype=torch.bool)
        for b, (d, traj, t0) in enumerate(windows):
            dataset_id[b] = d
            window = traj.load()[t0 : t0 + cfg.t_in + cfg.t_ar]
            if not np.isfinite(window).all():
                skipped[b] = self._bad_window(d, traj, t0, window)
                x[b], y[b] = 0.0, 0.0  # channel mask stays False: out of the relative-L2 loss
                continue
            frames = resize_frames(window, res)
            write_frames(xa[b], frames[: cfg.t_in])
            write_frames(ya[b], frames[cfg.t_in :])
            mask[b, : frames.shape[3]] = True
        if cfg.normalize:
            mean = np.stack([self._stats[d][0] for d, _, _ in windows])
            std = np.stack([self._stats[d][1] for d, _, _ in windows])
            normalize_(x, mean, std)
            normalize_(y, mean, std)
        return {"x": x, "y": y, "channel_mask": mask, "dataset_id": dataset_id, "skipped": skipped}

    def _bad_window(self, d: int, traj: Trajectory, t0: int, window: np.ndarray) -> bool:
        """A window with NaN/Inf: raise naming dataset, shard and sample key, or (on_bad_sample=skip) log it.

        Skipping keeps the batch's composition (the element is zeroed and masked out), so the stream, and a
        resumed run, stay exactly the same whatever the data holds."""
        bad = int((~np.isfinite(window)).sum())
        what = (
            f"dataset {self.infos[d].spec.name}: {traj.where()}: {bad} NaN/Inf value(s) in frames "
            f"{t0}..{t0 + window.shape[0] - 1}"
        )
        if self.cfg.on_bad_sample != "skip":
            raise DataFormatError(self.infos[d].spec.path, f"{what} (set data.on_bad_sample: skip to train past it)")
        _log.warning("%s: skipped (data.on_bad_sample: skip)", what)
        return True
