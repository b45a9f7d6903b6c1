"""Data: shard datasets (built by tools/build_shards.py) -> training stream and evaluation batches."""

from .config import DataConfig, DatasetSpec, load_manifest
from .evalset import build_eval_batches
from .stream import TrainStream, build_train_stream

__all__ = ["DataConfig", "DatasetSpec", "TrainStream", "build_eval_batches", "build_train_stream",
           "load_manifest", "read_trajectories"]


def __getattr__(name: str):
    # read.py belongs to the shard builder; imported on first use so that the loader does not pull in
    # the raw-format readers (h5py, scipy) when only streaming shards.
    if name == "read_trajectories":
        from .read import read_trajectories
        return read_trajectories
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
