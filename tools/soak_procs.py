"""The processes of tools/soak_restart.py: torchrun's elastic agent on 127.0.0.1, started in sessions of their own,
waited for with a bound, and their workers found by rank.

Why its own module: the soak and the fewer-nodes run start, poll and stop the same kind of jobs; what they compare
afterwards is ``soak_checks.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nestor_ds.procs import kill_tree

REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.05


class SoakError(RuntimeError):
    """The soak could not be carried out (a run failed or hung): exit status 2, not a failed comparison."""


def run_env(**extra: str) -> dict[str, str]:
    """The ranks' environment: loopback gloo, one thread each, the repository importable, a shared extension cache."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        **extra,
    }


def elastic(
    port: int, nnodes: str, nproc: int, max_restarts: int, rdzv_id: str, rdzv_conf: str | None = None
) -> list[str]:
    """torchrun's elastic agent with the c10d rendezvous on 127.0.0.1:`port` (the launch line of docs/multinode.md)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes, "--nproc_per_node", str(nproc)]
    cmd += ["--max-restarts", str(max_restarts), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    cmd += ["--rdzv-id", rdzv_id]
    return cmd + (["--rdzv-conf", rdzv_conf] if rdzv_conf else [])


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """`cmd` in a session of its own (so a kill of our own process group cannot reach it), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout_s: float, what: str) -> None:
    """Wait for `proc`; whatever happens, nothing of its tree is left running. Raises SoakError unless it exited 0."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SoakError(f"{what}: still running after {timeout_s:.0f} s (log {log})") from None
    finally:
        kill_tree(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.returncode != 0:
        raise SoakError(f"{what}: exit {proc.returncode}; last lines of {log}:\n{log.read_text()[-4000:]}")


def inode(path: Path) -> int | None:
    """The file's inode: a resume rewrites metrics.jsonl atomically (truncate_metrics), so a new inode means the
    restarted attempt has resumed and dropped the steps it will redo."""
    try:
        return path.stat().st_ino
    except OSError:
        return None


def wait_for(cond: Callable[[], Any], proc: subprocess.Popen, timeout_s: float, what: str) -> Any:
    """Poll `cond` until it returns something truthy; SoakError when the job exits first or `timeout_s` runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            raise SoakError(f"the job exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise SoakError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def workers(agent_pid: int, marker: str) -> dict[int, int]:
    """rank -> pid of the agent's live workers whose command line contains `marker` (torchrun starts each worker as
    its own child; the rank is read from the worker's environment)."""
    import psutil

    out = {}
    try:
        children = psutil.Process(agent_pid).children()
    except psutil.Error:
        return out
    for child in children:
        try:
            if any(marker in a for a in child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                out[int(child.environ().get("RANK", "-1"))] = child.pid
        except (psutil.Error, ValueError):
            continue
    return out


def uptime() -> str:
    """The load averages (/proc/loadavg) for the record: timings on a shared 2-core machine depend on them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"
