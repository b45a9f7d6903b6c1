"""Trajectories of a dataset's shards: the per-dataset facts from its manifest and the trajectory sources.

`DatasetInfo` is what the pipeline needs from one manifest, read once at start-up. A trajectory source
(`ShardReader`) yields the trajectories of one shard that belong to a reader slot: `mapped_trajectories`
memory-maps a local shard (each trajectory a zero-copy view of its `fields.npy` member, found by
`nestor_ds.shards.tar`), `url_trajectories` reads a shard URL sequentially with webdataset (urls.py), and
`staged_trajectories` stages a shard URL in data.shard_cache (nestor_ds/shards/cache.py) and maps it. A local or
staged shard is compared with its manifest sha256 once per process before its first use.

Shape legend: T frames, X, Y grid points, C channels (of the dataset).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from nestor_ds.data.config import DatasetSpec, spec_manifest
from nestor_ds.shards.cache import Lease, is_staged, stage
from nestor_ds.shards.schema import FIELDS_EXT, DataFormatError, sha256_file
from nestor_ds.shards.tar import decode_sample, iter_shard_samples, map_fields
from nestor_ds.shards.urls import is_url_spec, iter_url_samples, shard_urls, split_spec

_VERIFIED: set[tuple[str, str]] = set()  # (shard path, sha256) checked by this process


@dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline needs from one dataset's manifest, read once at start-up."""

    index: int
    spec: DatasetSpec
    remote: bool  # shards are URLs read by webdataset, not mapped files
    shape: tuple[int, int, int, int]  # T, X, Y, C of every trajectory
    train: tuple[tuple[str, int], ...]  # (shard file path or URL, trajectory count), manifest order
    test: tuple[tuple[str, int], ...]  # empty for a URL spec without test URLs
    mean: np.ndarray  # [C] training-split statistics
    std: np.ndarray  # [C], zeros replaced by 1 (constant channels)
    # shard location (local path or URL) -> sha256 from the manifest; empty with data.verify_shards false
    digests: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def from_spec(cls, index: int, spec: DatasetSpec, verify: bool = True) -> DatasetInfo:
        """`verify`: keep the manifest's shard digests, so that each local (or staged) shard is hashed before its
        first use (`check_shard_once`; data.verify_shards)."""
        manifest = spec_manifest(spec)
        splits = manifest["splits"]
        remote = is_url_spec(spec.path)

        def shards(split: str) -> tuple[tuple[str, int], ...]:
            if remote:
                urls = split_spec(spec.path, split)
                return shard_urls(urls, manifest, split, f"dataset {spec.name}") if urls else ()
            return tuple(
                (str(Path(spec.path) / s["file"]), int(s["count"])) for s in splits.get(split, {}).get("shards", [])
            )

        std = np.asarray(manifest["stats"]["std"], dtype=np.float32)
        train, test = shards("train"), shards("test")
        digests: dict[str, str] = {}
        for split, located in (("train", train), ("test", test)):  # both in manifest order (a URL spec may lack test)
            listed = splits.get(split, {}).get("shards", [])
            digests.update({loc: s["sha256"] for (loc, _), s in zip(located, listed) if verify and s.get("sha256")})
        return cls(
            index=index,
            spec=spec,
            remote=remote,
            shape=tuple(manifest["shape"]),
            train=train,
            test=test,
            digests=digests,
            mean=np.asarray(manifest["stats"]["mean"], dtype=np.float32),
            std=np.where(std > 0, std, np.float32(1.0)).astype(np.float32),
        )

    def check(self, arr: np.ndarray, where: str) -> np.ndarray:
        if arr.shape != self.shape:
            raise DataFormatError(where, f"fields shape {list(arr.shape)} != manifest shape {list(self.shape)}")
        return arr


class Trajectory(Protocol):
    """One trajectory of a training shard; `load()` returns its [T, X, Y, C] float32 array, `load_stored()` the same
    values without a host conversion: in the dtype the shard stores (float32 or float16; float32 once `load()` has
    converted a streamed one), what device windowing sends and converts on the device; `where()` names its shard and
    sample key for error messages."""

    def load(self) -> np.ndarray: ...

    def load_stored(self) -> np.ndarray: ...

    def where(self) -> str: ...


# A trajectory source: (shard location, trajectory count, modulus, residue, info, eager, first, stop) -> the
# shard's trajectories at positions p with p % modulus == residue, in tar order, from the `first`-th of them up to
# (not including) the `stop`-th (None: to the end). While `eager()` is True each one is read as it is yielded;
# otherwise (resume fast-forward) it is read on its first `load()`, if ever.
ShardReader = Callable[[str, int, int, int, DatasetInfo, Callable[[], bool], int, "int | None"], Iterator[Trajectory]]


