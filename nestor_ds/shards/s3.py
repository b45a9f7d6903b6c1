"""Shards in S3 (and S3-compatible stores: SeaweedFS, MinIO, Ceph RGW, R2...): the one retrying reader, uploads,
listing and deletion, all through boto3.

Why boto3 and not a shell command or s3fs: no user string ever reaches a shell (the former `pipe:aws s3 cp URL -`
put a config value on a `/bin/sh` command line and needed the AWS CLI, which is not a dependency); a dropped
connection is resumed at the exact byte with a ranged GET, which needs control of each request (boto3's
`get_object(Range=...)`), not a file-system layer; boto3 is already installed (MLflow's artifact store uses it), while
s3fs brings aiobotocore, aiohttp and an event-loop thread per process (DataLoader workers fork). Endpoint, region,
credentials and profiles come from boto3's own resolution (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` / `AWS_DEFAULT_REGION`, `AWS_PROFILE`, ~/.aws): nothing
here reads, logs or stores a credential, and every message goes through `redact.mask_secrets`.

Retries (docs/data_pipeline.md, "Shards in S3"): connection failures, timeouts, truncated bodies, HTTP 5xx and
throttling are retried `ATTEMPTS` times per request with exponential backoff (`FIRST_DELAY_S` doubling up to
`MAX_DELAY_S`; 0.5 + 1 + 2 + 4 + 8 = 15.5 s of waiting in all), each attempt bounded by `CONNECT_TIMEOUT_S` and
`READ_TIMEOUT_S`. A read that fails in mid-object resumes at the byte it reached (`Range: bytes=N-`, `If-Match`
the first response's ETag, so resumed bytes come from the same object version) and the retry count starts afresh
after every byte of progress. Missing objects and denied access are not retried. Every failure ends as one
`DataFormatError` line naming the s3:// URL.

Kept free of torch; boto3 is imported on first use (builder workers and `--verify` of local shards never pay it).
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from nestor_ds.redact import mask_secrets
from nestor_ds.shards.schema import DataFormatError

log = logging.getLogger("nestor_ds.shards.s3")

SCHEME = "s3://"
ATTEMPTS = 6  # tries per request (and per byte position of a read): 5 waits of the backoff below
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 8.0
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # a stalled socket (no byte for this long) counts as a dropped connection
BUFFER_BYTES = 1 << 20  # read-ahead of ObjectReader: one request per MiB at most, whatever tarfile asks for
# S3 error codes that a later attempt may not see (everything 5xx is retried too)
_TRANSIENT_CODES = {
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
    "BadDigest",
}
_DENIED_CODES = {
    "AccessDenied",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
    "InvalidSecurity",
    "403",
}
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}

T = TypeVar("T")
_CLIENTS: dict[tuple[Any, ...], Any] = {}


def is_s3(location: str) -> bool:
    return location.startswith(SCHEME)


def split_url(url: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`; a one-line error for anything else."""
    bucket, _, key = url.removeprefix(SCHEME).partition("/")
    if not is_s3(url) or not bucket or "{" in bucket:
        raise DataFormatError(url, "not an s3://BUCKET/KEY URL")
    return bucket, key


def join(prefix_url: str, name: str) -> str:
    """`s3://bucket/prefix` + `name` -> `s3://bucket/prefix/name` (the prefix acts as a directory)."""
    return prefix_url.rstrip("/") + "/" + name


