"""Local processes and ports, shared by the engine, the tools and the tests (standard library only).

- :func:`free_port`: a TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous or a local server).
- :func:`wait_http`: poll a local URL until it answers 200, failing early when the process serving it dies.
- :func:`kill_tree`: signal a process and all its descendants at once (a lost node, in the multi-node tests).
- :func:`stop_group`: end a child started with ``start_new_session=True`` and everything it forked (MLflow servers
  fork workers), SIGTERM first, SIGKILL after a bounded wait; always reaps.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

_LOWEST_PORT = 10000  # free_port's own range starts here: above the well-known and most registered service ports


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux; the common default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a server this process starts next.

    Chosen outside the kernel's ephemeral range: a port the kernel hands out (bind to port 0) lies inside it, and
    any outgoing connection made before the server binds -- by the server itself while it starts its parts, or by
    anything else on the machine -- can take it as its local port (seen: SeaweedFS's volume server failing with
    "address already in use" on a loaded machine). A random port below that range, tested by binding it, is
    taken only by another server that picks the same one; the kernel's choice is the fallback."""
    low, _ = _ephemeral_range()
    if low - 1 > _LOWEST_PORT:
        # SystemRandom: independent of any seed a training run gave `random`, so two processes never try in lockstep
        for port in random.SystemRandom().sample(range(_LOWEST_PORT, low), k=min(64, low - _LOWEST_PORT)):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen | None, timeout_s: float = 20.0) -> None:
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


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path | None = None) -> None:
    """Poll `url` until it answers 200; raise (with the tail of the process's `log`, if given) when the process exits
    first or `timeout_s` runs out."""
    tail = (lambda: "\n" + log.read_text()[-3000:]) if log is not None else (lambda: "")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with code {proc.returncode} before answering{tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s{tail()}")


def torchrun(nproc: int, *target: str, port: int | None = None) -> list[str]:
    """The command that starts ``nproc`` local ranks of ``target`` (``"-m", "pkg.mod", args...`` or a script and its
    arguments) with torchrun on a free loopback port."""
    port = free_port() if port is None else port
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    return [*run, "--master_addr", "127.0.0.1", "--master_port", str(port), *target]


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc (Linux)."""
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            out.setdefault(int(text[text.rindex(")") + 2 :].split()[1]), []).append(int(entry.name))
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send `sig` to `pid` and every process below it (what losing a node does to its launcher and ranks): torchrun
    starts its workers in sessions of their own, so killing the launcher's process group would leave them running.
    The tree is listed before anything is signalled; returns the pids signalled (Linux: reads /proc)."""
    children, tree, i = _children(), [pid], 0
    while i < len(tree):
        tree.extend(children.get(tree[i], []))
        i += 1
    for p in tree:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    return tree
