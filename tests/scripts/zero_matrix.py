"""Train several configurations in ONE launch (one process group) on the same global batches, and record per case
the losses of every step and the trained model's prediction on a probe batch: the ZeRO x routing x ep_size x model
matrix of tests/test_zero_matrix.py, compared between 1 rank and 2 ranks with the same global batch.

Each case names a run config, a shipped DeepSpeed JSON (``ds_configs/<ds>.json``, its micro-batch set to
global batch / world size) and ``--set`` overrides. Cases run one after another through the real
``run_training`` (the product's engine set-up, loop and save), each with its own run directory; ZeRO-3 cases go
last, as ZeRO-3 patches modules for parameter gathering. Rank 0 writes ``<out>/matrix.json``:
``{case: {"losses": [...], "pred": [...]}}``.

    torchrun --nproc_per_node 2 -m tests.scripts.zero_matrix --cases cases.json --global-batch 4 --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from nestor_ds.cli import run_cli
from nestor_ds.config import load_config
from nestor_ds.data import TrainStream
from nestor_ds.engine import run_training
from nestor_ds.engine.distributed import init_distributed
from nestor_ds.model.image_moe import ImageMoE
from tests.scripts.probe_train import global_batch_source

REPO = Path(__file__).resolve().parents[2]


def write_ds_config(name: str, micro: int, out: Path) -> Path:
    """The shipped ``ds_configs/<name>.json`` with this world's micro-batch."""
    ds = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = micro
    path = out / f"{name}_m{micro}_rank{dist.get_rank()}.json"  # one file per rank: no rank reads another's write
    path.write_text(json.dumps(ds))
    return path


def run_case(case: dict, global_batch: int, out: Path) -> dict:
    """Train one case; its losses, the trained model's prediction on the first global batch (every rank predicts the
    whole batch, so the prediction does not depend on how samples were split), and whether the ranks' samples chose
    different image experts at some training step (what made ZeRO-1/2 abort before the lock-step)."""
    world = dist.get_world_size()
    cfg = load_config(case["config"], case.get("set", []))
    ds_path = write_ds_config(case["ds"], global_batch // world, out)
    used: list[torch.Tensor] = []  # per training call of each ImageMoE: which experts this rank's samples chose

    def record_routing(model: torch.nn.Module, *_: object) -> dict:
        for m in model.modules():
            if isinstance(m, ImageMoE):
                m.register_forward_hook(
                    lambda mod, _a, o: used.append(o.routing.image_counts > 0) if mod.training else None
                )
        return {"model": (list(model.parameters()), 1.0)}

    result = run_training(
        cfg,
        str(ds_path),
        run_name=f"{case['name']}-w{world}",
        batch_source=global_batch_source(cfg, global_batch),
        prepare=record_routing,
    )
    probe = next(TrainStream(cfg.data, micro_batch=global_batch, rank=0, world_size=1, seed=cfg.train.seed).batches(0))
    with torch.no_grad():
        model = result.model.eval()
        dtype = next(model.parameters()).dtype  # bf16 configs: inputs follow the weights, as in training
        pred = model(probe["x"].to(dtype), probe["channel_mask"]).pred
    mine = torch.stack(used).long() if used else torch.zeros(1, 1, dtype=torch.long)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    experts_differ = any(not torch.equal(everyone[0], other) for other in everyone[1:])
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "losses": result.losses,
        "grad_norms": [r["train/grad_norm"] for r in rows],
        "pred": pred.float().flatten().tolist(),
        "experts_differ": experts_differ,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", required=True, help="JSON list of {name, config, ds, set}")
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the DeepSpeed launcher adds it
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init_distributed()  # as the engine starts it (a world of one without a launcher)
    cases = sorted(json.loads(Path(args.cases).read_text()), key=lambda c: c["ds"].startswith("zero3"))
    results = {c["name"]: run_case(c, args.global_batch, out) for c in cases}
    if dist.get_rank() == 0:
        (out / "matrix.json").write_text(json.dumps(results))


if __name__ == "__main__":
    run_cli(main)  # as the entries end: process group destroyed, no native exit-time teardown (nestor_ds/cli.py)
