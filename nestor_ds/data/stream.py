"""Training data stream: shard datasets -> random windows -> shuffled, resized, padded batches.

Per dataset, each (rank, worker) reads its own disjoint share of the training shards, in a fresh
seeded order every pass, forever (a resampled stream never runs out, so every rank runs exactly
`steps_per_epoch` batches per epoch and no DeepSpeed collective waits on a rank whose data ended).
Each trajectory read gives `windows_per_trajectory` random windows of t_in + t_ar consecutive
frames; windows pass a shuffle buffer, and each batch element picks its dataset by weight.

Speed: a shard is memory-mapped and each trajectory is a zero-copy numpy view of its `fields.npy`
member (no tarfile, no bytes copies, npy decoded from its header; the kernel reads each trajectory
ahead as it is reached), and a window is written into the batch with
one transposing copy that moves all channels of a grid point at once (the [T, X, Y, C] -> [X, Y, T, C]
transpose done on C*4-byte items instead of 4-byte floats). See docs/data_pipeline.md.

Shards behind URLs (a dataset `path` that is a WebDataset URL spec, see urls.py) go through the same
sampler, windows, shuffle, mixture and assembly; only the trajectory source differs (a `ShardReader`:
`mapped_trajectories` for local files, `url_trajectories` reading each shard sequentially with webdataset).

Workers: `num_workers = 0` (the default) means the main process on a CPU machine, and GPU_DEFAULT_WORKERS
DataLoader workers with pinned memory when a GPU is present (the GPU would otherwise wait for batch assembly);
set data.num_workers >= 1 to choose. Determinism: batch `s` of rank `r` comes from logical worker `w = s mod W`
(W = max(1, effective workers)),
whose epoch `e = s // steps_per_epoch` stream is seeded by (seed, e, r, w). Resuming at `s` rebuilds
that epoch stream and fast-forwards it without reading trajectory data. The shard positions come from
the manifest, so a URL dataset gives the same batches as the same shards in a local directory.
"""

from __future__ import annotations

import mmap
import os
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig, DatasetSpec, spec_manifest
from nestor_ds.shards.schema import FIELDS_EXT, DataFormatError, sha256_file
from nestor_ds.shards.tar import decode_sample, iter_shard_samples, map_fields
from nestor_ds.shards.urls import is_url_spec, iter_url_samples, shard_urls, split_spec

# Seed-sequence tags: keep the random streams of different purposes independent.
_TAG_SHARDS = 0x5A4D   # per-epoch shard permutation, shared by all ranks and workers
_TAG_WINDOWS = 0x57A1  # per-(epoch, rank, worker, dataset) shard order, window starts, shuffle buffer
_TAG_MIX = 0x313C      # per-(epoch, rank, worker) dataset choice of each batch element

_log = logging.getLogger("nestor_ds.data.stream")
_VERIFIED: set[tuple[str, str]] = set()  # (shard path, sha256) checked by this process

# ----------------------------------------------------------------------------------------------
# Per-dataset facts, frame preparation and batch writing (shared with evalset.py)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline needs from one dataset's manifest, read once at start-up."""

    index: int
    spec: DatasetSpec
    remote: bool                              # shards are URLs read by webdataset, not mapped files
    shape: tuple[int, int, int, int]          # T, X, Y, C of every trajectory
    train: tuple[tuple[str, int], ...]        # (shard file path or URL, trajectory count), manifest order
    test: tuple[tuple[str, int], ...]         # empty for a URL spec without test URLs
    mean: np.ndarray                          # [C] training-split statistics
    std: np.ndarray                           # [C], zeros replaced by 1 (constant channels)
    digests: dict[str, str] = field(default_factory=dict, hash=False, compare=False)  # local shard path -> sha256

    @classmethod
    def from_spec(cls, index: int, spec: DatasetSpec) -> "DatasetInfo":
        manifest = spec_manifest(spec)
        splits = manifest["splits"]
        remote = is_url_spec(spec.path)

        def shards(split: str) -> tuple[tuple[str, int], ...]:
            if remote:
                urls = split_spec(spec.path, split)
                return shard_urls(urls, manifest, split, f"dataset {spec.name}") if urls else ()
            return tuple((str(Path(spec.path) / s["file"]), int(s["count"]))
                         for s in splits.get(split, {}).get("shards", []))

        std = np.asarray(manifest["stats"]["std"], dtype=np.float32)
        digests = {} if remote else {str(Path(spec.path) / s["file"]): s["sha256"] for split in splits.values()
                                     for s in split.get("shards", []) if s.get("sha256")}
        return cls(index=index, spec=spec, remote=remote, shape=tuple(manifest["shape"]),
                   train=shards("train"), test=shards("test"), digests=digests,
                   mean=np.asarray(manifest["stats"]["mean"], dtype=np.float32),
                   std=np.where(std > 0, std, np.float32(1.0)).astype(np.float32))

    def check(self, arr: np.ndarray, where: str) -> np.ndarray:
        if arr.shape != self.shape:
            raise DataFormatError(where, f"fields shape {list(arr.shape)} != manifest shape {list(self.shape)}")
        return arr


