"""Build WebDataset shards + manifest from raw PDE files, and verify a built directory.

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
- Concurrent builds into one output cannot both "succeed": an exclusive `flock` on `.<name>.lock`
  beside the output is held for the whole build, and the output is re-checked just before the
  final rename. Temporary directories of builds killed with `kill -9` (dead pid) are removed by the
  next build into the same output.
- The same file reached through two paths (`raw/x.h5`, `raw/../raw/x.h5`, a symlink) is read once
  (inputs are de-duplicated by device and inode), and no (source file, index) may be in both splits.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import hashlib
import io
import math
import multiprocessing as mp
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nestor_ds.shards import schema
from nestor_ds.shards.ingest import READ_ERRORS, Entry, SourceInfo, open_reader
from nestor_ds.shards.schema import LAYOUTS, DataFormatError
from nestor_ds.shards.tar import decode_sample, read_shard
from nestor_ds.log import get_logger

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


# ----------------------------------------------------------------------------- statistics

@dataclass
class ChannelStats:
    """Streaming per-channel count/mean/M2/min/max in float64 (Chan et al. parallel merge)."""

    n: int
    mean: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @classmethod
    def empty(cls, c: int) -> ChannelStats:
        return cls(0, np.zeros(c), np.zeros(c), np.full(c, np.inf), np.full(c, -np.inf))

    @classmethod
    def of(cls, fields: np.ndarray) -> ChannelStats:
        x_NC = fields.reshape(-1, fields.shape[-1])
        min_C, max_C = x_NC.min(axis=0).astype(np.float64), x_NC.max(axis=0).astype(np.float64)  # exact
        x_NC = x_NC.astype(np.float64)
        mean_C = x_NC.mean(axis=0)
        d_NC = x_NC - mean_C
        return cls(x_NC.shape[0], mean_C, np.einsum("nc,nc->c", d_NC, d_NC), min_C, max_C)

    def merge(self, other: ChannelStats) -> ChannelStats:
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / n)
        return ChannelStats(n, mean, m2, np.minimum(self.min, other.min), np.maximum(self.max, other.max))

    def as_dict(self) -> dict[str, list[float]]:
        """Population statistics (ddof=0), as numpy's mean/std/min/max over (T, X, Y, samples)."""
        return {"mean": self.mean.tolist(), "std": np.sqrt(self.m2 / max(self.n, 1)).tolist(),
                "min": self.min.tolist(), "max": self.max.tolist()}


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
                for item, (_, fields, meta) in zip(items, reader.read([it.entry for it in items])):
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
    """Files given directly, plus source files found recursively under given directories; sorted.

    One file reached by several paths (`..`, symlinks, hard links) is kept once (by device and inode), so its
    trajectories cannot be read twice or land in both splits."""
    files: set[str] = set()
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = [str(q) for q in p.rglob("*") if q.is_file() and q.suffix.lower() in SOURCE_SUFFIXES]
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