def client() -> Any:
    """The boto3 S3 client of this process, for the current AWS_* environment.

    One per (process, AWS_* variables): a client must not cross a fork (DataLoader workers), and a changed endpoint
    or profile must take effect. boto3's own retries are off: `retrying` below is the one retry policy, so the
    documented total time holds. Request checksums only where required: many S3-compatible stores reject the
    newer default checksum trailers."""
    import boto3
    from botocore.config import Config

    key = (os.getpid(), tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    if key not in _CLIENTS:
        _CLIENTS.clear()
        config = Config(
            retries={"total_max_attempts": 1},
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        _CLIENTS[key] = boto3.session.Session().client("s3", config=config)
    return _CLIENTS[key]


def _code(exc: BaseException) -> str | None:
    """The S3 error code (or HTTP status) of a botocore ClientError, else None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    return str(code) if code else str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")) or None


def _status(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)) if isinstance(response, dict) else 0


class _Truncated(OSError):
    """The body ended before its Content-Length (connection closed by a restarting server or a proxy)."""


def _transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed: network and timeout errors, truncated bodies, 5xx, throttling."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return False
    if isinstance(exc, ClientError):
        return _code(exc) in _TRANSIENT_CODES or _status(exc) >= 500
    return isinstance(exc, (BotoCoreError, OSError))  # connection, timeouts, streaming errors, _Truncated


def _reason(url: str, exc: BaseException) -> str:
    """One line for the user: what failed and what to check (never a credential)."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    code = _code(exc) if isinstance(exc, ClientError) else None
    if code in _MISSING_CODES:
        what = "bucket" if code == "NoSuchBucket" else "object"
        return f"no such {what} ({code}) at the S3 endpoint {endpoint()}"
    if code in _DENIED_CODES or _status(exc) == 403:
        return (
            f"access denied ({code}): check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
            f"AWS_PROFILE) and the bucket's policy"
        )
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def endpoint() -> str:
    """The endpoint the client talks to (for messages: an endpoint URL carries no credential, masked anyway)."""
    return mask_secrets(str(client().meta.endpoint_url))


def retrying(url: str, what: str, attempt: Callable[[], T], on_retry: Callable[[], None] | None = None) -> T:
    """Run `attempt()` up to ATTEMPTS times with exponential backoff while its errors are transient; raise one
    DataFormatError line naming `url` when they are not, or when the attempts run out. `on_retry` runs before each
    new attempt (e.g. to drop a broken stream)."""
    started, delay = time.monotonic(), FIRST_DELAY_S
    for n in range(1, ATTEMPTS + 1):
        try:
            return attempt()
        except Exception as exc:  # classified below; anything not an S3 or network error is re-raised as is
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(exc, DataFormatError) or not isinstance(exc, (BotoCoreError, ClientError, OSError)):
                raise
            if not _transient(exc):
                raise DataFormatError(url, f"cannot {what}: {mask_secrets(_reason(url, exc))}") from None
            if n == ATTEMPTS:
                spent = time.monotonic() - started
                raise DataFormatError(
                    url,
                    f"cannot {what} after {ATTEMPTS} attempts in {spent:.0f} s (S3 endpoint {endpoint()}): "
                    f"{mask_secrets(_reason(url, exc))}",
                ) from None
            log.warning(
                "s3: %s: %s failed (%s); attempt %d of %d in %.1f s",
                url,
                what,
                mask_secrets(_reason(url, exc)),
                n + 1,
                ATTEMPTS,
                delay,
            )
            if on_retry is not None:
                on_retry()
            time.sleep(delay)
            delay = min(2 * delay, MAX_DELAY_S)
    raise AssertionError("unreachable")


class ObjectReader(io.RawIOBase):
    """A read-only, sequential file object over one S3 object that survives dropped connections.

    The first GET fixes the object's size and ETag; when a read fails or the body ends early, the next attempt asks
    for `Range: bytes=<position>-` with `If-Match: <ETag>`, so the bytes handed out are exactly those of one
    uninterrupted read of that object version (a changed object fails with one line instead of mixing versions).
    Wrap it in `io.BufferedReader` (see `open_object`) so small reads do not become small requests."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.bucket, self.key = split_url(url)
        self.pos = 0
        self.size: int | None = None
        self.etag: str | None = None
        self._body: Any = None
        self.resumes = 0  # how many times a broken read was resumed (tests and benchmarks read it)

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if self.pos:
            args["Range"] = f"bytes={self.pos}-"
        if self.etag:
            args["IfMatch"] = self.etag
        try:
            response = client().get_object(**args)
        except Exception as exc:
            if _code(exc) in ("PreconditionFailed", "412"):
                raise DataFormatError(
                    self.url, f"the object changed while it was read (ETag no longer {self.etag}): restart the read"
                ) from None
            raise
        if self.size is None:
            self.size, self.etag = int(response["ContentLength"]), response.get("ETag")
        self._body = response["Body"]

    def _drop(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # a broken connection may fail to close: it is discarded either way
                pass

    def readinto(self, buffer: Any) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0
        want = len(buffer)

        def attempt() -> bytes:
            if self._body is None:
                self._open()
                if self.pos >= self.size:
                    return b""
            try:
                data = self._body.read(min(want, self.size - self.pos))
            except BaseException:
                self._drop()
                raise
            if not data:
                self._drop()
                raise _Truncated(f"connection closed at byte {self.pos} of {self.size}")
            return data

        before = self.pos
        what = "read" if self.pos == 0 else f"read at byte {self.pos}"
        data = retrying(self.url, what, attempt, on_retry=self._note_retry)
        n = len(data)
        buffer[:n] = data
        self.pos = before + n
        return n

    def _note_retry(self) -> None:
        self._drop()
        self.resumes += 1

    def close(self) -> None:
        self._drop()
        super().close()


def open_object(url: str) -> io.BufferedReader:
    """A buffered, resuming reader of `url` (what the shard stream and the manifest reader open)."""
    return io.BufferedReader(ObjectReader(url), buffer_size=BUFFER_BYTES)


def read_bytes(url: str) -> bytes:
    """The whole object (a manifest)."""
    with open_object(url) as f:
        return f.read()


def download(url: str, path: str | Path) -> None:
    """Copy the object to a local file with the resuming reader (used by --verify)."""
    with open_object(url) as src, open(path, "wb") as dst:
        while chunk := src.read(BUFFER_BYTES):
            dst.write(chunk)


def head(url: str) -> dict[str, Any] | None:
    """The object's HEAD response (size, metadata), or None if it does not exist."""
    bucket, key = split_url(url)

    def attempt() -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return client().head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES and _code(exc) != "NoSuchBucket":
                return None
            raise

    return retrying(url, "look up the object", attempt)


def upload(path: str | Path, url: str, metadata: dict[str, str] | None = None) -> None:
    """PUT a local file as one object (shards are at most a few hundred MiB; S3 takes up to 5 GiB in one PUT).
    Each attempt re-sends the whole file, so a dropped upload never leaves a partial object."""
    bucket, key = split_url(url)

    def attempt() -> None:
        with open(path, "rb") as body:
            client().put_object(Bucket=bucket, Key=key, Body=body, Metadata=metadata or {})

    retrying(url, "upload", attempt)


def list_keys(prefix_url: str) -> list[str]:
    """The s3:// URLs of the objects directly under `prefix_url` (as a directory), sorted."""
    bucket, prefix = split_url(prefix_url.rstrip("/") + "/")
    urls: list[str] = []

    def attempt() -> list[str]:
        found = []
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            found += [f"{SCHEME}{bucket}/{obj['Key']}" for obj in page.get("Contents", [])]
        return found

    urls = retrying(prefix_url, "list the objects", attempt)
    return sorted(urls)


def delete(url: str) -> None:
    """Delete one object (a missing object is not an error in S3)."""
    bucket, key = split_url(url)
    retrying(url, "delete", lambda: client().delete_object(Bucket=bucket, Key=key))
