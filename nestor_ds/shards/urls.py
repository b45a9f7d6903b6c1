"""Shard datasets behind URLs: which dataset paths are WebDataset URL specs, their shard lists, their manifest,
and a sequential reader of one shard URL (the `webdataset` library opens and unpacks the stream; its members
are grouped into samples by `tar.group_members` and decoded by `tar.decode_sample`, as for local shards).

A dataset `path` is a URL spec when it starts with `pipe:`, `http://`, `https://`, `s3://`, `gs://`, or
holds a brace pattern (`{000000..000015}`, `{a,b}`); it may also be a mapping `{train: SPEC, test: SPEC}`
(the only way to name test shards: the two splits usually have different shard counts, so one pattern
cannot cover both). A URL's shard is identified by the shard file name it contains (`train-000003.tar`),
which must match the manifest: the manifest gives each shard's trajectory count, which the sampler needs
to deal out shards and to resume without reading data.

`s3://` URLs are read by the Python S3 client of `s3.py` (boto3: endpoint, region and credentials from the
standard AWS variables and profiles; a dropped connection resumes at the same byte), never through a shell;
`gs://` runs `gsutil cat URL` (webdataset, an argument list, no shell); `http(s)://` runs curl the same way.

Kept free of torch, webdataset and boto3 at import time (config.py imports this module); `iter_url_samples`
imports webdataset when it first reads.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import braceexpand

from nestor_ds.shards import s3
from nestor_ds.shards.schema import MANIFEST_NAME, SPLITS, DataFormatError, validate_manifest
from nestor_ds.shards.tar import group_members

URL_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")
_SHARD_IN_URL = re.compile(r"(train|test)-\d{6}\.tar")
FETCH_TIMEOUT_S = 60
_PIPES_NOTED: set[str] = set()


def note_pipe(command: str) -> None:
    """A `pipe:` URL runs a shell command (code execution, with this process's rights): say which, once per process."""
    if command in _PIPES_NOTED:
        return
    _PIPES_NOTED.add(command)
    from nestor_ds.redact import mask_secrets

    logging.getLogger("nestor_ds.data").warning("data: a pipe: URL runs this shell command: %s",
                                                mask_secrets(command.removeprefix("pipe:"))[:300])


def is_url_spec(path: str | Mapping[str, str]) -> bool:
    """True if the dataset path is read through webdataset (a URL spec or a {train, test} mapping of them)."""
    if isinstance(path, Mapping):
        return True
    return path.startswith(URL_PREFIXES) or bool(_BRACES.search(path))


def split_spec(path: str | Mapping[str, str], split: str) -> str | None:
    """The URL spec of one split: a plain spec is the training split only; a mapping names each split."""
    if isinstance(path, Mapping):
        return path.get(split)
    return path if split == "train" else None


def check_path(path: Any, where: str) -> None:
    """One-line ValueError for a malformed `path` (wrong type, bad mapping keys, local dir in a mapping)."""
    if isinstance(path, str):
        return
    if not isinstance(path, Mapping):
        raise ValueError(f"{where}: path must be a string or a mapping {{train: URLSPEC, test: URLSPEC}}, "
                         f"got {type(path).__name__}")
    bad = sorted(set(path) - set(SPLITS))
    if bad or "train" not in path:
        raise ValueError(f"{where}: path mapping needs key 'train' (and optionally 'test'), got keys {sorted(path)}")
    for split, spec in path.items():
        if not isinstance(spec, str) or not is_url_spec(spec):
            raise ValueError(f"{where}: path.{split} = {spec!r} is not a URL spec (pipe:, http(s)://, s3://, "
                             f"gs:// or a brace pattern); a local shard directory is given as a plain path")


def expand(spec: str) -> list[str]:
    """The shard URLs of a spec (brace expansion, as webdataset does)."""
    return list(braceexpand.braceexpand(spec))


def default_manifest(path: str | Mapping[str, str]) -> str | None:
    """`<dirname of the first training URL>/manifest.json` when that can be read without a command
    (a local file, an http(s) or an s3:// URL); None for pipe: and gs:// specs, which must name it."""
    spec = split_spec(path, "train")
    if not spec:
        return None
    first = expand(spec)[0]
    if first.startswith(("http://", "https://", s3.SCHEME)):
        return first.rsplit("/", 1)[0] + "/" + MANIFEST_NAME
    if urlparse(first).scheme in ("", "file") and not first.startswith("pipe:"):
        return str(Path(first.removeprefix("file://")).parent / MANIFEST_NAME)
    return None


def read_manifest_at(location: str) -> dict[str, Any]:
    """Load and validate a manifest from a local file or directory, an http(s) URL (urllib), an s3:// object
    (s3.py: the file or, for a prefix not ending in .json, `<prefix>/manifest.json`) or a `pipe:` command (its
    stdout)."""
    try:
        if s3.is_s3(location):
            if not location.endswith(".json"):
                location = s3.join(location, MANIFEST_NAME)
            text = s3.read_bytes(location).decode("utf-8")
        elif location.startswith(("http://", "https://")):
            with urllib.request.urlopen(location, timeout=FETCH_TIMEOUT_S) as response:
                text = response.read().decode("utf-8")
        elif location.startswith("pipe:"):
            note_pipe(location)
            done = subprocess.run(location[5:], shell=True, capture_output=True, timeout=FETCH_TIMEOUT_S)
            if done.returncode != 0:
                raise OSError(f"command exited {done.returncode}: {done.stderr.decode(errors='replace').strip()[:200]}")
            text = done.stdout.decode("utf-8")
        elif urlparse(location).scheme in ("", "file"):
            p = Path(location.removeprefix("file://"))
            text = (p / MANIFEST_NAME if p.is_dir() else p).read_text()
        else:
            raise OSError("unsupported scheme: give a local path, an http(s):// or s3:// URL or a pipe: command")
        manifest = json.loads(text)
    except DataFormatError as exc:  # s3.py's one line already names the object
        raise DataFormatError(exc.file, f"cannot read manifest ({exc.message})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, subprocess.TimeoutExpired) as exc:
        raise DataFormatError(location, f"cannot read manifest ({exc})") from None
    validate_manifest(manifest, location)
    return manifest


def shard_urls(spec: str, manifest: dict[str, Any], split: str, where: str) -> tuple[tuple[str, int], ...]:
    """(URL, trajectory count) of every shard of `split`, in manifest order.

    Each URL must contain the file name of one manifest shard of that split, and every manifest shard
    must have exactly one URL (a typo in a brace range fails here instead of silently dropping data).
    """
    by_file: dict[str, str] = {}
    if spec.startswith("pipe:"):
        note_pipe(spec)
    for url in expand(spec):
        m = _SHARD_IN_URL.search(url)
        if m is None or m.group(1) != split:
            raise ValueError(f"{where}: URL {url!r} names no {split} shard (expected {split}-NNNNNN.tar in it)")
        if m.group(0) in by_file:
            raise ValueError(f"{where}: shard {m.group(0)} appears twice in {spec!r}")
        by_file[m.group(0)] = url
    shards = manifest["splits"][split]["shards"]
    listed = {s["file"] for s in shards}
    missing = [s["file"] for s in shards if s["file"] not in by_file]
    extra = sorted(set(by_file) - listed)
    if missing or extra:
        raise ValueError(f"{where}: {split} URLs {spec!r} do not match the manifest's {len(shards)} shards "
                         f"(missing {missing[:3]}, not in manifest {extra[:3]})")
    return tuple((by_file[s["file"]], int(s["count"])) for s in shards)


def open_url(url: str):
    """A readable stream of one shard URL: s3:// through the resuming reader of s3.py (webdataset has no s3
    scheme of its own), everything else through webdataset's gopen (also what the staging cache downloads with)."""
    if s3.is_s3(url):
        return s3.open_object(url)
    import webdataset as wds

    return wds.gopen(url)


def iter_url_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of one shard URL in tar order: (key, {"fields.npy": bytes, "meta.json": bytes}).

    Read sequentially with webdataset (gopen -> tar_file_iterator), grouped by `tar.group_members`. Closing the
    generator early closes the stream (a `pipe:` or curl process then ends with SIGPIPE, which webdataset ignores).
    """
    import tarfile

    from webdataset import tariterators

    stream, finished = None, False
    try:
        stream = open_url(url)
        members = ((m["fname"], m["data"]) for m in tariterators.tar_file_iterator(stream))
        yield from group_members(members, url)
        finished = True
    except (OSError, tarfile.TarError, ValueError) as exc:
        if isinstance(exc, DataFormatError):  # rebuilt: webdataset appends its stream's repr to the args
            raise DataFormatError(exc.file, exc.message) from None
        reason = _reason(exc)
        try:  # a failed command or download usually explains the broken tar stream: report its status
            if stream is not None:
                stream.close()
        except OSError as status:
            reason = _reason(status) if _reason(status) == reason else f"{_reason(status)}; {reason}"
        raise DataFormatError(url, f"cannot read shard ({reason})") from None
    finally:
        if stream is not None:
            try:
                stream.close()
            except OSError as exc:  # a failed command or HTTP error shows up as the exit status
                if finished:  # (a stream closed early kills its reader with SIGPIPE: not an error)
                    raise DataFormatError(url, f"cannot read shard ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    """One short line for a webdataset error (its Pipe errors carry the argument tuple and exit status)."""
    text = str(exc.args[0]) if exc.args else str(exc)
    status = re.search(r"\): exit (-?\d+) \(read\)", text)
    return f"command or download exited with status {status.group(1)}" if status else text.splitlines()[0][:300]
