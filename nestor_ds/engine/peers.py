"""Lost-peer detection: a heartbeat through the rendezvous store, and one line naming the peer that went away.

Why a module of its own: a multi-node run fails in a collective when a peer dies or freezes, and the error torch
raises names no peer. ``init_distributed`` (``distributed.py``) starts the heartbeat once the process group is up;
the trainer wraps its loop in :func:`exit_on_lost_peer`. This module imports nothing from ``distributed.py``: it is
given the rank, the world size and a description of this rank instead.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch


def start_heartbeat(rank: int, world: int, where: str) -> None:
    """Start this rank's heartbeat (several ranks only); ``where`` describes the rank ("host h node 1 pid 123")."""
    _Heartbeat.start(rank, world, where)


class _Heartbeat:
    """Each rank bumps a counter in the rendezvous store every ``INTERVAL_S`` from a daemon thread (its own store
    connection; gloo and NCCL waits release the GIL, so a rank blocked in a collective keeps beating).

    After a failed collective, the ranks whose counter stopped and that did not report giving up themselves are the
    lost ones; when the store itself is gone, the lost node is the first one (it hosts the store under torchrun and
    the DeepSpeed launcher alike). Cost: one small store request per rank per interval."""

    INTERVAL_S = 2.0
    PREFIX = "nestor/peers/"
    store: Any = None
    thread: threading.Thread | None = None
    stopping = threading.Event()
    rank = 0
    world = 1

    @classmethod
    def start(cls, rank: int, world: int, where: str) -> None:
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
        if cls.store is not None or not addr or not port.isdigit():
            return
        try:
            store = torch.distributed.TCPStore(
                addr, int(port), is_master=False, timeout=timedelta(seconds=30), wait_for_workers=False
            )
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            cls.store = torch.distributed.PrefixStore(f"{cls.PREFIX}{attempt}/", store)
            cls.store.set(f"where/{rank}", where)
        except (RuntimeError, ValueError):  # no store to reach (a plain process): nothing to name peers with
            cls.store = None
            return
        cls.rank, cls.world = rank, world
        cls.thread = threading.Thread(target=cls._beat, daemon=True, name="nestor-heartbeat")
        cls.thread.start()
        atexit.register(cls.stop)

    @classmethod
    def _beat(cls) -> None:
        while not cls.stopping.is_set():
            try:
                cls.store.add(f"beat/{cls.rank}", 1)
            except Exception:  # noqa: BLE001 - the store is gone (its node died): the checker says so
                return
            cls.stopping.wait(cls.INTERVAL_S)

    @classmethod
    def stop(cls) -> None:
        """Join the thread before the interpreter tears down: a daemon thread inside a C++ store call at exit ends
        the process with "terminate called without an active exception" (seen on a 2 x 2 run)."""
        cls.stopping.set()
        if cls.thread is not None:
            cls.thread.join(timeout=35)

    @classmethod
    def lost_peers(cls) -> str:
        """Who went away, in words ("rank 1 (host h node 1 pid 123)"), or why it is not known."""
        if cls.store is None:
            return "unknown (no rendezvous store)"
        try:
            cls.store.set_timeout(timedelta(seconds=5))
            cls.store.set(f"gave_up/{cls.rank}", "1")
            others = [r for r in range(cls.world) if r != cls.rank]
            before = {r: cls.store.add(f"beat/{r}", 0) for r in others}
            time.sleep(2.5 * cls.INTERVAL_S)
            lost = [
                r
                for r in others
                if cls.store.add(f"beat/{r}", 0) == before[r] and not cls.store.check([f"gave_up/{r}"])
            ]
            where = {r: cls.store.get(f"where/{r}").decode() for r in lost}
        except Exception:  # noqa: BLE001 - the store died with its host
            addr = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            return f"the first node (it hosted the rendezvous store at {addr}, now unreachable)"
        if not lost:
            return "unknown (every other rank is still alive: a network fault or a failed peer process?)"
        return ", ".join(f"rank {r} ({where[r]})" for r in lost)


LOST_PEER_EXIT = 3  # the exit status of a rank that stopped because a peer went away


@contextmanager
def exit_on_lost_peer(rank: int, world_size: int, ckpt_root: Path | None = None) -> Iterator[None]:
    """Turn a failed collective (a peer died or froze past ``train.collective_timeout_s``) into one line naming the
    lost peer and exit status 3, with no traceback.

    Why SystemExit: the interpreter still runs its exit handlers, so rank 0 marks the MLflow run FAILED, and no
    checkpoint is written on the way out (a save is a collective; a tag only becomes complete after every rank's
    files are written, so an interrupted save is never taken for a complete one)."""
    try:
        yield
    except RuntimeError as err:  # torch.distributed.DistError and gloo's plain RuntimeErrors
        if world_size == 1 or not _is_peer_failure(err):
            raise
        cause = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        newest = ""
        if ckpt_root is not None:
            from nestor_ds.checkpoint.save_resume import complete_tags

            tags = complete_tags(ckpt_root)
            newest = f"; newest complete checkpoint: {tags[-1].name}" if tags else "; no complete checkpoint yet"
        print(
            f"error: rank {rank}: lost peer {_Heartbeat.lost_peers()} during a collective ({cause}); "
            f"stopping{newest}; restart every node with --resume auto",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(LOST_PEER_EXIT) from None


def _is_peer_failure(err: BaseException) -> bool:
    """A collective that failed because of a peer: torch's DistError family, or gloo/NCCL errors raised as plain
    RuntimeErrors (connection closed or reset by peer, timed out waiting)."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    text = str(err).lower()
    marks = ("connection closed by peer", "connection reset by peer", "timed out", "timeout", "gloo", "nccl")
    return any(m in text for m in marks)