def resize_frames(frames_TXYc: np.ndarray, resolution: int) -> np.ndarray:
    """Bilinear resize of frames [T, X, Y, c] to [T, R, R, c] (align_corners=False, no antialias), as DPOT.

    Returns the input unchanged when it is already at the resolution.
    """
    _, X, Y, _ = frames_TXYc.shape
    if X == resolution and Y == resolution:
        return frames_TXYc
    if not frames_TXYc.flags.writeable:  # memory-mapped shard: torch wants writable memory
        frames_TXYc = frames_TXYc.copy()
    t_TcXY = torch.from_numpy(np.ascontiguousarray(frames_TXYc)).permute(0, 3, 1, 2)
    out = F.interpolate(t_TcXY, size=(resolution, resolution), mode="bilinear",
                        align_corners=False, antialias=False)
    return out.permute(0, 2, 3, 1).contiguous().numpy()


def write_frames(dst_XYTC: np.ndarray, src_TXYc: np.ndarray) -> None:
    """dst[x, y, t, :c] = src[t, x, y, :]: the frame-major -> grid-major transpose of one sample.

    Each grid point's c channels (c*4 contiguous bytes) are moved as one item, which makes this copy
    several times faster than an element-wise float transpose. Channels >= c of dst are left as they
    are (the caller zero-fills them).
    """
    T, X, Y, c = src_TXYc.shape
    C = dst_XYTC.shape[-1]
    src = np.ascontiguousarray(src_TXYc, dtype=np.float32).view(f"V{4 * c}").reshape(T, X * Y)
    if c == C:
        dst = dst_XYTC.view(f"V{4 * C}").reshape(X * Y, T)
    else:
        item = np.dtype({"names": ["v"], "formats": [f"V{4 * c}"], "offsets": [0], "itemsize": 4 * C})
        dst = dst_XYTC.view(item).reshape(X * Y, T)["v"]
    dst[...] = src.T


def new_batch_tensor(shape: tuple[int, ...], zero: bool) -> torch.Tensor:
    """A float32 batch tensor (zero-filled when some channels stay padding).

    Allocated by numpy, which asks for transparent huge pages on large arrays: a fresh 10 MB batch then
    costs a few page faults instead of thousands (measured 1.5-2x faster assembly than torch.empty).
    """
    return torch.from_numpy((np.zeros if zero else np.empty)(shape, dtype=np.float32))


def normalize_(t_B: torch.Tensor, mean_BC: np.ndarray, std_BC: np.ndarray) -> None:
    """In place (v - mean) / std per sample and channel; padded channels carry mean 0, std 1."""
    a = t_B.numpy()
    shape = (a.shape[0],) + (1,) * (a.ndim - 2) + (a.shape[-1],)
    a -= mean_BC.reshape(shape)
    a /= std_BC.reshape(shape)


def padded_stats(info: DatasetInfo, channels: int) -> tuple[np.ndarray, np.ndarray]:
    c = info.shape[3]
    mean = np.zeros(channels, np.float32)
    std = np.ones(channels, np.float32)
    mean[:c], std[:c] = info.mean, info.std
    return mean, std


# ----------------------------------------------------------------------------------------------
# Training pipeline
# ----------------------------------------------------------------------------------------------

class Trajectory(Protocol):
    """One trajectory of a training shard; `load()` returns its [T, X, Y, C] float32 array; `where()` names
    its shard and sample key for error messages."""

    def load(self) -> np.ndarray: ...

    def where(self) -> str: ...


# A trajectory source: (shard location, trajectory count, modulus, residue, info, eager) -> the shard's
# trajectories at positions p with p % modulus == residue, in tar order. While `eager()` is True each one is
# read as it is yielded; otherwise (resume fast-forward) it is read on its first `load()`, if ever.
ShardReader = Callable[[str, int, int, int, DatasetInfo, Callable[[], bool]], Iterator[Trajectory]]