def _tqdm_disable(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None lets tqdm show the bar only on a terminal."""
    return None if progress is None else not progress


def _run_tasks(tasks: list[ShardTask], workers: int, progress: bool | None) -> list[ShardResult]:
    total = sum(len(t.items) for t in tasks)
    results: dict[str, ShardResult] = {}
    with tqdm(total=total, unit="traj", desc="build_shards", disable=_tqdm_disable(progress)) as bar:
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

def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataFormatError(out, "output exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataFormatError(out, "output directory is not empty (pass --overwrite to replace a built dataset)")
        if not (out / schema.MANIFEST_NAME).is_file():
            raise DataFormatError(out, "refusing to overwrite: not a built shard directory (no manifest.json)")


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


def _make_parents(d: Path) -> list[Path]:
    """mkdir -p `d`, returning the directories it created (outermost first), so a failure can undo them."""
    missing = []
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    created: list[Path] = []
    try:
        for m in reversed(missing):
            m.mkdir()
            created.append(m)
    except BaseException:
        _remove_dirs(created)
        raise
    return created


def _remove_dirs(created: list[Path]) -> None:
    """Remove directories `_make_parents` created, innermost first; keep any that something else filled."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return


def build(cfg: BuildConfig) -> dict[str, Any]:
    """Build shards + manifest into `cfg.out`; returns the manifest. Raises DataFormatError on bad input."""
    check_config(cfg)
    out = Path(cfg.out)
    _prepare_out(out, cfg.overwrite)
    files = expand_inputs(cfg.inputs)
    name = schema.check_name(cfg.name) if cfg.name else schema.sanitize_name(Path(files[0]).stem)
    infos = scan_sources(files, cfg.layout)

    created = _make_parents(out.parent)
    try:
        with _output_lock(out, cfg.overwrite):
            return _build_locked(cfg, out, name, infos)
    except BaseException:
        _remove_dirs(created)
        raise


@contextlib.contextmanager
def _output_lock(out: Path, wait: bool) -> Any:
    """Exclusive flock on `.<name>.lock` beside `out` for the whole build. Without --overwrite a second build
    stops at once with a clear line; with it, it waits its turn and then replaces the first one's output.

    The lock file is removed on release (nothing is left beside the output); a waiter that then holds a lock on
    the removed file notices (its inode is no longer the path's) and locks the new file instead."""
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        fh = open(lock_path, "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.close()
            raise DataFormatError(out, f"another build into this output is running (lock {lock_path} is held): "
                                       f"wait for it, or pass --overwrite to replace its result after it ends") from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        fh.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Temporary directories of builds into `out` whose process is gone (kill -9, node crash)."""
    for pattern in (f".{out.name}.building-*", f".{out.name}.old-*"):
        for d in sorted(out.parent.glob(pattern)):
            pid = d.name.rsplit("-", 1)[-1]
            if d.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)
                log.warning("build_shards: removed %s left by a build that did not finish (pid %s is gone)", d, pid)


def _build_locked(cfg: BuildConfig, out: Path, name: str, infos: list[SourceInfo]) -> dict[str, Any]:
    _prepare_out(out, cfg.overwrite)  # again, under the lock: a build that finished while we scanned
    _remove_stale(out)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tasks = plan_shards(cfg, infos, name, tmp)
        results = _run_tasks(tasks, cfg.workers, cfg.progress)
        manifest = _assemble(cfg, infos, name, tasks, results, tmp)
        schema.write_manifest(tmp, manifest)
        _swap_into_place(tmp, out, cfg.overwrite)
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
    for task, res in zip(tasks, results):
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


def _swap_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Atomically publish `tmp` as `out` (an existing built `out` is replaced only after success, and only with
    --overwrite: re-checked here, at the last moment, against writers that do not take the lock)."""
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataFormatError(out, "output appeared while this build ran (another build?): not replaced; "
                                       "pass --overwrite to replace it")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)


# ----------------------------------------------------------------------------- verify

def verify(shard_dir: str | Path, progress: bool | None = None) -> dict[str, Any]:
    """Check a built directory against its manifest; raises DataFormatError at the first bad shard.

    Checks: manifest structure, no unlisted shard files, every shard's sha256 and sample count,
    every sample's members, key, fields dtype/shape/finiteness, meta keys and channels, and the
    training statistics recomputed from the decoded samples.
    """
    shard_dir = Path(shard_dir)
    manifest = schema.read_manifest(shard_dir)
    listed = {s["file"] for split in schema.SPLITS for s in manifest["splits"][split]["shards"]}
    for p in sorted(shard_dir.glob("*.tar")):
        if p.name not in listed:
            raise DataFormatError(p, "shard file not listed in manifest.json")
    shape, dtype = tuple(manifest["shape"]), np.dtype(manifest["dtype"])
    total = sum(manifest["splits"][s]["count"] for s in schema.SPLITS)
    stats = ChannelStats.empty(shape[3])
    with tqdm(total=total, unit="traj", desc="verify", disable=_tqdm_disable(progress)) as bar:
        for split in schema.SPLITS:
            pattern = schema.key_pattern(manifest["name"], split)
            for shard in manifest["splits"][split]["shards"]:
                path = shard_dir / shard["file"]
                if not path.is_file():
                    raise DataFormatError(path, "missing shard file listed in manifest.json")
                digest = schema.sha256_file(path)
                if digest != shard["sha256"]:
                    raise DataFormatError(path, f"sha256 {digest[:12]}...: manifest says {shard['sha256'][:12]}...")
                count = 0
                try:
                    for key, parts in read_shard(path, strict=True):
                        stats = _verify_sample(path, key, parts, pattern, shape, dtype, manifest, split, stats)
                        count += 1
                        bar.update(1)
                except (OSError, UnicodeDecodeError) as exc:
                    raise DataFormatError(path, f"unreadable tar ({exc})") from None
                if count != shard["count"]:
                    raise DataFormatError(path, f"holds {count} samples: manifest says {shard['count']}")
    if manifest["splits"]["train"]["count"]:
        want = stats.as_dict()
        for key, values in manifest["stats"].items():
            if not np.allclose(values, want[key], rtol=1e-6, atol=1e-9):
                raise DataFormatError(shard_dir / schema.MANIFEST_NAME,
                                      f"key 'stats.{key}' is {values}: recomputed {want[key]}")
    return {"name": manifest["name"], "train": manifest["splits"]["train"]["count"],
            "test": manifest["splits"]["test"]["count"],
            "shards": len(listed), "shape": list(shape), "dtype": str(dtype)}


def _verify_sample(path: Path, key: str, parts: dict[str, np.ndarray], pattern: Any, shape: tuple[int, ...],
                   dtype: np.dtype, manifest: dict[str, Any], split: str, stats: ChannelStats) -> ChannelStats:
    if not pattern.match(key):
        raise DataFormatError(path, f"sample key {key!r}: expected {manifest['name']}_{split}_NNNNNNN")
    if set(parts) != set(schema.SAMPLE_EXTS):
        raise DataFormatError(path, f"sample {key!r} has members {sorted(parts)}: expected {list(schema.SAMPLE_EXTS)}")
    fields, meta = decode_sample(key, parts, str(path))
    if fields.shape != shape or fields.dtype != dtype:
        raise DataFormatError(path, f"key '{key}.{schema.FIELDS_EXT}' has shape {fields.shape} {fields.dtype}: "
                                    f"expected {shape} {dtype}")
    if not np.isfinite(fields).all():
        raise DataFormatError(path, f"key '{key}.{schema.FIELDS_EXT}' contains NaN/Inf")
    missing = [k for k in schema.META_REQUIRED if k not in meta]
    if missing:
        raise DataFormatError(path, f"key '{key}.{schema.META_EXT}' lacks {missing}")
    if meta["channels"] != manifest["channels"] or len(meta["t"]) != shape[0]:
        raise DataFormatError(path, f"key '{key}.{schema.META_EXT}' has channels {meta['channels']} and "
                                    f"{len(meta['t'])} times: expected {manifest['channels']} and T={shape[0]}")
    return stats.merge(ChannelStats.of(fields)) if split == "train" else stats