class _MappedTrajectory:
    """One trajectory in a local shard; its data is mapped on first use (eagerly while streaming, lazily for
    windows that entered the shuffle buffer during a resume fast-forward), and converted to float32 only when
    `load()` asks (a float16 shard on the device path is never converted on the host)."""

    __slots__ = ("path", "key", "offset", "size", "info", "lease", "_stored", "_arr")

    def __init__(self, path: str, key: str, offset: int, size: int, info: DatasetInfo, lease: Lease | None = None):
        self.path, self.key, self.offset, self.size, self.info = path, key, offset, size, info
        self.lease = lease  # a staged shard: kept from eviction while this trajectory lives (it may reopen the file)
        self._stored: np.ndarray | None = None
        self._arr: np.ndarray | None = None

    def where(self) -> str:
        return f"shard {self.path} sample {self.key}"

    def load_stored(self, mm: mmap.mmap | None = None) -> np.ndarray:
        """A read-only view of the trajectory in its stored dtype (the shard's mmap while streaming; a fresh one for
        a lazy load). A view, not a copy read with preadv: into fresh memory that costs more than the page faults
        of the view (docs/data_pipeline.md, "Loader capacity")."""
        if self._stored is None:
            where = f"{self.path} key {self.key}"
            if mm is None:
                with open(self.path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._stored = self.info.check(map_fields(mm, self.offset, self.size, where), where)
        return self._stored

    def load(self) -> np.ndarray:
        """The trajectory as float32: the mapped view itself for a float32 shard, a converted copy for float16."""
        if self._arr is None:
            self._arr = self.load_stored().astype(np.float32, copy=False)
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
        raise DataFormatError(
            path,
            f"sha256 {digest[:12]}... but the manifest says {sha256[:12]}...: the shard "
            f"changed after the build (corrupted copy?); rebuild it or check it with "
            f"nestor_ds.shards --verify",
        )
    _VERIFIED.add((path, sha256))


def mapped_trajectories(
    path: str,
    count: int,
    mod: int,
    res: int,
    info: DatasetInfo,
    eager: Callable[[], bool],
    first: int = 0,
    stop: int | None = None,
    lease: Lease | None = None,
) -> Iterator[_MappedTrajectory]:
    """ShardReader of a local shard file: memory-mapped, tar headers walked by `iter_shard_samples` (positions
    before `first` are passed over by their headers only). `lease`: the staging cache's hold on the file, given to
    each trajectory."""
    check_shard_once(path, info.digests.get(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)  # stays valid after close
        seen = 0
        for pos, (key, members) in enumerate(iter_shard_samples(fd, path)):
            seen = pos + 1
            if pos % mod != res:
                continue
            k = (pos - res) // mod  # index of this trajectory within the share
            if stop is not None and k >= stop:
                return
            if k < first:
                continue
            if FIELDS_EXT not in members:
                raise DataFormatError(path, f"sample '{key}' has no .{FIELDS_EXT} member")
            traj = _MappedTrajectory(path, key, *members[FIELDS_EXT], info, lease)
            if eager():
                traj.load_stored(mm)
            yield traj
        if seen != count:  # a shard replaced or truncated after the build: never spin on a share that yields nothing
            raise DataFormatError(
                path, f"holds {seen} samples, the manifest says {count} (check it with nestor_ds.shards --verify)"
            )
    finally:
        os.close(fd)


UrlSample = tuple[str, dict[str, bytes]]  # (key, {extension: member bytes}) from urls.iter_url_samples


class _UrlTrajectory:
    """One trajectory of a shard URL. Streamed trajectories arrive decoded (in the stored dtype, a view of the member
    bytes; `load()` converts float16 to float32 on first use); one created during a resume fast-forward is fetched
    on first use by re-reading its shard from the start up to its position."""

    __slots__ = ("url", "pos", "info", "meta", "key", "_stored", "_arr")

    def __init__(self, url: str, pos: int, info: DatasetInfo, sample: UrlSample | None = None):
        self.url, self.pos, self.info = url, pos, info
        self.meta: dict | None = None
        self.key: str | None = None
        self._stored: np.ndarray | None = None
        self._arr: np.ndarray | None = None
        if sample is not None:
            self._decode(sample)

    def _decode(self, sample: UrlSample) -> None:
        self.key, members = sample
        fields, self.meta = decode_sample(self.key, members, self.url)
        self._stored = self.info.check(fields, f"{self.url} key {self.key}")

    def where(self) -> str:
        return f"shard {self.url} sample {self.key or f'#{self.pos}'}"

    def load_stored(self) -> np.ndarray:
        if self._stored is None:
            samples = iter_url_samples(self.url)
            try:
                self._decode(_advance(samples, self.pos + 1, self.url))
            finally:
                samples.close()
        return self._stored

    def load(self) -> np.ndarray:
        if self._arr is None:  # the float32 copy replaces a float16 one: the host path never sends the stored one
            self._arr = self._stored = self.load_stored().astype(np.float32, copy=False)
        return self._arr


def _advance(samples: Iterator[UrlSample], n: int, url: str) -> UrlSample:
    """Consume n samples and return the last (the shard must hold at least n, as its manifest says)."""
    sample = None
    for _ in range(n):
        sample = next(samples, None)
        if sample is None:
            raise DataFormatError(url, f"shard ended before sample {n - 1} (fewer samples than the manifest count)")
    return sample


def url_trajectories(
    url: str,
    count: int,
    mod: int,
    res: int,
    info: DatasetInfo,
    eager: Callable[[], bool],
    first: int = 0,
    stop: int | None = None,
) -> Iterator[_UrlTrajectory]:
    """ShardReader of a shard URL: one sequential webdataset read, opened when the first eager trajectory
    is due. Positions come from the manifest count, so a fast-forward yields lazy trajectories unread (and a
    read starting at `first` streams past the samples before it without decoding them)."""
    samples: Iterator[UrlSample] | None = None
    at = 0  # position of the next sample of `samples`
    try:
        for pos in range(res, count, mod)[first:stop]:
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


def stage_checked(url: str, info: DatasetInfo, cache_dir: str, max_bytes: int | None) -> tuple[str, Lease]:
    """The staged copy of shard `url` (downloaded on its first use on this node, checked against the manifest sha256
    as it arrives; one another process staged is hashed once per process, as a local shard) and its lease."""
    sha256 = info.digests.get(url)
    path, downloaded, lease = stage(url, cache_dir, sha256, max_bytes)
    if downloaded and sha256:
        _VERIFIED.add((str(path), sha256))
    check_shard_once(str(path), sha256)
    return str(path), lease


class _StagedTrajectory:
    """A trajectory of a shard URL that a resume fast-forward passed before its shard was staged on this node: the
    shard is staged (downloaded unless a process of the node has it) on the trajectory's first use, if it has one,
    so a resume downloads only the shards it reads, as the streamed reader does."""

    __slots__ = ("url", "pos", "count", "info", "cache_dir", "max_bytes", "_traj")

    def __init__(self, url: str, pos: int, count: int, info: DatasetInfo, cache_dir: str, max_bytes: int | None):
        self.url, self.pos, self.count, self.info = url, pos, count, info
        self.cache_dir, self.max_bytes = cache_dir, max_bytes
        self._traj: _MappedTrajectory | None = None

    def _mapped(self) -> _MappedTrajectory:
        if self._traj is None:
            path, lease = stage_checked(self.url, self.info, self.cache_dir, self.max_bytes)
            one = mapped_trajectories(path, self.count, 1, 0, self.info, lambda: True, self.pos, self.pos + 1, lease)
            try:
                self._traj = next(one)
            finally:
                one.close()
        return self._traj

    def where(self) -> str:
        return self._traj.where() if self._traj else f"shard {self.url} sample #{self.pos}"

    def load_stored(self) -> np.ndarray:
        return self._mapped().load_stored()

    def load(self) -> np.ndarray:
        return self._mapped().load()


def staged_trajectories(cache_dir: str, max_bytes: int | None = None) -> ShardReader:
    """ShardReader of shard URLs through the staging cache `cache_dir` (data.shard_cache; nestor_ds/shards/cache.py;
    `max_bytes`: data.shard_cache_max_gb): a shard is staged on its first read on this node, then read memory-mapped
    like a local shard, so trajectories, positions and batches are those of `url_trajectories`. A resume
    fast-forward walks the tar headers of shards already staged and, for the others, yields `_StagedTrajectory`s
    that stage their shard only if they are used."""

    def read(
        url: str,
        count: int,
        mod: int,
        res: int,
        info: DatasetInfo,
        eager: Callable[[], bool],
        first: int = 0,
        stop: int | None = None,
    ) -> Iterator[_MappedTrajectory | _StagedTrajectory]:
        positions = range(res, count, mod)[first:stop]
        k = 0  # trajectories of `positions` yielded so far
        while k < len(positions) and not eager() and not is_staged(url, cache_dir, info.digests.get(url)):
            yield _StagedTrajectory(url, positions[k], count, info, cache_dir, max_bytes)
            k += 1
        if k < len(positions):
            path, lease = stage_checked(url, info, cache_dir, max_bytes)
            yield from mapped_trajectories(path, count, mod, res, info, eager, first + k, stop, lease)

    return read


def shard_reader(info: DatasetInfo, cache_dir: str | None, max_bytes: int | None = None) -> ShardReader:
    """How a dataset's shards are read: mapped (local), staged then mapped (URLs with a cache), or streamed."""
    if not info.remote:
        return mapped_trajectories
    return staged_trajectories(cache_dir, max_bytes) if cache_dir else url_trajectories
