"""Build WebDataset shards + manifest from raw PDE files (verifying a built directory: verify.py).

Why it is shaped this way:
- One task = one shard. A worker process opens the source files itself, streams the shard's
  trajectories (never a whole file), writes the tar and returns only small things (count, sha256,
  per-channel partial statistics). Partial statistics are merged in shard order with Chan's
  parallel formula in float64, so the manifest does not depend on the number of workers.
- Shard contents are fixed before any data is read (trajectories per shard from the sample size),
  so the output is a pure function of the inputs and options: byte-identical on rebuild.
- The build happens in a temporary directory beside the target and is moved into place with
  `os.replace` only when everything succeeded; on any error the temporary directory is removed,
  and so are the parent directories of the target that this build created.
- Concurrent builds into one output cannot both "succeed" (output.py: an exclusive lock beside the
  output, a last re-check before the final rename, leftovers of killed builds removed).
- An `s3://bucket/prefix` output is built the same way in a local staging directory (under $TMPDIR: it needs the
  disk space of one dataset's shards) and then uploaded by output.publish_s3, shards first and manifest.json last.
- The same file reached through two paths (`raw/x.h5`, `raw/../raw/x.h5`, a symlink) is read once
  (inputs are de-duplicated by device and inode), and no (source file, index) may be in both splits.

Shape legend: T frames, X, Y grid points, C channels (of one trajectory).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import io
import math
import multiprocessing as mp
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nestor_ds.log import get_logger
from nestor_ds.shards import s3, schema
from nestor_ds.shards.ingest import READ_ERRORS, Entry, SourceInfo, is_case_file, open_reader
from nestor_ds.shards.output import (
    check_s3_out,
    make_parents,
    output_lock,
    prepare_out,
    publish_s3,
    remove_dirs,
    remove_stale,
    swap_into_place,
)
from nestor_ds.shards.schema import LAYOUTS, DataFormatError
from nestor_ds.shards.stats import ChannelStats

log = get_logger(__name__)

SOURCE_SUFFIXES = (".h5", ".hdf5", ".hdf", ".mat")
META_BYTES_ESTIMATE = 4096  # per-sample tar headers + meta.json, for shard sizing


@dataclass(kw_only=True)
class BuildConfig:
    """Options of one build (the CLI flags of nestor_ds.shards)."""

    inputs: list[str]
    out: str
    layout: str = "auto"
    name: str | None = None            # default: first input's stem, sanitised
    test_fraction: float = 0.1         # last fraction of trajectories without a split of their own
    shard_size_mb: float = 256.0       # target shard size in MiB (at least one trajectory per shard)
    dtype: str = "float32"
    workers: int = 1
    skip_bad: bool = False             # skip NaN/Inf trajectories instead of failing
    seed: int | None = None            # if set, permute the training trajectories across shards
    overwrite: bool = False            # replace an existing built directory
    progress: bool | None = None       # None: tqdm decides (bar only on a terminal)


# ----------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class Item:
    """One trajectory to write: where it comes from and its key in the shards."""

    source: str
    layout: str
    entry: Entry
    split: str
    index: int  # index within the split (before skipping bad trajectories)


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to write one shard; small and picklable (no arrays, no handles)."""

    path: str
    name: str
    dtype: str
    channels: tuple[str, ...]
    shape: tuple[int, int, int, int]
    skip_bad: bool
    items: tuple[Item, ...]


