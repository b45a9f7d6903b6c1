"""Local processes and ports, shared by the engine, the tools and the tests (standard library only).

- :func:`free_port`: a TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous or a local server).
- :func:`stop_group`: end a child started with ``start_new_session=True`` and everything it forked (MLflow servers
  fork workers), SIGTERM first, SIGKILL after a bounded wait; always reaps.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from typing import Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: Optional[subprocess.Popen], timeout_s: float = 20.0) -> None:
    """SIGTERM to the process group of `proc`, SIGKILL after `timeout_s`; a no-op for None or an ended process."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout_s)
