"""The output directory of a build: checks, parent directories, an exclusive lock, leftovers of killed builds,
and the atomic swap that publishes a finished build.

Concurrent builds into one output cannot both "succeed": an exclusive `flock` on `.<name>.lock` beside the
output is held for the whole build, and the output is re-checked just before the final rename. Temporary
directories of builds killed with `kill -9` (dead pid) are removed by the next build into the same output.

An `s3://bucket/prefix` output has no rename: the build happens in a local staging directory and `publish_s3`
uploads the shards first and manifest.json last, so a reader that finds the manifest finds every shard it lists;
an interrupted upload leaves no manifest, and a rerun finishes it (objects already there with the same sha256 are
not sent again) or, with --overwrite, replaces it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from nestor_ds.log import get_logger
from nestor_ds.shards import s3, schema
from nestor_ds.shards.schema import DataFormatError

log = get_logger(__name__)


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, or a non-empty directory unless --overwrite and it is a built one."""
    if out.exists() and not out.is_dir():
        raise DataFormatError(out, "output exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataFormatError(out, "output directory is not empty (pass --overwrite to replace a built dataset)")
        if not (out / schema.MANIFEST_NAME).is_file():
            raise DataFormatError(out, "refusing to overwrite: not a built shard directory (no manifest.json)")


def make_parents(d: Path) -> list[Path]:
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
        remove_dirs(created)
        raise
    return created


def remove_dirs(created: list[Path]) -> None:
    """Remove directories `make_parents` created, innermost first; keep any that something else filled."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def output_lock(out: Path, wait: bool) -> Iterator[None]:
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
                                       f"wait for it, or pass --overwrite to replace its result after it "
                                       f"ends") from None
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


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: Path) -> None:
    """Temporary directories of builds into `out` whose process is gone (kill -9, node crash)."""
    for pattern in (f".{out.name}.building-*", f".{out.name}.old-*"):
        for d in sorted(out.parent.glob(pattern)):
            pid = d.name.rsplit("-", 1)[-1]
            if d.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)
                log.warning("build_shards: removed %s left by a build that did not finish (pid %s is gone)", d, pid)


def swap_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
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


SHA256_META = "sha256"  # user metadata of an uploaded shard (x-amz-meta-sha256): lets a rerun skip it


def check_s3_out(url: str, overwrite: bool) -> None:
    """Refuse an s3:// output that already holds a built dataset (its manifest) unless --overwrite; checked before
    the build, so a wrong URL or bad credentials fail at once with one line. An output with shards but no manifest
    is an interrupted upload: the build goes on and finishes it."""
    bucket, prefix = s3.split_url(url)
    if not prefix.strip("/"):
        raise DataFormatError(url, "give a prefix under the bucket (s3://BUCKET/PREFIX): the build owns it")
    if s3.head(s3.join(url, schema.MANIFEST_NAME)) is not None and not overwrite:
        raise DataFormatError(url, "holds a built dataset (manifest.json): pass --overwrite to replace it")


def publish_s3(local: Path, url: str, manifest: dict, overwrite: bool) -> None:
    """Upload a finished local build to `url`: shards, then manifest.json last, then remove shard objects the new
    manifest does not list (left by an older build with more shards).

    With --overwrite an existing manifest is deleted before any shard changes, so no reader ever pairs the old
    manifest with new shards. A shard object whose size and recorded sha256 match is left as it is (a rerun after an
    interrupted upload sends only what is missing)."""
    check_s3_out(url, overwrite)  # again: another build may have finished while this one ran
    manifest_url = s3.join(url, schema.MANIFEST_NAME)
    if overwrite and s3.head(manifest_url) is not None:
        s3.delete(manifest_url)
    listed = [s for split in schema.SPLITS for s in manifest["splits"][split]["shards"]]
    sent = 0
    for shard in listed:
        path, target = local / shard["file"], s3.join(url, shard["file"])
        there = s3.head(target)
        if (there is not None and int(there.get("ContentLength", -1)) == path.stat().st_size
                and there.get("Metadata", {}).get(SHA256_META) == shard["sha256"]):
            continue
        s3.upload(path, target, {SHA256_META: shard["sha256"]})
        sent += 1
    s3.upload(local / schema.MANIFEST_NAME, manifest_url)
    names = {s["file"] for s in listed}
    for obj in s3.list_keys(url):
        name = obj.rsplit("/", 1)[1]
        if name.endswith(".tar") and name.startswith(tuple(f"{sp}-" for sp in schema.SPLITS)) and name not in names:
            s3.delete(obj)
    log.info("build_shards: %s: uploaded %d of %d shards (%d already there) and manifest.json", url, sent,
             len(listed), len(listed) - sent)
