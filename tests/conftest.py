"""Shared fixtures: tiny real PDE shards built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
# entries and tools run as modules (`python -m nestor_ds.train`) from the tests' temporary directories
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """(root, {name: shard dir}) of two tiny datasets with different channel counts (1 and 2)."""
    from train_fixtures import build_tiny_shards

    root = tmp_path_factory.mktemp("tiny_data")
    return root, build_tiny_shards(root)


_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_launcher_env_leaks():
    """Tests that build a DeepSpeed engine in the pytest process (a world of one) set the launcher variables; they
    must not outlive the test: a later subprocess or spawned worker would inherit MASTER_PORT, whose port this
    process still holds, and RANK/WORLD_SIZE of a world it is not part of. (The process group itself stays up:
    DeepSpeed keeps its groups in module state for the rest of the session.)"""
    saved = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
