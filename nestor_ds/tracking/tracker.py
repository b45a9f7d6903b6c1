"""MLflow tracking for training runs: rank 0 logs, every other rank is a no-op.

Why this shape:
- One MLflow run per training, owned by rank 0; the engine calls the same API on every rank so it
  needs no `if rank == 0` of its own.
- Tracking must never take training down: an unreachable server costs one warning line at start,
  and any later MLflow error disables tracking with one warning. HTTP retries are turned off and
  timeouts shortened before the first request, otherwise MLflow retries for minutes.
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

from nestor_ds.tracking.system import run_environment, system_metrics_available
from nestor_ds.typed_config import flatten  # noqa: F401  (re-exported: nestor_ds.tracking.flatten)

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

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "nestor-ds"
    system_metrics: bool = True
    figure_every_eval: bool = True
    system_metrics_interval_s: float = 10.0  # sampling period of CPU / memory / GPU metrics
    http_timeout_s: int = 5  # per request; an unreachable server must not stall start-up


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
    db = Path(uri[len("sqlite:///"):]).expanduser().resolve()
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
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.entry = entry
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
        self._client = None
        self._monitor = None
        self._warned_values = False
        self._existing_params: dict[str, str] = {}  # already on the run (resume) or logged here
        self._all_params: dict[str, Any] = {}  # unclipped, for params.json
        if rank != 0 or not cfg.enabled:
            return
        # Must be set before the first request: MLflow reads them per request.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.http_timeout_s))
        try:
            self._start(run_name, parent_run_id, resume_run_id)
        except Exception as exc:  # noqa: BLE001 - any failure means "no tracking", never "no training"
            log.warning("MLflow tracking disabled: cannot use %s (%s)", self.tracking_uri, _one_line(exc))
            self._disable_quietly()
            return
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
        else:
            self.experiment_id = self._experiment_id(client)
            if parent_run_id and self._same_experiment(client, parent_run_id):
                env_tags["mlflow.parentRunId"] = parent_run_id  # nests fine-tunes under the pre-training in the UI
            try:
                from mlflow.tracking.context.registry import resolve_tags

                env_tags = resolve_tags(env_tags)  # adds user, source name, ... like mlflow.start_run
            except Exception:  # noqa: BLE001 - the context tags are a nicety
                pass
            run = client.create_run(self.experiment_id, tags=env_tags, run_name=run_name)
            self.run_id = run.info.run_id
        if resume_run_id:
            self.set_tags(env_tags)
        if self.cfg.system_metrics:
            self._start_system_metrics(resume=bool(resume_run_id))

    def _experiment_id(self, client) -> str:
        """Id of the configured experiment, created (artifacts beside a SQLite DB) when missing."""
        exp = client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(self.cfg.experiment, artifact_location=_artifact_location(self.tracking_uri))
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
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=self.cfg.system_metrics_interval_s,
            resume_logging=resume,
            tracking_uri=self.tracking_uri,
        )
        self._monitor.start()

    def finish(self, status: str = "FINISHED") -> None:
        """Stop system metrics and mark the run FINISHED / FAILED / KILLED; idempotent."""
        if self.run_id is None:
            return
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            try:
                monitor.finish()  # joins the sampler thread and flushes what it holds
            except Exception as exc:  # noqa: BLE001
                log.warning("MLflow system metrics did not stop cleanly: %s", _one_line(exc))
        self._call(self._client.set_terminated, self.run_id, status)
        self.run_id = None
        self._client = None

    def _finish_at_exit(self) -> None:
        """A run still open at interpreter exit did not end through `finish`: record it as failed."""
        if self.run_id is not None:
            self.finish("FAILED")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))

    # ------------------------------------------------------------------ logging
    @property
    def active(self) -> bool:
        """True on rank 0 while a run is open and MLflow has not failed."""
        return self.run_id is not None

    def log_params(self, params: dict) -> None:
        """Nested dicts flattened to "a.b.c"; values stringified and clipped to 500 characters.

        The full, unclipped set also goes to the artifact `params.json` (merged across calls).
        On a resumed run, parameters already present are skipped (MLflow params are immutable).
        """
        if not self.active:
            return
        flat = {_clip(k, KEY_LIMIT): v for k, v in flatten(params).items()}
        self._all_params.update(flat)
        from mlflow.entities import Param

        items, changed = [], []
        for key, value in flat.items():
            text = _clip(str(value), PARAM_VALUE_LIMIT)
            old = self._existing_params.get(key)
            if old is not None:
                if old != text:
                    changed.append(key)
                continue
            items.append(Param(key, text))
            self._existing_params[key] = text
        if changed:
            log.warning("MLflow: %d params differ from the resumed run and were not re-logged: %s",
                        len(changed), ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
        for i in range(0, len(items), PARAMS_PER_BATCH):
            if not self._call(self._client.log_batch, self.run_id, params=items[i : i + PARAMS_PER_BATCH]):
                return
        self.log_dict(self._all_params, "params.json")

    def set_tags(self, tags: dict) -> None:
        """String tags (values clipped), batched."""
        if not self.active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(_clip(str(k), KEY_LIMIT), _clip(str(v), TAG_VALUE_LIMIT)) for k, v in tags.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            if not self._call(self._client.log_batch, self.run_id, tags=items[i : i + PARAMS_PER_BATCH]):
                return

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One batched request per call; tensors and numpy scalars accepted; never raises."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
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
            items.append(Metric(_clip(key, KEY_LIMIT), number, now, int(step)))
        for i in range(0, len(items), METRICS_PER_BATCH):
            if not self._call(self._client.log_batch, self.run_id, metrics=items[i : i + METRICS_PER_BATCH]):
                return

    def log_figure(self, fig, name: str) -> None:
        """Matplotlib Figure -> `figures/<name>.png` artifact."""
        if not self.active:
            return
        name = name if name.endswith(".png") else f"{name}.png"
        self._call(self._client.log_figure, self.run_id, fig, f"figures/{name}", save_kwargs={"dpi": 110})

    def log_dict(self, d: dict, name: str) -> None:
        """Dict -> JSON artifact `<name>.json` (numpy / torch values converted)."""
        if not self.active:
            return
        name = name if name.endswith(".json") else f"{name}.json"
        try:
            text = json.dumps(d, indent=2, default=_json_default, allow_nan=True)
        except (TypeError, ValueError) as exc:
            log.warning("MLflow: %s not JSON-serialisable (%s); skipped", name, _one_line(exc))
            return
        self._call(self._client.log_text, self.run_id, text, name)

    # ------------------------------------------------------------------ failure handling
    def _call(self, fn, *args, **kwargs) -> bool:
        """Run one MLflow call; on any error warn once, disable tracking and return False."""
        try:
            fn(*args, **kwargs)
            return True
        except Exception as exc:  # noqa: BLE001 - tracking must never crash training
            log.warning("MLflow tracking disabled after error in %s: %s", getattr(fn, "__name__", fn), _one_line(exc))
            self._disable_quietly()
            return False

    def _disable_quietly(self) -> None:
        """Stop the sampler thread and forget the run without further requests."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            try:
                monitor._shutdown_event.set()  # no flush: the store is the thing that failed
            except Exception:  # noqa: BLE001
                pass
        self.run_id = None
        self._client = None


def _one_line(exc: BaseException) -> str:
    """First line of an exception message, prefixed with its type, for one-line warnings."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
