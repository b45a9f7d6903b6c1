"""Runs that several test files read, made once per test session, also across xdist workers (.ci/run).

The first worker to ask builds the run under the session's directory while holding its lock; the others wait on the
lock and reuse it. A test that changes a shared run's files copies them first. A build that raises leaves no marker,
so the next worker to ask tries again; a run that failed is shared as it ended (its exit status and output are part of
what was built), so every test that reads it fails with its message."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

DONE = ".built"


def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's temporary directory: above each xdist worker's own (``popen-gwN``), else pytest's base."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``<session>/shared/<name>``, filled by ``build(dir)`` exactly once per session."""
    root = session_dir(tmp_path_factory) / "shared"
    root.mkdir(parents=True, exist_ok=True)
    out = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (out / DONE).is_file():
            shutil.rmtree(out, ignore_errors=True)  # an earlier worker's failed attempt
            out.mkdir()
            build(out)
            (out / DONE).touch()
    return out
