"""Ordered, retrying, disk-backed delivery of MLflow writes, so that a tracking outage loses nothing.

Why: the training loop must never wait on the tracking server, and a server restart in the middle of a run
must not end tracking (issue: one failed `log_batch` used to disable MLflow for the rest of the run). So every
write after a run is opened becomes an *entry* (a small JSON-able dict) handed to an :class:`Outbox`:

- `put` only appends to an in-memory queue; a background thread delivers entries in order.
- A delivery that fails for a transient reason (connection refused, timeout, 5xx, a locked SQLite file) moves
  that entry and everything after it to the *journal* -- `pending.jsonl` in the buffer directory (the run
  directory's `mlflow_buffer/`), also kept in memory -- and the thread retries with exponential backoff
  (1 s doubling to `retry_max_s`). When the server answers again the journal is sent in order and emptied.
- A permanent error (MLflow says the request itself is bad: a changed param, a deleted run) drops that one
  entry with a warning; tracking goes on.
- The journal is bounded (`max_bytes`): when full, further *metric* entries are dropped and counted (they
  stay in `metrics.jsonl`); params, tags, artifacts and the final status are always kept.
- A journal left by a process that ended during an outage is loaded by the next `Outbox` on the same
  directory (the resumed run) and sent first.

Entry kinds (`op`): `metrics` ([key, value, timestamp ms, step] rows), `params`, `tags`, `artifact`
(a file under `files/` of the buffer directory, uploaded to an artifact directory, then deleted), `inputs`
(dataset inputs, see `datasets.py`) and `terminate` (the run's final status). Every entry names its run,
so a journal can be delivered by any process. Re-sending a metric row that did reach the store before a
connection dropped is harmless: MLflow's SQL store ignores an identical (key, value, timestamp, step) row.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("nestor_ds.tracking")

JOURNAL = "pending.jsonl"
FILES = "files"
DEFAULT_MAX_BYTES = 256 * 2**20
# MLflow error codes that say "this request will never succeed": drop the entry, keep tracking.
PERMANENT_ERRORS = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "BAD_REQUEST",
        "INVALID_STATE",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "MALFORMED_REQUEST",
    }
)

Entry = dict[str, Any]


def is_permanent(exc: BaseException) -> bool:
    """True when retrying cannot help: MLflow rejected the request itself (bad value, deleted run, no rights)."""
    code = getattr(exc, "error_code", None)
    return isinstance(code, str) and code in PERMANENT_ERRORS


def deliver(client: Any, entry: Entry) -> None:
    """Send one entry with an `MlflowClient`; raises what MLflow raises."""
    from mlflow.entities import Metric, Param, RunTag

    op, run_id = entry["op"], entry["run"]
    if op == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, float(v), int(ts), int(s)) for k, v, ts, s in entry["rows"]])
    elif op == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in entry["params"].items()])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in entry["tags"].items()])
    elif op == "artifact":
        client.log_artifact(run_id, entry["file"], entry.get("dir") or None)
    elif op == "inputs":
        from nestor_ds.tracking.datasets import dataset_inputs

        client.log_inputs(run_id, datasets=dataset_inputs(entry["datasets"]))
    elif op == "terminate":
        client.set_terminated(run_id, entry["status"])
    else:
        raise ValueError(f"unknown outbox entry op {op!r}")


class Outbox:
    """Background delivery of entries; see the module docstring. Create on rank 0 only."""

    def __init__(
        self,
        send: Callable[[Entry], None],
        directory: str | Path | None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        retry_max_s: float = 30.0,
    ) -> None:
        self._send = send
        self.directory = Path(directory) if directory is not None else None
        self.max_bytes = max_bytes
        self.retry_max_s = retry_max_s
        self._queue: queue.Queue[Entry | None] = queue.Queue()
        self._journal: list[Entry] = []
        self._journal_bytes = 0
        self._dropped = 0
        self._outage_since: float | None = None
        self._next_try = 0.0
        self._backoff = 1.0
        self._closing = threading.Event()
        self._give_up = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self.sent = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._load_journal()
        self._inherited = list(self._journal)  # copied before the thread starts sending them
        self._thread = threading.Thread(target=self._run, name="nestor-mlflow-outbox", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer side (training thread)
    @property
    def files_dir(self) -> Path | None:
        """Where artifact files wait for upload (None without a buffer directory)."""
        return None if self.directory is None else self.directory / FILES

    def leftover(self) -> list[Entry]:
        """Entries inherited from an earlier process (as loaded, whether or not sent since)."""
        return list(self._inherited)

    def put(self, entry: Entry) -> None:
        """Queue one entry; never blocks, never raises."""
        self._idle.clear()
        self._queue.put(entry)

    def flush(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` until everything queued so far is delivered; True if it was."""
        return self._idle.wait(timeout_s)

    def close(self, timeout_s: float) -> int:
        """Deliver what is left, waiting at most about `timeout_s` for the server; returns entries kept on disk."""
        self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._give_up.set()  # the request in flight ends within the HTTP timeout
            self._thread.join(120)
        if self._dropped:
            log.warning(
                "MLflow: %d metric batches were dropped because the outage buffer was full (%d MiB); "
                "they are in metrics.jsonl",
                self._dropped,
                self.max_bytes // 2**20,
            )
        return len(self._journal)

    # ------------------------------------------------------------------ delivery thread
    def _run(self) -> None:
        while True:
            if self._journal:
                self._drain_queue_to_journal()
                if self._give_up.is_set():
                    return
                now = time.monotonic()
                if now >= self._next_try:
                    self._flush_journal()
                    continue
                wait = self._next_try - now
                if self._closing.is_set():
                    wait = min(wait, 1.0)
                self._give_up.wait(wait)
                continue
            if self._closing.is_set() and self._queue.empty():
                self._idle.set()
                return
            try:
                entry = self._queue.get(timeout=0.5)
            except queue.Empty:
                self._idle.set()
                continue
            if entry is None:
                continue
            if not self._try(entry):
                self._append(entry)
            if not self._journal and self._queue.empty():
                self._idle.set()

    def _try(self, entry: Entry) -> bool:
        """Deliver one entry: True when done (sent, or dropped as permanently bad), False on a transient error."""
        try:
            self._send(entry)
        except Exception as exc:  # noqa: BLE001 - classified below; tracking must never crash training
            if is_permanent(exc):
                log.warning("MLflow rejected %s (dropped, tracking continues): %s", _describe(entry), one_line(exc))
                self._done(entry)
                return True
            self._note_failure(exc)
            return False
        self._done(entry)
        self.sent += 1
        return True

    def _note_failure(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            where = self.directory / JOURNAL if self.directory is not None else "memory"
            log.warning(
                "MLflow unreachable (%s): buffering to %s and retrying with backoff; training goes on",
                one_line(exc),
                where,
            )
            self._backoff = 1.0
        else:
            self._backoff = min(self._backoff * 2, self.retry_max_s)
        self._next_try = now + self._backoff

    def _flush_journal(self) -> None:
        """Send journal entries in order; stop at the first transient failure."""
        sent = 0
        while self._journal and not self._give_up.is_set():
            if not self._try(self._journal[0]):
                break
            self._journal_bytes -= len(json.dumps(self._journal.pop(0)))
            sent += 1
        if sent:
            self._save_journal()
        if not self._journal and self._outage_since is not None:
            log.warning(
                "MLflow reachable again after %.0f s: %d buffered entries sent",
                time.monotonic() - self._outage_since,
                sent,
            )
            self._outage_since = None

    def _drain_queue_to_journal(self) -> None:
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                return
            if entry is not None:
                self._append(entry)

    def _append(self, entry: Entry) -> None:
        line = json.dumps(entry)
        if entry["op"] == "metrics" and self._journal_bytes + len(line) > self.max_bytes:
            self._dropped += 1
            return
        self._journal.append(entry)
        self._journal_bytes += len(line)
        if self.directory is not None:
            with open(self.directory / JOURNAL, "a") as f:
                f.write(line + "\n")

    def _save_journal(self) -> None:
        """Rewrite the journal with what is left (atomic replace; removed when empty)."""
        if self.directory is None:
            return
        path = self.directory / JOURNAL
        if not self._journal:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name(JOURNAL + ".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in self._journal))
        os.replace(tmp, path)

    def _load_journal(self) -> None:
        path = self.directory / JOURNAL
        if not path.is_file():
            return
        for n, line in enumerate(path.read_text().splitlines(), 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill during the append: the rest is intact
                log.warning("MLflow buffer %s: line %d unreadable, skipped", path, n)
                continue
            self._journal.append(entry)
            self._journal_bytes += len(line)
        if self._journal:
            log.warning("MLflow: %d entries left by an earlier process in %s are sent first", len(self._journal), path)

    def _done(self, entry: Entry) -> None:
        """An artifact's staged copy is removed once uploaded (or dropped)."""
        if entry["op"] == "artifact" and entry.get("staged"):
            f = Path(entry["file"])
            f.unlink(missing_ok=True)
            try:
                f.parent.rmdir()  # its own staging directory (see Tracker._stage)
            except OSError:
                pass


def _describe(entry: Entry) -> str:
    if entry["op"] == "artifact":
        return f"artifact {entry.get('dir') or '.'}/{Path(entry['file']).name}"
    return f"{entry['op']} entry"


def one_line(exc: BaseException) -> str:
    """First line of an exception message, prefixed with its type, for one-line warnings (credentials masked)."""
    from nestor_ds.redact import mask_secrets

    text = str(exc).strip().splitlines()
    return mask_secrets(f"{type(exc).__name__}: {text[0] if text else ''}")[:300]


def stage_dir(outbox: Outbox | None) -> Path:
    """A directory where an artifact file can wait for upload (the buffer's `files/`, else a temp dir)."""
    if outbox is not None and outbox.files_dir is not None:
        outbox.files_dir.mkdir(parents=True, exist_ok=True)
        return outbox.files_dir
    import tempfile

    d = Path(tempfile.gettempdir()) / f"nestor-mlflow-{os.getpid()}"
    d.mkdir(exist_ok=True)
    return d
