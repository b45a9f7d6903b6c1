"""``probe_train.py`` as one "node" of a multi-node test: also records which training samples this rank's real stream
reads, and can slow the steps down so that a test can kill a node in mid-run.

    torchrun --nnodes 2 --node_rank I --nproc_per_node R --master_addr 127.0.0.1 --master_port P \
        tests/scripts/node_probe.py --config C.yaml --ds_config D.json --global-batch 4 --out DIR

Environment (both optional): ``NODE_PROBE_SHARES=DIR`` writes ``DIR/rank<r>.json``, the (dataset, shard, sample
position) triples that rank r's own ``TrainStream`` share holds in epoch 0 (``_WindowSource.share``, the real
split by rank and worker); ``NODE_PROBE_SLOW=K:S`` sleeps S seconds before every batch from position K on, in the
first attempt only (a test kills it in mid-step; an attempt restarted by torchrun's agent, TORCHELASTIC_RESTART_COUNT
>= 1, runs at full speed).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script by the launchers

from nestor_ds.cli import run_cli  # noqa: E402
from nestor_ds.config import RunConfig  # noqa: E402
from nestor_ds.data import stream as stream_mod  # noqa: E402
from tests.scripts import probe_train  # noqa: E402

Batches = Callable[[int], Iterator[dict[str, torch.Tensor]]]


def record_shares(cfg: RunConfig, out: Path) -> None:
    """This rank's epoch-0 share of every dataset, as the real stream computes it for its rank and world size."""
    shares: list[tuple[str, str, int]] = []
    original = stream_mod._WindowSource.__init__

    def spy(self, info, *args, **kwargs):  # noqa: ANN001 - the stream's own signature
        original(self, info, *args, **kwargs)
        for shard, mod, res in self.share:
            location, count = info.train[shard]
            shares.extend((info.spec.name, str(location), p) for p in range(res, count, mod))

    stream_mod._WindowSource.__init__ = spy
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        stream = stream_mod.TrainStream(cfg.data, micro_batch=1, rank=rank, world_size=world, seed=cfg.train.seed)
        epoch = stream_mod._EpochStream(stream, 0, 0, stream.n_workers)  # the epoch-0 stream of logical worker 0
        for d in range(len(stream.infos)):  # sources are built lazily, on a dataset's first draw: build them all
            epoch._source(d)
    finally:
        stream_mod._WindowSource.__init__ = original
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(sorted(set(shares))))


def main() -> None:
    source = probe_train.global_batch_source
    shares_dir = os.environ.get("NODE_PROBE_SHARES")
    slow_from, _, slow_s = os.environ.get("NODE_PROBE_SLOW", "").partition(":")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        slow_s = ""  # a restarted attempt: nothing left to kill in mid-step

    def wrapped(cfg: RunConfig, global_batch: int) -> Batches:
        inner = source(cfg, global_batch)

        def batches(start: int) -> Iterator[dict[str, torch.Tensor]]:
            if shares_dir:
                record_shares(cfg, Path(shares_dir))
            for position, batch in enumerate(inner(start), start):
                if slow_s and position >= int(slow_from):
                    time.sleep(float(slow_s))
                yield batch

        return batches

    probe_train.global_batch_source = wrapped
    # the DeepSpeed launcher appends --local_rank=N (the entries accept it; probe_train.py does not)
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    probe_train.main()


if __name__ == "__main__":
    run_cli(main)  # as the entries end (nestor_ds/cli.py)
