"""Train with the real engine on one global batch sequence, however many ranks, and record what tests compare.

The global batch of each step is drawn by the real shard stream as if there were one rank, then each rank takes
its contiguous slice: 1 rank x micro G and 2 ranks x micro G/2 see exactly the same samples per step.
Writes ``<out>/losses.json`` and (rank 0) ``<out>/probe.pt``: the probe input and the trained model's output on it.

    torchrun --nproc_per_node 2 -m tests.scripts.probe_train --config C.yaml --ds_config D.json \
        --global-batch 4 --out DIR
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from nestor_ds.cli import run_cli
from nestor_ds.config import RunConfig, load_config
from nestor_ds.data import TrainStream
from nestor_ds.engine import run_training


def global_batch_source(cfg: RunConfig, global_batch: int) -> Callable[[int], Iterator[dict[str, torch.Tensor]]]:
    """A ``batch_source`` for run_training: the stream's batches of ``global_batch`` samples drawn as if there were
    one rank, this rank's contiguous slice of each (call it after the process group exists)."""

    def batches(start: int) -> Iterator[dict[str, torch.Tensor]]:
        rank, world = dist.get_rank(), dist.get_world_size()
        per = global_batch // world
        stream = TrainStream(cfg.data, micro_batch=global_batch, rank=0, world_size=1, seed=cfg.train.seed)
        for batch in stream.batches(start):
            yield {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}

    return batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--ds_config", required=True)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--run-name", default="probe")
    p.add_argument("--resume", default=None, help="as train.py's --resume (auto or a checkpoint path)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    global_batches = global_batch_source(cfg, args.global_batch)
    result = run_training(
        cfg, args.ds_config, entry="pretrain", run_name=args.run_name, resume=args.resume, batch_source=global_batches
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    probe = next(global_batches(0))
    model = result.model.eval()
    with torch.no_grad():
        pred = model(probe["x"], probe["channel_mask"]).pred.contiguous()
    gathered = [torch.empty_like(pred) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, pred)
    full = next(
        TrainStream(cfg.data, micro_batch=args.global_batch, rank=0, world_size=1, seed=cfg.train.seed).batches(0)
    )
    if dist.get_rank() == 0:
        (out / "losses.json").write_text(json.dumps(result.losses))
        torch.save(
            {"x": full["x"], "channel_mask": full["channel_mask"], "pred": torch.cat(gathered)}, out / "probe.pt"
        )


if __name__ == "__main__":
    run_cli(main)  # as the entries end: process group destroyed, no native exit-time teardown (nestor_ds/cli.py)
