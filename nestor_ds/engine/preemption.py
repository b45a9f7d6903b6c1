"""Preemption: a signal to the rank, or the death of its launcher, becomes "checkpoint at the next step boundary".

What each launcher forwards (read from their sources: deepspeed/launcher/runner.py and launch.py in DeepSpeed
0.19.8, torch/distributed/run.py and torch/distributed/elastic/agent/server/api.py in PyTorch 2.13):

- ``deepspeed`` (runner.py), one node: starts ``python -m deepspeed.launcher.launch`` with ``Popen`` and installs
  no signal handler for local runs, so SIGTERM/SIGQUIT kill the runner at once and forward nothing; launch.py
  (its child, the ranks' parent) survives as an orphan and the ranks train on. launch.py itself, when it gets
  SIGINT/SIGTERM, sends SIGTERM to every rank's process tree, waits 30 s, then SIGKILLs.
- ``torchrun``: the elastic agent turns SIGTERM/SIGINT/SIGHUP/SIGQUIT into a shutdown that sends the same
  signal to the workers, waits (30 s by default), then SIGKILLs, and re-raises the signal as an exception in
  its own process.
- ``kill -9`` of either launcher forwards nothing.

So a rank cannot rely on a forwarded signal. It watches its launcher chain instead: ``prctl(PR_SET_PDEATHSIG,
SIGTERM)`` (Linux) makes the kernel signal the rank when its direct parent exits, and a daemon thread checks
once a second that every launcher ancestor recorded at start (the processes above the rank whose command line
is ``deepspeed`` / ``deepspeed.launcher.launch`` / ``torchrun`` / ``torch.distributed.run``) still lives. Either
way the flag is set; the training loop agrees on it over all ranks, saves a checkpoint and stops, and the
MLflow run ends KILLED.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

LAUNCHER_MARKS = ("deepspeed", "torchrun", "torch.distributed.run", "torch/distributed/run.py")
POLL_S = 1.0


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) from /proc, or None when the process is gone."""
    try:
        text = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), fields[0], fields[19]


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_ancestors(pid: int | None = None) -> list[tuple[int, str]]:
    """(pid, start time) of the launcher processes directly above ``pid`` (nearest first); [] without /proc."""
    out: list[tuple[int, str]] = []
    st = _stat(pid or os.getpid())
    while st is not None and st[0] > 1:
        parent = st[0]
        pst = _stat(parent)
        if pst is None or not any(m in _cmdline(parent) for m in LAUNCHER_MARKS):
            break
        out.append((parent, pst[2]))
        st = pst
    return out


def _alive(pid: int, start: str) -> bool:
    st = _stat(pid)
    return st is not None and st[1] not in ("Z", "X") and st[2] == start  # a zombie or a reused pid: gone


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent exits (PR_SET_PDEATHSIG). False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the parent died before the call: the kernel will not signal now
        os.kill(os.getpid(), sig)
    return True


class Preemption:
    """SIGTERM/SIGINT or a dead launcher set ``requested``; the loop saves at the next step boundary and exits."""

    def __init__(self, watch_launcher: bool = True) -> None:
        self.requested = False
        self.reason = ""
        self._old: dict[int, Any] = {}
        self._watch = watch_launcher
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Preemption:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        if self._watch:
            ancestors = launcher_ancestors()
            if ancestors:
                set_parent_death_signal(signal.SIGTERM)
                self._thread = threading.Thread(
                    target=self._watch_launchers, args=(ancestors,), daemon=True, name="nestor-launcher-watch"
                )
                self._thread.start()
        return self

    def request(self, reason: str) -> None:
        if not self.requested:
            self.reason = reason
            print(f"[nestor-ds] {reason}: saving a checkpoint at the next step boundary", file=sys.stderr, flush=True)
        self.requested = True

    def _handle(self, signum: int, _frame: Any) -> None:
        self.request(f"received {signal.Signals(signum).name}")

    def _watch_launchers(self, ancestors: list[tuple[int, str]]) -> None:
        while not self._stop.wait(POLL_S):
            gone = next((pid for pid, start in ancestors if not _alive(pid, start)), None)
            if gone is not None:
                self.request(f"launcher process {gone} is gone (killed or signalled)")
                return

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for sig, old in self._old.items():
            signal.signal(sig, old)
