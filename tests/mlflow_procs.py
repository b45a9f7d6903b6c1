"""Real MLflow processes for tests: `mlflow server` and `mlflow models serve` on 127.0.0.1.

Every start has a bounded wait, every process runs in its own process group and `stop` always ends the
whole group (the server forks workers), so a failing test leaves nothing behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nestor_ds.procs import free_port, wait_http  # noqa: F401  (re-exported for the tests)
from nestor_ds.procs import stop_group as stop

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})},
        )


def start_tracking_server(root: Path, port: int, timeout_s: float = 240) -> subprocess.Popen:
    """`mlflow server` with a SQLite backend and proxied artifacts under `root`, one worker."""
    log = root / "server.log"
    proc = start(
        [
            MLFLOW,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        log,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout_s, log)
    except BaseException:
        stop(proc)
        raise
    return proc
