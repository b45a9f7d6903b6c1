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
An exclusive lock per shard (`fcntl.flock`) lets one process download it while the node's others wait. A file is
named by the manifest's sha256 of the shard (content-addressed: a rebuilt shard gets a new name) or, without one, by
the sha256 of its URL, followed by the shard's file name for whoever reads the directory. Nothing is evicted: plan
the disk for the datasets' training shards.

No torch here: the data pipeline (`nestor_ds/data/trajectories.py`, `staged_trajectories`) calls `stage`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from pathlib import Path

from nestor_ds.shards.schema import DataFormatError
from nestor_ds.shards.urls import open_url

CHUNK_BYTES = 1 << 20  # one read of the URL's stream, one write, one digest update
_SHARD_NAME = re.compile(r"(train|test)-\d{6}\.tar")


def cache_name(url: str, sha256: str | None) -> str:
    """The cached file's name: 32 hex digits of the shard's sha256 (or of its URL's), then its shard file name."""
    key = sha256 or hashlib.sha256(url.encode("utf-8")).hexdigest()
    shard = _SHARD_NAME.search(url)
    return f"{key[:32]}-{shard.group(0) if shard else 'shard.tar'}"


def stage(url: str, cache_dir: str | Path, sha256: str | None) -> tuple[Path, bool]:
    """The local path of shard `url` in `cache_dir`, downloaded first if it is not there yet; and whether this call
    downloaded it (then its bytes were just compared with `sha256`, when given)."""
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / cache_name(url, sha256)
    if path.is_file():
        return path, False
    with open(root / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if path.is_file():  # another process of the node downloaded it while this one waited
            return path, False
        download(url, path, sha256)
    return path, True


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
