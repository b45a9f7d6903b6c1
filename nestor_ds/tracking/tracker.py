"""MLflow tracking for training runs: rank 0 logs, every other rank is a no-op.

Why this shape:
- One MLflow run per training, owned by rank 0; the engine calls the same API on every rank so it
  needs no `if rank == 0` of its own.
- Tracking must never take training down or slow it: an unreachable server at start costs one warning
  line and the run trains untracked. Once the run is open, every write goes through an `Outbox`
  (`buffer.py`): a background thread delivers it, and during an outage it is kept on disk (the run
  directory's `mlflow_buffer/`) and sent, in order, when the server is back -- so the MLflow history
  ends equal to `metrics.jsonl`. MLflow's own HTTP retries are turned off and timeouts shortened before
  the first request (the outbox does the retrying, off the training thread).
- Metrics go out in one request at most every `metrics_every_s` seconds (rows held in between, sent at
  once by `flush` and `finish`): a SQLite commit or HTTP request per logging step cost a small model's
  training 3% of a core, and the delivery thread holds the GIL while it runs its Python
  (docs/review_runs.md); metrics.jsonl has every step at once.
- A resumed run re-opens its MLflow run (id kept in every checkpoint) and does not log a (metric, step)
  that the run already holds, so steps redone after a resume appear once.
- Credentials in the tracking URI are masked in everything logged (`redact.py`).
- Everything goes through an `MlflowClient` bound to this run's URI (no fluent global run stack),
  and system metrics use MLflow's own `SystemMetricsMonitor` -- the same sampler that
  `mlflow.start_run(log_system_metrics=True)` starts -- bound to the same URI and stopped in `finish`.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nestor_ds.compat import metric_objs, resolve_context_tags, stop_system_metrics_now, system_metrics_monitor
from nestor_ds.redact import mask_secrets, redact
from nestor_ds.tracking.buffer import Outbox, deliver, one_line, stage_dir
from nestor_ds.tracking.system import run_environment, system_metrics_available
from nestor_ds.typed_config import check, flatten  # noqa: F401  (re-exported: nestor_ds.tracking.flatten)

log = logging.getLogger("nestor_ds.tracking")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARAM_VALUE_LIMIT = 500  # the classic MLflow server limit; newer ones allow more, older ones reject
TAG_VALUE_LIMIT = 5000
KEY_LIMIT = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
PRETRAIN_RUN_TAG = "nestor.pretrain_run_id"


@dataclass
class TrackingConfig:
    """Where and what to track. `tracking_uri=None` -> $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""

    enabled: bool = True  # log the run to MLflow (rank 0 only); false: no MLflow at all
    tracking_uri: str | None = None  # MLflow store or server; None -> $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "nestor-ds"  # MLflow experiment the run is logged under (created when missing)
    system_metrics: bool = True  # MLflow's CPU / memory / GPU metrics, sampled beside the run
    figure_every_eval: bool = True  # log figures (predictions, rollout, expert usage) at each evaluation, the last too
    system_metrics_interval_s: float = 10.0  # sampling period of CPU / memory / GPU metrics
    http_timeout_s: int = 5  # per request; an unreachable server must not stall start-up
    buffer_max_mb: int = 256  # on-disk outage buffer of one run (metrics beyond it are dropped, counted)
    retry_max_s: float = 30.0  # longest wait between two delivery attempts during an outage
    finish_timeout_s: float = 60.0  # at the end, how long to wait for a server that is down before leaving the buffer
    metrics_every_s: float = 10.0  # metrics reach MLflow in one request at most this often (0: every logging step)
    log_model: bool = True  # log the final weights as an MLflow pyfunc model (docs/review_runs.md)
    register_model: str | None = None  # also register that model under this name in the Model Registry

    def validate(self) -> None:
        for key in ("metrics_every_s", "system_metrics_interval_s", "retry_max_s", "finish_timeout_s"):
            value = getattr(self, key)
            check(value >= 0, f"tracking.{key}", f"must be >= 0 seconds, got {value!r}")


def resolve_tracking_uri(uri: str | None) -> str:
    """Explicit URI, else the MLFLOW_TRACKING_URI environment variable, else a local SQLite file."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _clip(text: str, limit: int) -> str:
    """Truncate to `limit` characters, marking the cut so a reader knows the value is partial."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_default(obj: Any) -> Any:
    """JSON fallback for numpy / torch scalars and arrays, paths and dataclasses."""
    import dataclasses

    if hasattr(obj, "tolist"):
        return obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)


