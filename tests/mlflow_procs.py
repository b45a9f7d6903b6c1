"""Real MLflow processes for tests: `mlflow server` and `mlflow models serve` on 127.0.0.1.

Every start has a bounded wait, every process runs in its own process group and `stop` always ends the
whole group (the server forks workers), so a failing test leaves nothing behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from nestor_ds.procs import free_port, stop_group as stop  # noqa: F401  (re-exported for the tests)

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})})


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    """Poll `url` until it answers 200; fail (with the process log's tail) if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited {proc.returncode}\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s\n{log.read_text()[-3000:]}")


def start_tracking_server(root: Path, port: int, timeout_s: float = 240) -> subprocess.Popen:
    """`mlflow server` with a SQLite backend and proxied artifacts under `root`, one worker."""
    log = root / "server.log"
    proc = start([MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                  "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                  "--artifacts-destination", str(root / "artifacts")], log)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout_s, log)
    except BaseException:
        stop(proc)
        raise
    return proc
