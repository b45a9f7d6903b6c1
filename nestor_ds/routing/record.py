"""Recording a trained model's routing on the micro-batches its training stream gives each data-parallel rank.

Why on the training stream: the counts expert parallelism pays for are those of training, which a synthetic benchmark
input can only guess. The model runs in evaluation mode (dropless routing: the counts training records) on the
micro-batches `ranks` ranks would draw (`TrainStream(rank=p, world_size=ranks)`), and each block's image and token
counts are read from `ModelOutput.routing`. No GPU and no process group are needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from nestor_ds.errors import UserError
from nestor_ds.routing.replay import Calls


def record(model: Any, data_cfg: Any, micro_batch: int, ranks: int, steps: int, seed: int) -> Calls:
    """Run `model` on `steps` micro-batches of each of `ranks` training streams; collect the routing counts."""
    import torch

    from nestor_ds.data.stream import TrainStream

    streams = [TrainStream(data_cfg, micro_batch, rank=p, world_size=ranks, seed=seed).batches() for p in range(ranks)]
    image, token = [], []
    with torch.no_grad():
        for step in range(steps):
            per_rank_image, per_rank_token = [], []
            for stream in streams:
                batch = next(stream)
                out = model(batch["x"], batch["channel_mask"])
                if not out.routing:
                    raise UserError("the model has no image MoE (an AFNO baseline?): nothing to profile")
                per_rank_image.append(torch.stack([r.image_counts for r in out.routing]).numpy())
                per_rank_token.append(torch.stack([r.token_counts for r in out.routing]).numpy())
            image.append(per_rank_image)
            token.append(per_rank_token)
            print(f"recording routing: step {step + 1}/{steps}", file=sys.stderr, flush=True)
    return Calls(np.asarray(image), np.asarray(token))


def stream_config(model: Any, checkpoint: str | Path, data_dirs: list[str] | None) -> Any:
    """The DataConfig of `model`'s training stream, read in this process: `data_dirs` (the user's own command line),
    else the datasets saved in the checkpoint's run config.

    Saved datasets are SavedDatasetSpecs: a checkpoint or export may be someone else's file, so a saved `pipe:`
    command or URL is refused with one line naming --data when the stream opens it, and only local shard
    directories that exist here are read (`nestor_ds.data.config.check_saved`)."""
    from nestor_ds.data import DataConfig, DatasetSpec
    from nestor_ds.data.config import saved_dataset_specs

    settings = {k: v for k, v in (model.run_config.get("data") or {}).items() if k != "datasets"}
    if data_dirs:
        datasets = [DatasetSpec(name=Path(d).name, path=d) for d in data_dirs]
    else:
        datasets = saved_dataset_specs(model.run_config, str(checkpoint))
    if not datasets:
        raise UserError(f"{checkpoint}: its run config names no training data; pass --data SHARD_DIR ...")
    data_cfg = DataConfig.from_dict({**settings, "num_workers": 0})  # in this process: no loader workers
    data_cfg.datasets = datasets
    cfg = model.cfg
    data_cfg.t_in, data_cfg.resolution, data_cfg.channels = cfg.t_in, cfg.resolution, cfg.in_channels
    return data_cfg


def add_recording_arguments(p: argparse.ArgumentParser, ranks_default: str) -> None:
    """The options of a command that runs a model on its training stream (`record`): model, data, batches, --json."""
    p.add_argument("--checkpoint", required=True, help="exported .safetensors, a checkpoint root or a tag directory")
    p.add_argument(
        "--data",
        nargs="+",
        default=None,
        metavar="SHARD_DIR",
        help="default: the run's training data, if saved as local shard directories (a saved URL or pipe: is refused)",
    )
    p.add_argument("--micro-batch", type=int, default=32, help="samples per rank and step (default 32)")
    p.add_argument(
        "--ranks", type=int, default=None, help=f"data-parallel ranks to draw batches for (default {ranks_default})"
    )
    p.add_argument("--steps", type=int, default=32, help="steps to record (default 32)")
    p.add_argument("--seed", type=int, default=0, help="the training stream's seed (default 0)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
