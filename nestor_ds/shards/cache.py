"""A local staging cache for shards behind URLs (``data.shard_cache``): each remote shard is downloaded whole, once
per node, into a directory, and then read memory-mapped like a local shard.

Why: streamed through webdataset, a shard URL costs 3-4x the loader CPU of the same shard mapped from local disk
(tar unpacking, a decoded copy of each member, the read-ahead buffers; docs/data_pipeline.md, "Loader capacity"),
and every epoch re-deals the shards, so each one is streamed again and again. Staged, only the first read pays
the download; every later read on that node, by any process, is a local mapped read through the page cache.

How: the shard is fetched with its URL's own reader (`urls.open_url`: s3.py's resuming reader for s3://, so a
server restart in mid-download resumes at the byte it reached; webdataset's gopen for http(s)://, gs:// and
pipe:), written under a temporary name in the cache directory while its sha256 is computed, compared with the
manifest's digest when there is one, flushed to disk and renamed into place: a reader never sees a partial file.
Locks, per shard, two empty files beside it that are never deleted (deleting a lock file lets two processes lock
different files of one name): `.NAME.lock`, held exclusively (`fcntl.flock`) while one process downloads the shard
and the node's others wait for it; `.NAME.use`, held shared by every process of the node that uses the shard (a
`Lease`: from staging until the last trajectory read from it is dropped, or the process dies), its mtime the last
use. A file is named by the manifest's sha256 of the shard (content-addressed: a rebuilt shard gets a new name) or,
without one, by the sha256 of its URL, followed by the shard's file name for whoever reads the directory.

Size bound (`max_bytes`, data.shard_cache_max_gb): after each download the least recently used staged shards are
deleted until the directory's shards fit, skipping those in use by any process of the node (an evictor needs the
`.use` lock exclusively, and a user takes it shared before it even looks for the file: a shard is never deleted
under a process that reads it, and one deleted just before is downloaded again). What is in use may exceed the
bound; that is said once per process. Without a bound nothing is evicted.

No torch here: the data pipeline (`nestor_ds/data/trajectories.py`, `staged_trajectories`) calls `stage`.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import weakref
from pathlib import Path
from typing import NamedTuple

from nestor_ds.shards.schema import DataFormatError
from nestor_ds.shards.urls import open_url

CHUNK_BYTES = 1 << 20  # one read of the URL's stream, one write, one digest update
_SHARD_NAME = re.compile(r"(train|test)-\d{6}\.tar")
_HEX64 = re.compile(r"[0-9a-f]{64}")  # as sha256 hexdigest writes it, and as compared
_log = logging.getLogger("nestor_ds.shards.cache")
_OVER_BOUND_SAID: set[str] = set()  # cache directories whose bound this process has said is too small


def cache_name(url: str, sha256: str | None) -> str:
    """The cached file's name: 32 hex digits of the shard's sha256 (or of its URL's), then its shard file name."""
    if sha256 and not _HEX64.fullmatch(sha256):  # it becomes a file name: never a path from a manifest
        raise DataFormatError(url, f"the manifest's sha256 {sha256[:80]!r} is not 64 hex digits, lowercase")
    key = sha256 or hashlib.sha256(url.encode("utf-8")).hexdigest()
    shard = _SHARD_NAME.search(url)
    return f"{key[:32]}-{shard.group(0) if shard else 'shard.tar'}"


class Lease:
    """A shared lock on one staged shard's `.use` file: while any process of the node holds one, no process evicts the
    shard. Released by `close()`, when the Lease is garbage-collected (a trajectory read from the shard keeps it), or
    when the process dies (the kernel drops the lock with the descriptor)."""

    def __init__(self, lock_path: Path):
        self.fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        self._close = weakref.finalize(self, os.close, self.fd)
        fcntl.flock(self.fd, fcntl.LOCK_SH)  # waits only while an evictor deletes the shard (one unlink)

    def touch(self) -> None:
        """Mark the shard used now (its `.use` file's mtime orders eviction)."""
        os.utime(self.fd)

    def close(self) -> None:
        self._close()


class Staged(NamedTuple):
    """A shard in the cache: its local path, whether this call downloaded it (then its bytes were just compared with
    the manifest sha256, when given), and the lease that keeps it from eviction while held."""

    path: Path
    downloaded: bool
    lease: Lease


def use_file(path: Path) -> Path:
    """The staged shard's use lock (`Lease`), beside it."""
    return path.with_name(f".{path.name}.use")


def stage(url: str, cache_dir: str | Path, sha256: str | None, max_bytes: int | None = None) -> Staged:
    """Shard `url` in `cache_dir`, downloaded first if it is not there yet, leased (in use) until the returned lease
    is dropped; after a download, least recently used shards are evicted down to `max_bytes` (None: no bound)."""
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / cache_name(url, sha256)
    lease = Lease(use_file(path))  # before looking for the file: from here on no evictor deletes it
    try:
        downloaded = False
        if not path.is_file():
            with open(root / f".{path.name}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
                if not path.is_file():  # else another process of the node downloaded it while this one waited
                    download(url, path, sha256)
                    downloaded = True
        lease.touch()
    except BaseException:
        lease.close()
        raise
    if downloaded and max_bytes is not None:
        evict(root, max_bytes)
    return Staged(path, downloaded, lease)


def is_staged(url: str, cache_dir: str | Path, sha256: str | None) -> bool:
    """Whether the shard is in the cache now (it may be evicted right after unless leased: `stage` to use it)."""
    return (Path(cache_dir) / cache_name(url, sha256)).is_file()


def _last_use(path: Path) -> float:
    try:
        return use_file(path).stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _remove_unused(path: Path) -> bool:
    """Delete a staged shard unless a process of the node uses it (holds its `.use` lock); whether it was deleted."""
    fd = os.open(use_file(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        path.unlink(missing_ok=True)  # under the exclusive lock: no user has it, a new one waits and downloads again
        return True
    finally:
        os.close(fd)


def evict(root: Path, max_bytes: int) -> list[Path]:
    """Delete the least recently used shards in `root` that no process uses until the shards there total at most
    `max_bytes`; the ones deleted. What is in use stays, even over the bound (said once per process and directory)."""
    sizes = {}
    for p in root.glob("*.tar"):
        try:
            sizes[p] = p.stat().st_size
        except FileNotFoundError:  # another process evicted it meanwhile
            continue
    total, removed = sum(sizes.values()), []
    for p in sorted(sizes, key=_last_use):
        if total <= max_bytes:
            break
        if _remove_unused(p):
            total -= sizes[p]
            removed.append(p)
    if total > max_bytes and str(root) not in _OVER_BOUND_SAID:
        _OVER_BOUND_SAID.add(str(root))
        _log.warning(
            "shard cache %s: the shards in use take %.3g GB, over its bound of %.3g GB (data.shard_cache_max_gb); "
            "kept, since processes read them: raise the bound to at least the shards a node uses at once",
            root,
            total / 1e9,
            max_bytes / 1e9,
        )
    return removed


def download(url: str, path: Path, sha256: str | None) -> None:
    """Copy the shard at `url` to `path` through a temporary file beside it, checking its sha256 on the way; the
    temporary file is removed whatever happens. Raises DataFormatError (one line naming the URL)."""
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        stream = open_url(url)
        try:
            with open(part, "wb") as out:
                while chunk := stream.read(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        finally:
            stream.close()  # a failed command or download shows up here as its exit status
        if sha256 and digest.hexdigest() != sha256:
            raise DataFormatError(
                url,
                f"sha256 {digest.hexdigest()[:12]}... but the manifest says {sha256[:12]}...: the shard changed "
                f"after the build; rebuild or upload it again (nothing was cached)",
            )
        os.replace(part, path)
    except OSError as exc:  # network after the retries, a failed command, a full disk (s3.py raises its own line)
        raise DataFormatError(url, f"cannot download shard into the cache {path.parent} ({exc})") from None
    finally:
        part.unlink(missing_ok=True)
