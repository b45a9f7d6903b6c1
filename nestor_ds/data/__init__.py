"""Data: shard datasets (built by nestor_ds.shards) -> training stream and evaluation batches.

Imports are lazy (PEP 562): the shard builder and the PDE generator import ``nestor_ds.data.*`` modules in
worker processes and must not pay for torch; the training side imports what it uses on first access.
"""

from .config import DataConfig, DatasetSpec, load_manifest

__all__ = ["DataConfig", "DatasetSpec", "TrainStream", "build_eval_batches", "load_manifest", "read_trajectories"]

_LAZY = {
    "TrainStream": ".stream",
    "build_eval_batches": ".evalset",
    "read_trajectories": "nestor_ds.shards.read",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
