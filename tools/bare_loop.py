"""The reference the product is held to: the same model trained by a bare PyTorch loop over in-memory arrays.

    python -m tools.bare_loop --config run.yaml --out /tmp/bare       # -> model.safetensors, summary.json
    python -m nestor_ds.evaluate --checkpoint /tmp/bare/model.safetensors --data <test shard dirs>

Why it exists: at equal wall-clock the product path (shards -> stream -> DeepSpeed engine -> logging) must reach
the L2RE of a plain loop within a few percent (docs/study/cpu32/report.md, "Product vs a bare loop"). This loop
keeps everything that defines the learning problem and shares its code with the product: the model
(`build_model`, initial weights seeded as the trainer seeds them), the loss (`training_loss`, with the aux
weights), input noise, the optimizer groups and learning-rate schedule (`build_optimizer`, `lr_at` following the
spent share of `train.time_budget_s`), gradient clipping (the DeepSpeed JSON's `gradient_clipping`), the
per-dataset normalisation and the dataset mixture weights. It drops everything else: no DeepSpeed, no shards
streamed (each dataset's training trajectories are read once into memory), no checkpoints, no logging inside the
loop. Each sample is a uniformly random training trajectory of a dataset drawn by weight, and a uniformly random
window start in it.

The budget counts the loop's own time (batch assembly, forward, backward, step), as the trainer's does; start-up
and the final export are excluded. The result is an exported safetensors file that `nestor_ds.evaluate` scores
exactly as it scores the product's checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nestor_ds.checkpoint.export import save_safetensors
from nestor_ds.config import RunConfig, load_config
from nestor_ds.data.frames import normalize_, padded_stats, resize_frames, write_frames
from nestor_ds.data.trajectories import DatasetInfo, mapped_trajectories
from nestor_ds.engine.distributed import derive_seed
from nestor_ds.engine.loss import inject_noise, training_loss
from nestor_ds.engine.optim import apply_lr, build_optimizer, build_param_groups, lr_at


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.bare_loop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="run YAML (the same file the product trains from)")
    p.add_argument("--out", required=True, type=Path, help="directory for model.safetensors and summary.json")
    p.add_argument("--ds_config", default="ds_configs/zero0.json", help="micro-batch and gradient clipping from here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (as train.py)")
    return p.parse_args(argv)


class InMemoryWindows:
    """Every training trajectory of every dataset, resized, in memory; batches of uniformly random windows."""

    def __init__(self, cfg: RunConfig, seed: int):
        d = cfg.data
        self.cfg = d
        self.infos = [DatasetInfo.from_spec(i, s) for i, s in enumerate(d.datasets)]
        weights = np.asarray([s.weight for s in d.datasets], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.stats = [padded_stats(info, d.channels) for info in self.infos]
        self.frames: list[list[np.ndarray]] = []  # dataset -> trajectories [T, res, res, c]
        for info in self.infos:
            trajs = []
            for path, count in info.train:
                for traj in mapped_trajectories(path, count, 1, 0, info, lambda: True):
                    trajs.append(np.ascontiguousarray(resize_frames(np.asarray(traj.load()), d.resolution)))
            if not trajs:
                raise ValueError(f"dataset {info.spec.name}: no training trajectories")
            self.frames.append(trajs)
        self.rng = np.random.default_rng([seed, 7])

    def batch(self, size: int) -> dict[str, torch.Tensor]:
        d = self.cfg
        C, length = d.channels, d.t_in + d.t_ar
        x = torch.zeros(size, d.resolution, d.resolution, d.t_in, C)
        y = torch.zeros(size, d.resolution, d.resolution, d.t_ar, C)
        mask = torch.zeros(size, C, dtype=torch.bool)
        mean, std = np.zeros((size, C), np.float32), np.ones((size, C), np.float32)
        for b, k in enumerate(self.rng.choice(len(self.frames), size=size, p=self.probs)):
            trajs = self.frames[k]
            frames = trajs[int(self.rng.integers(len(trajs)))]
            t0 = int(self.rng.integers(frames.shape[0] - length + 1))
            write_frames(x.numpy()[b], frames[t0 : t0 + d.t_in])
            write_frames(y.numpy()[b], frames[t0 + d.t_in : t0 + length])
            mask[b, : frames.shape[3]] = True
            mean[b], std[b] = self.stats[k]
        if d.normalize:
            normalize_(x, mean, std)
            normalize_(y, mean, std)
        return {"x": x, "y": y, "channel_mask": mask}


def train(cfg: RunConfig, micro: int, clip: float) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The loop: until train.time_budget_s of loop time (or train.max_steps) is spent; returns model and summary."""
    from nestor_ds.model import build_model

    t = cfg.train
    if t.threads_per_rank:
        torch.set_num_threads(t.threads_per_rank)
    windows = InMemoryWindows(cfg, t.seed)
    torch.manual_seed(derive_seed(t.seed, "init"))  # the trainer's initial weights
    model = build_model(cfg.model)
    model.train()
    optimizer = build_optimizer(build_param_groups({"model": (list(model.parameters()), 1.0)}), cfg.optim)
    params = [p for p in model.parameters() if p.requires_grad]
    budget = t.time_budget_s
    spent, step, curve = 0.0, 0, []
    noise = torch.Generator().manual_seed(derive_seed(t.seed, "noise"))
    print(f"bare loop: {sum(len(f) for f in windows.frames)} trajectories in memory; budget {budget} s", flush=True)
    while step < t.max_steps and (budget is None or spent < budget):
        t0 = time.perf_counter()
        apply_lr(optimizer, lr_at(step, t.max_steps, cfg.optim, fraction=None if budget is None else spent / budget))
        batch = windows.batch(micro)
        x = inject_noise(batch["x"], t.input_noise, noise)
        out = model(x, batch["channel_mask"])
        loss, _ = training_loss(out.pred.float(), batch["y"], batch["channel_mask"], out.aux_losses, cfg.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        step += 1
        spent += time.perf_counter() - t0
        if step % max(1, t.log_every) == 0:
            curve.append((step, round(spent, 3), float(loss)))
    summary = {"steps": step, "train_seconds": spent, "samples_per_s": step * micro / max(spent, 1e-9)}
    summary["loss_curve"] = curve
    summary["final_loss"] = curve[-1][2] if curve else None
    return model, summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    ds = json.loads(Path(args.ds_config).read_text())
    micro = int(ds.get("train_micro_batch_size_per_gpu", 1)) * int(ds.get("gradient_accumulation_steps", 1))
    model, summary = train(cfg, micro, float(ds.get("gradient_clipping", 0.0)))
    args.out.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), cfg.to_dict(), args.out / "model.safetensors", source="tools.bare_loop")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"bare loop: {summary['steps']} steps in {summary['train_seconds']:.0f} s "
        f"({summary['samples_per_s']:.1f} samples/s) -> {args.out / 'model.safetensors'}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
