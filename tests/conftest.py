"""Shared fixtures: tiny real PDE shards built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """(root, {name: shard dir}) of two tiny datasets with different channel counts (1 and 2)."""
    from train_fixtures import build_tiny_shards

    root = tmp_path_factory.mktemp("tiny_data")
    return root, build_tiny_shards(root)
