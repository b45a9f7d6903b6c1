"""MLflow outages lose nothing, resumes do not log twice, credentials never leak.

A real `mlflow server` on 127.0.0.1 (SQLite backend in tmp) is stopped and restarted while a real tiny
training run logs to it every step; afterwards the run's MLflow history must equal `metrics.jsonl` and the
run must be FINISHED. Waits are bounded and the server is always stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_procs import free_port, start_tracking_server, stop
from train_fixtures import ds_config, launch, tiny_config

TRAIN = "nestor_ds.train"  # run as a module (tests/conftest.py puts the repository on PYTHONPATH)
SECRET = "s3cretPW42"
pytestmark = pytest.mark.timeout(900)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _steps_in(path: Path) -> int:
    try:
        rows = _jsonl(path)
    except (OSError, json.JSONDecodeError):
        return 0
    return rows[-1]["step"] if rows else 0


def _wait(cond, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None and not cond():
        time.sleep(0.2)


def _assert_history_equals_jsonl(client: MlflowClient, run_id: str, rows: list[dict], log_every: int = 1) -> None:
    """Every metric of metrics.jsonl, at every logged step, exactly once and with the same value."""
    last = rows[-1]["step"]
    for key in rows[0]:
        if key == "step":
            continue
        want = [(r["step"], r[key]) for r in rows if r["step"] % log_every == 0 or r["step"] in (1, last)]
        got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in got] == [s for s, _ in want], f"{key}: steps differ"
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-12, abs=0), key


def test_server_restart_mid_run_loses_nothing_and_masks_credentials(tiny_shards, tmp_path):
    _, shards = tiny_shards
    port = free_port()
    uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
    steps = 24
    cfg = tiny_config(
        tmp_path,
        shards,
        tracking={
            "tracking_uri": uri,
            "retry_max_s": 2,
            "http_timeout_s": 2,
            "finish_timeout_s": 240,
            "log_model": False,
            "metrics_every_s": 0,  # every logging step is a request, so some are made while the server is down
        },
        train={"max_steps": steps, "ckpt_every": 8, "log_every": 1},
    )
    ds = ds_config(tmp_path, stage=2)
    run_dir = tmp_path / "runs" / "outage"
    server = start_tracking_server(tmp_path, port)
    train = None
    try:
        train = subprocess.Popen(
            [sys.executable, "-m", TRAIN, "--ds_config", str(ds), "--config", str(cfg), "--run-name", "outage"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        )
        metrics = run_dir / "metrics.jsonl"
        _wait(lambda: _steps_in(metrics) >= 3, train, 400)
        down_at = _steps_in(metrics)
        assert train.poll() is None and 0 < down_at < steps, "training ended before the outage could start"
        stop(server)  # the outage: several logged steps go to the on-disk buffer
        _wait(lambda: _steps_in(metrics) >= down_at + 6, train, 400)
        up_at = _steps_in(metrics)
        server = start_tracking_server(tmp_path, port)
        out, err = train.communicate(timeout=600)
        assert train.returncode == 0, err[-5000:]
        assert up_at >= down_at + 6 or up_at == steps, (down_at, up_at)
        assert "MLflow unreachable" in err and "reachable again" in err, err[-3000:]
        assert "tracking disabled" not in err

        # the store read back through the restarted server, after the training process is gone
        client = MlflowClient(f"http://127.0.0.1:{port}")
        run = client.search_runs([client.get_experiment_by_name("nestor-ds").experiment_id])[0]
        assert run.info.status == "FINISHED"
        _assert_history_equals_jsonl(client, run.info.run_id, _jsonl(run_dir / "metrics.jsonl"))
        assert len(run.inputs.dataset_inputs) == 2  # lineage logged at start, through the same buffer
        assert run.data.params["config.tracking.tracking_uri"] == f"http://***@127.0.0.1:{port}"
        leaked = [k for k, v in {**run.data.params, **run.data.tags}.items() if SECRET in v]
        assert not leaked, leaked
        assert "params.json" in [f.path for f in client.list_artifacts(run.info.run_id)]
    finally:
        if train is not None and train.poll() is None:
            train.kill()
            train.communicate()
        stop(server)

    # every checkpoint names the run (a resume re-opens it); nothing on disk or printed holds the password
    tags = sorted((run_dir / "checkpoints").glob("step_*"))
    assert tags
    for tag in tags:
        assert json.loads((tag / "nestor_config.json").read_text())["mlflow_run_id"] == run.info.run_id
    assert not (run_dir / "mlflow_buffer" / "pending.jsonl").exists()
    assert SECRET not in out + err
    for f in [p for p in run_dir.rglob("*") if p.is_file()] + [tmp_path / "server.db"]:
        assert SECRET.encode() not in f.read_bytes(), f


def test_resume_does_not_log_redone_steps_twice(tiny_shards, tmp_path):
    _, shards = tiny_shards
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_config(
        tmp_path,
        shards,
        tracking={"tracking_uri": uri, "log_model": False},
        train={"max_steps": 6, "ckpt_every": 3, "keep_last": 3},
    )
    ds = ds_config(tmp_path, stage=2)
    args = [TRAIN, "--ds_config", str(ds), "--config", str(cfg), "--run-name", "redo"]
    first = launch(args, 1, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    ckpts = tmp_path / "runs" / "redo" / "checkpoints"
    # roll back to step 3: steps 4..6 are trained and logged again by the same MLflow run
    again = launch(args + ["--resume", str(ckpts / "step_00000003")], 1, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from" in again.stderr

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("nestor-ds").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    rows = _jsonl(tmp_path / "runs" / "redo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 7))  # each step once
    # the resumed run replays the same trajectory, so the values kept are the ones in metrics.jsonl
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([r["train/loss"] for r in rows])
