"""Data: shard datasets (built by nestor_ds.shards) -> training stream and evaluation batches.

Imports are plain: the shard builder and the PDE generator live in ``nestor_ds.shards`` and ``nestor_ds.synth``,
which never import this package, so their worker processes do not pay for torch.
"""

from nestor_ds.shards.read import read_trajectories

from .config import DataConfig, DatasetSpec, load_manifest
from .evalset import build_eval_batches
from .stream import TrainStream

__all__ = ["DataConfig", "DatasetSpec", "TrainStream", "build_eval_batches", "load_manifest", "read_trajectories"]