@dataclass
class ShardResult:
    """What a worker sends back: no data, only the shard's count, digest and partial statistics."""

    path: str
    count: int
    sha256: str
    skipped: int
    stats: ChannelStats
    done: int = 0  # trajectories processed (written + skipped), for the progress bar


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """Tar header with everything that could vary between runs pinned."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _prepare(item: Item, fields: np.ndarray, task: ShardTask, where: str) -> np.ndarray | None:
    """Check and cast one trajectory; None if bad and skipping, DataFormatError if bad otherwise."""
    if tuple(fields.shape) != task.shape:
        raise DataFormatError(item.source, f"{where} has shape {fields.shape}: "
                                           f"expected {task.shape} [T, X, Y, C]")
    with np.errstate(over="ignore"):  # overflow is detected just below and reported per trajectory
        out = np.ascontiguousarray(fields, dtype=task.dtype)
    bad = None
    if not np.isfinite(fields).all():
        bad = f"{where} contains NaN/Inf"
    elif not np.isfinite(out).all():
        bad = f"{where} overflows {task.dtype} (max |x| = {np.abs(fields).max():.4g})"
    if bad is None:
        return out
    if task.skip_bad:
        return None
    raise DataFormatError(item.source, bad + " (use --skip-bad to skip such trajectories)")


class _HashingWriter:
    """File wrapper that hashes bytes as tarfile writes them (no second pass over the shard)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.sha, self.pos = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.pos += len(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.pos


def write_shard(task: ShardTask) -> ShardResult:
    """Write one shard (worker entry point): stream its trajectories into a deterministic tar."""
    stats = ChannelStats.empty(task.shape[3])
    count = skipped = 0
    by_source: dict[str, list[Item]] = {}
    for item in task.items:
        by_source.setdefault(item.source, []).append(item)
    with open(task.path, "wb") as fh:
        sink = _HashingWriter(fh)
        tar = tarfile.open(fileobj=sink, mode="w", format=tarfile.GNU_FORMAT)
        for source, items in by_source.items():
            with open_reader(source, items[0].layout) as reader:
                for item, (_, fields, meta) in zip(items, reader.read([it.entry for it in items]), strict=True):
                    data = _prepare(item, fields, task, reader.where(item.entry))
                    if data is None:
                        skipped += 1
                        continue
                    key = schema.sample_key(task.name, item.split, item.index)
                    meta = {**meta, "channels": list(task.channels), "source_file": Path(source).name,
                            "source_index": item.entry.index, "layout": item.layout, "split": item.split}
                    try:
                        meta_json = schema.encode_json(meta)
                    except (TypeError, ValueError) as exc:  # e.g. an attribute of a type JSON cannot hold
                        raise DataFormatError(source, f"{reader.where(item.entry)}: metadata (attrs) not "
                                                      f"storable as JSON ({exc})") from None
                    for ext, payload in ((schema.FIELDS_EXT, schema.encode_fields(data)),
                                         (schema.META_EXT, meta_json)):
                        tar.addfile(_tarinfo(f"{key}.{ext}", len(payload)), io.BytesIO(payload))
                    if item.split == "train":
                        stats = stats.merge(ChannelStats.of(data))
                    count += 1
        tar.close()  # writes the end-of-archive blocks through the hashing writer
    return ShardResult(task.path, count, sink.sha.hexdigest(), skipped, stats, done=len(task.items))


# ----------------------------------------------------------------------------- planning

def expand_inputs(inputs: list[str]) -> list[str]:
    """Files given directly, plus source files found recursively under given directories (HDF5 / .mat files and
    CFDBench `case.json` files); sorted.

    One file reached by several paths (`..`, symlinks, hard links) is kept once (by device and inode), so its
    trajectories cannot be read twice or land in both splits."""
    files: set[str] = set()
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = [str(q) for q in p.rglob("*")
                     if q.is_file() and (q.suffix.lower() in SOURCE_SUFFIXES or is_case_file(q))]  # CFDBench cases
            if not found:
                raise DataFormatError(raw, f"directory holds no {'/'.join(SOURCE_SUFFIXES)} files")
            files.update(found)
        elif p.is_file():
            files.add(str(p))
        else:
            raise DataFormatError(raw, "no such file or directory")
    seen: dict[tuple[int, int], str] = {}
    for f in sorted(files, key=lambda f: (os.path.realpath(f), f)):
        st = os.stat(f)
        first = seen.setdefault((st.st_dev, st.st_ino), f)
        if first != f:
            log.warning("build_shards: %s is the same file as %s: read once", f, first)
    return sorted(seen.values())


def scan_sources(files: list[str], layout: str) -> list[SourceInfo]:
    """Scan every source and check that all agree on layout, shape and channels."""
    infos = []
    for path in files:
        try:
            with open_reader(path, layout) as reader:
                infos.append(reader.scan())
        except DataFormatError:
            raise
        except READ_ERRORS as exc:  # a malformation no check anticipated: still name the file
            text = str(exc).strip().splitlines()
            raise DataFormatError(path, f"scan failed ({type(exc).__name__}: {text[0] if text else ''})") from None
    first = infos[0]
    for info in infos[1:]:
        if info.layout != first.layout:
            raise DataFormatError(info.path, f"layout {info.layout}: expected {first.layout} like {first.path}")
        if info.shape != first.shape or info.channels != first.channels:
            raise DataFormatError(info.path, f"trajectories have shape {info.shape} channels {list(info.channels)}: "
                                             f"expected {first.shape} {list(first.channels)} like {first.path}")
    return infos


def assign_splits(infos: list[SourceInfo], test_fraction: float, seed: int | None) -> dict[str, list[Item]]:
    """File-own splits where present; otherwise the last `test_fraction` of the remaining trajectories."""
    own: dict[str, list[tuple[str, str, Entry]]] = {"train": [], "test": []}
    free: list[tuple[str, str, Entry]] = []
    for info in infos:
        for entry in info.entries:
            (own[entry.split] if entry.split else free).append((info.path, info.layout, entry))
    n_test = math.floor(len(free) * test_fraction + 0.5)
    cut = len(free) - n_test
    ordered = {"train": own["train"] + free[:cut], "test": own["test"] + free[cut:]}
    if seed is not None:
        perm = np.random.default_rng(seed).permutation(len(ordered["train"]))
        ordered["train"] = [ordered["train"][i] for i in perm]
    return {split: [Item(src, lay, e, split, i) for i, (src, lay, e) in enumerate(rows)]
            for split, rows in ordered.items()}


def check_disjoint(splits: dict[str, list[Item]]) -> None:
    """Refuse a plan in which one (source file, trajectory index) is in both splits (test data in training)."""
    def ident(it: Item) -> tuple[str, str | None, int]:
        return os.path.realpath(it.source), it.entry.group, it.entry.index

    test = {ident(it) for it in splits.get("test", [])}
    for it in splits.get("train", []):
        if ident(it) in test:
            raise DataFormatError(it.source, f"trajectory {it.entry.index} is in both the train and the test split "
                                             f"(the same file given twice, or overlapping split groups): refusing")


def plan_shards(cfg: BuildConfig, infos: list[SourceInfo], name: str, tmp: Path) -> list[ShardTask]:
    """Fix each shard's trajectories up front from the per-sample size (deterministic output)."""
    shape = infos[0].shape
    sample_bytes = int(np.prod(shape)) * np.dtype(cfg.dtype).itemsize + META_BYTES_ESTIMATE
    per_shard = max(1, int(cfg.shard_size_mb * 2**20 // sample_bytes))
    tasks = []
    splits = assign_splits(infos, cfg.test_fraction, cfg.seed)
    check_disjoint(splits)
    for split, items in splits.items():
        for k, start in enumerate(range(0, len(items), per_shard)):
            chunk = items[start:start + per_shard]
            if cfg.seed is not None:  # read each shard's trajectories in source order
                chunk = sorted(chunk, key=lambda it: (it.source, it.entry.index))
            tasks.append(ShardTask(str(tmp / schema.shard_name(split, k)), name, cfg.dtype, infos[0].channels,
                                   shape, cfg.skip_bad, tuple(chunk)))
    return tasks


def _run_tasks(tasks: list[ShardTask], workers: int, progress: bool | None) -> list[ShardResult]:
    total = sum(len(t.items) for t in tasks)
    results: dict[str, ShardResult] = {}
    with tqdm(total=total, unit="traj", desc="build_shards", disable=None if progress is None else not progress) as bar:
        if workers <= 1:
            for task in tasks:
                results[task.path] = write_shard(task)
                bar.update(len(task.items))
        else:
            ctx = mp.get_context("spawn")  # h5py handles must not be inherited through fork
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = [pool.submit(write_shard, t) for t in tasks]
                try:
                    for fut in cf.as_completed(futures):
                        res = fut.result()
                        results[res.path] = res
                        bar.update(res.done)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    return [results[t.path] for t in tasks]


# ----------------------------------------------------------------------------- build

def check_config(cfg: BuildConfig) -> None:
    """Reject option values that cannot describe a build (ValueError, one line)."""
    if cfg.dtype not in schema.DTYPES:
        raise ValueError(f"dtype {cfg.dtype!r}: expected one of {schema.DTYPES}")
    if cfg.layout != "auto" and cfg.layout not in LAYOUTS:
        raise ValueError(f"layout {cfg.layout!r}: expected auto or one of {LAYOUTS}")
    if not 0.0 <= cfg.test_fraction < 1.0:
        raise ValueError(f"test fraction {cfg.test_fraction}: expected 0 <= F < 1")
    if not (math.isfinite(cfg.shard_size_mb) and cfg.shard_size_mb > 0):
        raise ValueError(f"shard size {cfg.shard_size_mb} MB: expected a finite number > 0")
    if isinstance(cfg.workers, bool) or not isinstance(cfg.workers, int) or cfg.workers < 1:
        raise ValueError(f"workers {cfg.workers!r}: expected an integer >= 1")


def build(cfg: BuildConfig) -> dict[str, Any]:
    """Build shards + manifest into `cfg.out` (a directory or s3://bucket/prefix); returns the manifest. Raises
    DataFormatError on bad input."""
    check_config(cfg)
    if s3.is_s3(cfg.out):
        return _build_to_s3(cfg)
    out = Path(cfg.out)
    prepare_out(out, cfg.overwrite)
    files = expand_inputs(cfg.inputs)
    name = schema.check_name(cfg.name) if cfg.name else schema.sanitize_name(Path(files[0]).stem)
    infos = scan_sources(files, cfg.layout)

    created = make_parents(out.parent)
    try:
        with output_lock(out, cfg.overwrite):
            return _build_locked(cfg, out, name, infos)
    except BaseException:
        remove_dirs(created)
        raise


def _build_to_s3(cfg: BuildConfig) -> dict[str, Any]:
    """Build into a local staging directory, then upload it (shards, then the manifest); the staging directory
    is removed whatever happens, so an interrupted build or upload leaves nothing locally and no manifest in S3."""
    check_s3_out(cfg.out, cfg.overwrite)  # before the work: a taken prefix or bad credentials fail at once
    with tempfile.TemporaryDirectory(prefix="nestor-shards-") as tmp:
        local = Path(tmp) / "build"
        manifest = build(dataclasses.replace(cfg, out=str(local), overwrite=False))
        publish_s3(local, cfg.out, manifest, cfg.overwrite)
    return manifest


def _build_locked(cfg: BuildConfig, out: Path, name: str, infos: list[SourceInfo]) -> dict[str, Any]:
    prepare_out(out, cfg.overwrite)  # again, under the lock: a build that finished while we scanned
    remove_stale(out)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tasks = plan_shards(cfg, infos, name, tmp)
        results = _run_tasks(tasks, cfg.workers, cfg.progress)
        manifest = _assemble(cfg, infos, name, tasks, results, tmp)
        schema.write_manifest(tmp, manifest)
        swap_into_place(tmp, out, cfg.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _assemble(cfg: BuildConfig, infos: list[SourceInfo], name: str, tasks: list[ShardTask],
              results: list[ShardResult], tmp: Path) -> dict[str, Any]:
    """Drop empty shards (all skipped), renumber the rest contiguously, merge stats in shard order."""
    splits: dict[str, dict[str, Any]] = {s: {"count": 0, "shards": []} for s in schema.SPLITS}
    stats = ChannelStats.empty(infos[0].shape[3])
    skipped = 0
    for task, res in zip(tasks, results, strict=True):
        split = task.items[0].split
        skipped += res.skipped
        if res.count == 0:
            os.remove(res.path)
            continue
        entry = splits[split]
        fname = schema.shard_name(split, len(entry["shards"]))
        if Path(res.path).name != fname:
            os.replace(res.path, tmp / fname)
        entry["shards"].append({"file": fname, "count": res.count, "sha256": res.sha256})
        entry["count"] += res.count
        if split == "train":
            stats = stats.merge(res.stats)
    if splits["train"]["count"] == 0:
        raise DataFormatError(infos[0].path, "no training trajectories (all skipped or all in the test split)")
    return {"builder_version": schema.BUILDER_VERSION, "name": name, "layout": infos[0].layout,
            "dtype": cfg.dtype, "shape": list(infos[0].shape), "channels": list(infos[0].channels),
            "splits": splits, "stats": stats.as_dict(), "skipped_bad": skipped,
            "sources": sorted(Path(i.path).name for i in infos)}