class _MappedTrajectory:
    """One trajectory in a local shard; its data is read on first use (eagerly while streaming, lazily for
    windows that entered the shuffle buffer during a resume fast-forward)."""

    __slots__ = ("path", "key", "offset", "size", "info", "_arr")

    def __init__(self, path: str, key: str, offset: int, size: int, info: DatasetInfo):
        self.path, self.key, self.offset, self.size, self.info = path, key, offset, size, info
        self._arr: np.ndarray | None = None

    def where(self) -> str:
        return f"shard {self.path} sample {self.key}"

    def load(self, mm: mmap.mmap | None = None) -> np.ndarray:
        """Map the trajectory (the shard's mmap while streaming; a fresh one for a lazy load)."""
        if self._arr is None:
            where = f"{self.path} key {self.key}"
            if mm is None:
                with open(self.path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._arr = self.info.check(map_fields(mm, self.offset, self.size, where), where)
        return self._arr


def check_shard_once(path: str, sha256: str | None) -> None:
    """Compare a local shard with its manifest sha256, once per process, before its first use.

    A flipped byte in a float32 payload trains silently (values of 1e28 were seen): the whole file is hashed
    (cost measured in docs/reliability.md: well under 2% of a demo run). Each DataLoader worker process checks
    the shards it reads."""
    if not sha256 or (path, sha256) in _VERIFIED:
        return
    digest = sha256_file(path)
    if digest != sha256:
        raise DataFormatError(path, f"sha256 {digest[:12]}... but the manifest says {sha256[:12]}...: the shard "
                                    f"changed after the build (corrupted copy?); rebuild it or check it with "
                                    f"nestor_ds.shards --verify")
    _VERIFIED.add((path, sha256))


def mapped_trajectories(path: str, count: int, mod: int, res: int, info: DatasetInfo,
                        eager: Callable[[], bool]) -> Iterator[_MappedTrajectory]:
    """ShardReader of a local shard file: memory-mapped, tar headers walked by `iter_shard_samples`."""
    check_shard_once(path, info.digests.get(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)  # stays valid after close
        seen = 0
        for pos, (key, members) in enumerate(iter_shard_samples(fd, path)):
            seen = pos + 1
            if pos % mod != res:
                continue
            if FIELDS_EXT not in members:
                raise DataFormatError(path, f"sample '{key}' has no .{FIELDS_EXT} member")
            traj = _MappedTrajectory(path, key, *members[FIELDS_EXT], info)
            if eager():
                traj.load(mm)
            yield traj
        if seen != count:  # a shard replaced or truncated after the build: never spin on a share that yields nothing
            raise DataFormatError(path, f"holds {seen} samples, the manifest says {count} "
                                        f"(check it with nestor_ds.shards --verify)")
    finally:
        os.close(fd)


UrlSample = tuple[str, dict[str, bytes]]  # (key, {extension: member bytes}) from urls.iter_url_samples


class _UrlTrajectory:
    """One trajectory of a shard URL. Streamed trajectories arrive decoded; one created during a resume
    fast-forward is fetched on first use by re-reading its shard from the start up to its position."""

    __slots__ = ("url", "pos", "info", "meta", "key", "_arr")

    def __init__(self, url: str, pos: int, info: DatasetInfo, sample: UrlSample | None = None):
        self.url, self.pos, self.info = url, pos, info
        self.meta: dict | None = None
        self.key: str | None = None
        self._arr: np.ndarray | None = None
        if sample is not None:
            self._decode(sample)

    def _decode(self, sample: UrlSample) -> None:
        self.key, members = sample
        fields, self.meta = decode_sample(self.key, members, self.url)
        self._arr = self.info.check(fields.astype(np.float32, copy=False), f"{self.url} key {self.key}")

    def where(self) -> str:
        return f"shard {self.url} sample {self.key or f'#{self.pos}'}"

    def load(self) -> np.ndarray:
        if self._arr is None:
            samples = iter_url_samples(self.url)
            try:
                self._decode(_advance(samples, self.pos + 1, self.url))
            finally:
                samples.close()
        return self._arr


def _advance(samples: Iterator[UrlSample], n: int, url: str) -> UrlSample:
    """Consume n samples and return the last (the shard must hold at least n, as its manifest says)."""
    sample = None
    for _ in range(n):
        sample = next(samples, None)
        if sample is None:
            raise DataFormatError(url, f"shard ended before sample {n - 1} (fewer samples than the manifest count)")
    return sample


def url_trajectories(url: str, count: int, mod: int, res: int, info: DatasetInfo,
                     eager: Callable[[], bool]) -> Iterator[_UrlTrajectory]:
    """ShardReader of a shard URL: one sequential webdataset read, opened when the first eager trajectory
    is due. Positions come from the manifest count, so a fast-forward yields lazy trajectories unread."""
    samples: Iterator[UrlSample] | None = None
    at = 0  # position of the next sample of `samples`
    try:
        for pos in range(res, count, mod):
            if not eager():
                yield _UrlTrajectory(url, pos, info)
                continue
            if samples is None:
                samples = iter_url_samples(url)
            sample = _advance(samples, pos + 1 - at, url)
            at = pos + 1
            yield _UrlTrajectory(url, pos, info, sample)
    finally:
        if samples is not None:
            samples.close()


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

    def __init__(self, info: DatasetInfo, cfg: DataConfig, seed: int, epoch: int, rank: int,
                 worker: int, n_workers: int, world_size: int):
        self.info, self.cfg = info, cfg
        counts = [c for _, c in info.train]
        perm = np.random.default_rng([seed, _TAG_SHARDS, epoch, info.index]).permutation(len(counts))
        self.share = slot_shares(counts, perm, rank * n_workers + worker, world_size * n_workers)
        got = sum(len(range(res, counts[i], mod)) for i, mod, res in self.share)
        if got == 0:
            raise ValueError(f"dataset {info.spec.name}: rank {rank} worker {worker} gets no training "
                             f"trajectory ({len(counts)} shards, {sum(counts)} trajectories, "
                             f"{world_size * n_workers} rank-worker slots); use fewer workers or ranks")
        self.rng = np.random.default_rng([seed, _TAG_WINDOWS, epoch, rank, worker, info.index])
        self.eager = True
        self._it = self._shuffled()

    def next(self) -> tuple[Trajectory, int]:
        return next(self._it)

    def _trajectories(self) -> Iterator[Trajectory]:
        read: ShardReader = url_trajectories if self.info.remote else mapped_trajectories
        while True:
            for j in self.rng.permutation(len(self.share)):
                shard, mod, res = self.share[j]
                yield from read(*self.info.train[shard], mod, res, self.info, lambda: self.eager)

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

    def __init__(self, owner: "TrainStream", epoch: int, worker: int, n_workers: int):
        self.owner, self.epoch, self.worker, self.n_workers = owner, epoch, worker, n_workers
        self.rng = np.random.default_rng([owner.seed, _TAG_MIX, epoch, owner.rank, worker])
        self.sources: dict[int, _WindowSource] = {}

    def _source(self, d: int) -> _WindowSource:
        if d not in self.sources:
            o = self.owner
            self.sources[d] = _WindowSource(o.infos[d], o.cfg, o.seed, self.epoch, o.rank,
                                            self.worker, self.n_workers, o.world_size)
        return self.sources[d]

    def next_batch(self, materialize: bool = True) -> dict[str, torch.Tensor] | None:
        o = self.owner
        choice = self.rng.choice(len(o.infos), size=o.micro_batch, p=o.probs)
        windows = []
        for d in choice:
            src = self._source(int(d))
            src.eager = materialize
            windows.append((int(d), *src.next()))
        return o.assemble(windows) if materialize else None


class _RankDataset(IterableDataset):
    """IterableDataset whose DataLoader workers each produce whole batches (batch_size=None)."""

    def __init__(self, stream: "TrainStream", start_step: int):
        super().__init__()
        self.stream, self.start_step = stream, start_step

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        j, n = (0, 1) if info is None else (info.id, info.num_workers)
        return self.stream.steps(self.start_step, j, n)


GPU_DEFAULT_WORKERS = 2   # DataLoader workers per rank when data.num_workers = 0 and a GPU is present


def effective_workers(num_workers: int) -> int:
    """DataLoader workers actually used: the configured count, or GPU_DEFAULT_WORKERS for 0 on a GPU machine."""
    return num_workers if num_workers > 0 or not torch.cuda.is_available() else GPU_DEFAULT_WORKERS


class TrainStream:
    """The endless training batches of one rank (see the module docstring for the guarantees)."""

    def __init__(self, cfg: DataConfig, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        cfg.validate()
        if micro_batch < 1 or not (0 <= rank < world_size):
            raise ValueError(f"TrainStream: need micro_batch >= 1 and 0 <= rank < world_size, "
                             f"got micro_batch={micro_batch} rank={rank} world_size={world_size}")
        self.cfg, self.micro_batch, self.rank, self.world_size, self.seed = cfg, micro_batch, rank, world_size, seed
        self.infos = [DatasetInfo.from_spec(i, s) for i, s in enumerate(cfg.datasets)]
        weights = np.asarray([s.weight for s in cfg.datasets], dtype=np.float64)
        self.probs = weights / weights.sum()
        self._stats = [padded_stats(info, cfg.channels) for info in self.infos]

    @property
    def n_workers(self) -> int:
        return max(1, effective_workers(self.cfg.num_workers))

    def batches(self, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches start_step, start_step + 1, ... forever (identical to an uninterrupted run)."""
        if start_step < 0:
            raise ValueError(f"TrainStream.batches: start_step must be >= 0, got {start_step}")
        workers = effective_workers(self.cfg.num_workers)
        if workers == 0:
            yield from self.steps(start_step, 0, 1)
            return
        # pinned batches: the trainer copies them to the GPU with non_blocking=True (engine/hot_loop.py)
        loader = DataLoader(_RankDataset(self, start_step), batch_size=None, num_workers=workers,
                            persistent_workers=False, pin_memory=torch.cuda.is_available())
        yield from loader

    def steps(self, start_step: int, j: int, n_workers: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of DataLoader worker j of n: steps start_step + j, start_step + j + n, ...

        They all belong to logical worker w = (start_step + j) % n, so the round-robin order of the
        DataLoader reproduces the global step order no matter where the run resumed.
        """
        spe = self.cfg.steps_per_epoch
        w = (start_step + j) % n_workers
        s = start_step + j
        epoch: _EpochStream | None = None
        while True:
            e = s // spe
            if epoch is None or epoch.epoch != e:
                epoch = _EpochStream(self, e, w, n_workers)
                first = e * spe + (w - e * spe) % n_workers   # first step of epoch e owned by w
                for _ in range((s - first) // n_workers):      # fast-forward: no trajectory reads
                    epoch.next_batch(materialize=False)
            yield epoch.next_batch()
            s += n_workers

    def assemble(self, windows: list[tuple[int, Trajectory, int]]) -> dict[str, torch.Tensor]:
        """Cut, resize, pad and normalise the chosen windows into one batch dict."""
        cfg = self.cfg
        B, R, C = len(windows), cfg.resolution, cfg.channels
        zero = any(self.infos[d].shape[3] < C for d, _, _ in windows)
        x = new_batch_tensor((B, R, R, cfg.t_in, C), zero)
        y = new_batch_tensor((B, R, R, cfg.t_ar, C), zero)
        xa, ya = x.numpy(), y.numpy()
        mask = torch.zeros(B, C, dtype=torch.bool)
        dataset_id = torch.empty(B, dtype=torch.long)
        skipped = torch.zeros(B, dtype=torch.bool)
        for b, (d, traj, t0) in enumerate(windows):
            dataset_id[b] = d
            window = traj.load()[t0:t0 + cfg.t_in + cfg.t_ar]
            if not np.isfinite(window).all():
                skipped[b] = self._bad_window(d, traj, t0, window)
                x[b], y[b] = 0.0, 0.0  # channel mask stays False: out of the relative-L2 loss
                continue
            frames = resize_frames(window, R)
            write_frames(xa[b], frames[:cfg.t_in])
            write_frames(ya[b], frames[cfg.t_in:])
            mask[b, :frames.shape[3]] = True
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
        what = (f"dataset {self.infos[d].spec.name}: {traj.where()}: {bad} NaN/Inf value(s) in frames "
                f"{t0}..{t0 + window.shape[0] - 1}")
        if self.cfg.on_bad_sample != "skip":
            raise DataFormatError(self.infos[d].spec.path, f"{what} (set data.on_bad_sample: skip to train past it)")
        _log.warning("%s: skipped (data.on_bad_sample: skip)", what)
        return True


def build_train_stream(cfg: DataConfig, micro_batch: int, rank: int = 0, world_size: int = 1,
                       seed: int = 0) -> TrainStream:
    """ARCHITECTURE.md name for `TrainStream(...)`."""
    return TrainStream(cfg, micro_batch, rank=rank, world_size=world_size, seed=seed)
