"""Preemption: a signal to the rank, or the death of its launcher, becomes "checkpoint within two steps".

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

Agreement without a host sync (:meth:`Preemption.poll`, called after every optimizer step): each rank posts its
flag in a non-blocking all-reduce (MAX) at the end of step s and reads the result at the end of step s+1, when
every rank has long posted it. Launchers SIGKILL 30 s after SIGTERM, so waiting for the next logging step
(``train.log_every``, 10 by default) could cost the checkpoint; here a request that arrives while step N+1 runs
(N steps finished) is posted after step N+1 and read after step N+2: every rank saves at step N+1 or N+2. The
flag is a CPU tensor reduced over a gloo group of its own (the same ranks): reading it never waits for the
accelerator's queue (an NCCL all-reduce needs a CUDA tensor, and reading that one would), and the flag's
collectives never interleave with the training's on the default group.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import torch

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
    """SIGTERM/SIGINT or a dead launcher set ``requested``; :meth:`poll` turns it into one decision all ranks take
    at the same step, at most two steps after the request, so the loop saves then and exits."""

    def __init__(self, watch_launcher: bool = True, step: int = 0) -> None:
        """``step``: the steps already done (a resumed run's start), so a request names the right step."""
        self.requested = False
        self.reason = ""
        self.step = step  # the last finished optimizer step, as poll() was told
        self.requested_at: int | None = None
        self._old: dict[int, Any] = {}
        self._watch = watch_launcher
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._group: Any = None  # the flag's own gloo group; None in a single process
        self._flag: torch.Tensor | None = None  # posted at the previous poll, reduced in place
        self._work: Any = None  # its pending all-reduce

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
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # collective (every rank enters here at the same point): host-only, apart from the training's groups
            self._group = dist.new_group(backend="gloo")
        return self

    def request(self, reason: str) -> None:
        """Set the flag (from a signal handler or the watcher thread); the first request is printed with its step."""
        if not self.requested:
            self.reason, self.requested_at = reason, self.step
            print(
                f"[nestor-ds] {reason}: preemption requested at step {self.step}; the ranks agree within 2 steps, "
                "then save a checkpoint and stop",
                file=sys.stderr,
                flush=True,
            )
        self.requested = True

    def poll(self, step: int) -> bool:
        """Called by every rank after every optimizer step ``step``: True on all ranks at the same step once any
        rank's request has gone through one non-blocking all-reduce (posted here, read at the next call).

        Why not read the flag now: agreeing on it at once is a blocking collective every step; reading the one
        posted a step ago costs no wait (every rank posted it before the step that just ran) and no device sync
        (a CPU tensor over gloo). Without a process group the local flag is the decision.
        """
        self.step = step
        if self._group is None:
            return self.requested
        agreed = False
        if self._work is not None:
            self._work.wait()
            agreed = bool(self._flag.item() > 0)  # type: ignore[union-attr]  # a CPU tensor: no device sync
        self._flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        self._work = torch.distributed.all_reduce(
            self._flag, op=torch.distributed.ReduceOp.MAX, group=self._group, async_op=True
        )
        return agreed

    def _handle(self, signum: int, _frame: Any) -> None:
        self.request(f"received {signal.Signals(signum).name}")

    def _watch_launchers(self, ancestors: list[tuple[int, str]]) -> None:
        while not self._stop.wait(POLL_S):
            gone = next((pid for pid, start in ancestors if not _alive(pid, start)), None)
            if gone is not None:
                self.request(f"launcher process {gone} is gone (killed or signalled)")
                return

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        """Restore the signal handlers; after a normal end, complete the last posted all-reduce (every rank posted
        it) and destroy the flag's group now: a gloo group left to exit-time destruction can abort the process
        ("terminate called without an active exception", seen in 2-rank runs). After an error both are left
        alone: another rank may never post that all-reduce, and waiting could hang the exit."""
        self._stop.set()
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self._group is not None and exc_type is None:
            if self._work is not None:
                self._work.wait()
            torch.distributed.destroy_process_group(self._group)
            self._group = self._work = None