def _artifact_location(uri: str) -> str | None:
    """For a SQLite store keep artifacts beside the database (not in whatever the cwd happens to be)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :]).expanduser().resolve()
    return (db.parent / "mlruns").as_uri()


class Tracker:
    """MLflow run of one training / fine-tuning / evaluation; see the module docstring."""

    def __init__(
        self,
        cfg: TrackingConfig,
        rank: int,
        entry: str,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        resume_run_id: str | None = None,
        buffer_dir: str | Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.entry = entry
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
        self._client = None
        self._monitor = None
        self._outbox: Outbox | None = None
        self._warned_values = False
        self._existing_params: dict[str, str] = {}  # already on the run (resume) or logged here
        self._all_params: dict[str, Any] = {}  # unclipped, for params.json
        self._logged_upto: dict[str, int] = {}  # resume: highest step per metric the run already holds
        self._artifact_seq = 0
        self._pending_tags: dict[str, str] = {}  # resume: the environment tags, sent once the outbox runs
        self._held_rows: list[list] = []  # metric rows waiting for the next request (metrics_every_s)
        self._metrics_sent_at = -math.inf  # time.monotonic() of the last metrics request: the first goes at once
        if rank != 0 or not cfg.enabled:
            return
        # Must be set before the first request: MLflow reads them per request.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.http_timeout_s))
        if mask_secrets(self.tracking_uri) != self.tracking_uri:  # MLflow prints "View run at <uri>" unmasked
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        try:
            self._start(run_name, parent_run_id, resume_run_id)
        except Exception as exc:  # noqa: BLE001 - any failure means "no tracking", never "no training"
            kept = f"; checkpoints keep MLflow run {resume_run_id}, a later resume re-opens it" if resume_run_id else ""
            log.warning(
                "MLflow tracking disabled: cannot use %s (%s)%s", mask_secrets(self.tracking_uri), one_line(exc), kept
            )
            self._disable_quietly()
            self.run_id = resume_run_id  # not active, but the run this training belongs to stays named
            return
        client = self._client
        self._outbox = Outbox(
            lambda e: deliver(client, e), buffer_dir, max_bytes=cfg.buffer_max_mb * 2**20, retry_max_s=cfg.retry_max_s
        )
        for left in self._outbox.leftover():  # sent before anything new: they count as "already logged"
            if left["op"] == "metrics" and left["run"] == self.run_id:
                for key, _value, _ts, step in left["rows"]:
                    self._logged_upto[key] = max(self._logged_upto.get(key, -1), int(step))
        if self._pending_tags:
            self._put({"op": "tags", "tags": self._pending_tags})
        atexit.register(self._finish_at_exit)

    # ------------------------------------------------------------------ start / stop
    def _start(self, run_name: str | None, parent_run_id: str | None, resume_run_id: str | None) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        self._client = client
        env_tags = {"nestor.entry": self.entry, **{f"nestor.{k}": v for k, v in run_environment().items()}}
        env_tags["mlflow.source.git.commit"] = env_tags.get("nestor.git.commit", "unknown")
        if parent_run_id:
            env_tags[PRETRAIN_RUN_TAG] = parent_run_id
        if resume_run_id:
            run = client.get_run(resume_run_id)
            self.experiment_id = run.info.experiment_id
            self.run_id = resume_run_id
            client.update_run(resume_run_id, status="RUNNING", name=run_name)
            self._existing_params.update(run.data.params)
            # MLflow's latest value of a metric is the one with the highest step: that is how far it got
            self._logged_upto = {m.key: int(m.step) for m in metric_objs(run)}
            self._pending_tags = {
                _clip(k, KEY_LIMIT): _clip(mask_secrets(str(v)), TAG_VALUE_LIMIT) for k, v in env_tags.items()
            }
        else:
            self.experiment_id = self._experiment_id(client)
            if parent_run_id and self._same_experiment(client, parent_run_id):
                env_tags["mlflow.parentRunId"] = parent_run_id  # nests fine-tunes under the pre-training in the UI
            try:
                env_tags = resolve_context_tags(env_tags)  # adds user, source name, ... like mlflow.start_run
            except Exception:  # noqa: BLE001 - the context tags are a nicety
                pass
            run = client.create_run(self.experiment_id, tags=redact(env_tags), run_name=run_name)
            self.run_id = run.info.run_id
        if self.cfg.system_metrics:
            self._start_system_metrics(resume=bool(resume_run_id))

    def _experiment_id(self, client) -> str:
        """Id of the configured experiment, created (artifacts beside a SQLite DB) when missing."""
        exp = client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(
                self.cfg.experiment, artifact_location=_artifact_location(self.tracking_uri)
            )
        except Exception:  # another process created it first
            exp = client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def _same_experiment(self, client, run_id: str) -> bool:
        try:
            return client.get_run(run_id).info.experiment_id == self.experiment_id
        except Exception:  # noqa: BLE001 - parent lives elsewhere: keep only the tag
            return False

    def _start_system_metrics(self, resume: bool) -> None:
        if not system_metrics_available():
            log.warning("MLflow system metrics off: psutil is not installed (pip install psutil)")
            return
        self._monitor = system_metrics_monitor(
            self.run_id,
            sampling_interval=self.cfg.system_metrics_interval_s,
            resume_logging=resume,
            tracking_uri=self.tracking_uri,
        )
        self._monitor.start()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait (at most `timeout_s`, default `finish_timeout_s`) until everything logged so far reached MLflow."""
        if self._outbox is None:
            return True
        self._send_held_metrics()
        return self._outbox.flush(self.cfg.finish_timeout_s if timeout_s is None else timeout_s)

    def finish(self, status: str = "FINISHED") -> None:
        """Stop system metrics, deliver what is buffered and mark the run FINISHED / FAILED / KILLED; idempotent.

        Waits at most `finish_timeout_s` for a server that is down; what could not be sent stays in the
        buffer directory and is sent by the next process that opens this run (a resume).
        """
        if not self.active:
            return
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            try:
                monitor.finish()  # joins the sampler thread and flushes what it holds
            except Exception as exc:  # noqa: BLE001
                log.warning("MLflow system metrics did not stop cleanly: %s", one_line(exc))
        self._send_held_metrics()
        self._put({"op": "terminate", "status": status})
        outbox, self._outbox = self._outbox, None
        left = outbox.close(self.cfg.finish_timeout_s) if outbox is not None else 0
        if left:
            where = outbox.directory or "memory (lost at exit: no buffer directory)"
            log.warning(
                "MLflow still unreachable after %.0f s: %d entries of run %s kept in %s; they are sent when "
                "this run is resumed",
                self.cfg.finish_timeout_s,
                left,
                self.run_id,
                where,
            )
        self.run_id = None
        self._client = None

    def _finish_at_exit(self) -> None:
        """A run still open at interpreter exit did not end through `finish`: record it as failed."""
        if self.active:
            self.finish("FAILED")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))

    # ------------------------------------------------------------------ logging
    @property
    def active(self) -> bool:
        """True on rank 0 while a run is open (also during a server outage: writes are buffered).

        `run_id` alone may be set on an inactive tracker: a resume whose store was unreachable at start keeps
        the id of the run it belongs to, so the checkpoints it writes still name it.
        """
        return self.run_id is not None and self._outbox is not None

    @property
    def client(self):
        """The run's `MlflowClient` (None when inactive); for start/end-of-run extras such as model logging."""
        return self._client

    def _put(self, entry: dict) -> None:
        if self._outbox is not None:
            self._outbox.put({**entry, "run": self.run_id})

    def log_params(self, params: dict) -> None:
        """Nested dicts flattened to "a.b.c"; values stringified, credentials masked, clipped to 500 characters.

        The full, unclipped set also goes to the artifact `params.json` (merged across calls).
        On a resumed run, parameters already present are skipped (MLflow params are immutable).
        """
        if not self.active:
            return
        flat = {_clip(k, KEY_LIMIT): redact(v) for k, v in flatten(params).items()}
        self._all_params.update(flat)
        items, changed = {}, []
        for key, value in flat.items():
            text = _clip(str(value), PARAM_VALUE_LIMIT)
            old = self._existing_params.get(key)
            if old is not None:
                if old != text:
                    changed.append(key)
                continue
            items[key] = text
            self._existing_params[key] = text
        if changed:
            log.warning(
                "MLflow: %d params differ from the resumed run and were not re-logged: %s",
                len(changed),
                ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""),
            )
        keys = list(items)
        for i in range(0, len(keys), PARAMS_PER_BATCH):
            self._put({"op": "params", "params": {k: items[k] for k in keys[i : i + PARAMS_PER_BATCH]}})
        self.log_dict(self._all_params, "params.json")

    def set_tags(self, tags: dict) -> None:
        """String tags (values clipped, credentials masked), batched."""
        if not self.active:
            return
        items = {_clip(str(k), KEY_LIMIT): _clip(mask_secrets(str(v)), TAG_VALUE_LIMIT) for k, v in tags.items()}
        keys = list(items)
        for i in range(0, len(keys), PARAMS_PER_BATCH):
            self._put({"op": "tags", "tags": {k: items[k] for k in keys[i : i + PARAMS_PER_BATCH]}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queued for delivery off the calling thread, rows of calls within ``metrics_every_s`` seconds in one
        request (``flush`` and ``finish`` send what is held); tensors and numpy scalars accepted.

        A (metric, step) the run already holds from before a resume is skipped: MLflow keeps every value
        logged, so a redone step would otherwise appear twice in the history.
        """
        if not self.active:
            return
        now = int(time.time() * 1000)
        rows = []
        for key, value in metrics.items():
            try:
                number = float(value.item() if hasattr(value, "item") else value)
            except (TypeError, ValueError, RuntimeError):
                if not self._warned_values:
                    log.warning("MLflow: metric %s has non-numeric value %r; skipped", key, value)
                    self._warned_values = True
                continue
            if math.isnan(number) and not self._warned_values:
                log.warning("MLflow: metric %s is NaN at step %d", key, step)
                self._warned_values = True
            key = _clip(key, KEY_LIMIT)
            if int(step) <= self._logged_upto.get(key, -1):
                continue
            rows.append([key, number, now, int(step)])
        self._held_rows += rows
        if time.monotonic() - self._metrics_sent_at >= self.cfg.metrics_every_s:
            self._send_held_metrics()

    def _send_held_metrics(self) -> None:
        """The held metric rows as requests of at most METRICS_PER_BATCH rows, in logging order."""
        rows, self._held_rows = self._held_rows, []
        self._metrics_sent_at = time.monotonic()
        for i in range(0, len(rows), METRICS_PER_BATCH):
            self._put({"op": "metrics", "rows": rows[i : i + METRICS_PER_BATCH]})

    def log_figure(self, fig, name: str) -> None:
        """Matplotlib Figure -> `figures/<name>.png` artifact (rendered here, uploaded in the background)."""
        if not self.active:
            return
        name = name if name.endswith(".png") else f"{name}.png"
        path = self._stage(Path(name).name)
        fig.savefig(path, dpi=110)
        self._put_artifact(path, str(Path("figures", name).parent))

    def log_dict(self, d: dict, name: str) -> None:
        """Dict -> JSON artifact `<name>.json` (numpy / torch values converted)."""
        if not self.active:
            return
        name = name if name.endswith(".json") else f"{name}.json"
        try:
            text = json.dumps(d, indent=2, default=_json_default, allow_nan=True)
        except (TypeError, ValueError) as exc:
            log.warning("MLflow: %s not JSON-serialisable (%s); skipped", name, one_line(exc))
            return
        path = self._stage(Path(name).name)
        path.write_text(text)
        self._put_artifact(path, str(Path(name).parent))

    def log_inputs(self, datasets: list[dict]) -> None:
        """Dataset inputs (dicts from `nestor_ds.tracking.datasets.describe_*`) for the run's Datasets panel."""
        if self.active and datasets:
            self._put({"op": "inputs", "datasets": datasets})

    def _stage(self, filename: str) -> Path:
        """A fresh staging path that keeps `filename` (the artifact's name in MLflow)."""
        self._artifact_seq += 1
        d = stage_dir(self._outbox) / f"{os.getpid()}-{self._artifact_seq:06d}"
        d.mkdir(parents=True, exist_ok=True)
        return d / filename

    def _put_artifact(self, path: Path, artifact_dir: str) -> None:
        self._put(
            {"op": "artifact", "file": str(path), "dir": "" if artifact_dir == "." else artifact_dir, "staged": True}
        )

    def _disable_quietly(self) -> None:
        """Stop the sampler thread and forget the run without further requests."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            try:
                stop_system_metrics_now(monitor)  # no flush: the store is the thing that failed
            except Exception:  # noqa: BLE001
                pass
        self.run_id = None
        self._client = None
