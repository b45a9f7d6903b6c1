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


class BareTrainer:
    """Model, optimizer and in-memory windows of one bare run; `step()` is one optimizer step."""

    def __init__(self, cfg: RunConfig, micro: int, clip: float):
        from nestor_ds.model import build_model

        t = cfg.train
        self.cfg, self.micro, self.clip = cfg, micro, clip
        if t.threads_per_rank:
            torch.set_num_threads(t.threads_per_rank)
        self.windows = InMemoryWindows(cfg, t.seed)
        torch.manual_seed(derive_seed(t.seed, "init"))  # the trainer's initial weights
        self.model = build_model(cfg.model)
        self.model.train()
        self.optimizer = build_optimizer(build_param_groups({"model": (list(self.model.parameters()), 1.0)}), cfg.optim)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.noise = torch.Generator().manual_seed(derive_seed(t.seed, "noise"))
        self.steps = 0

    def step(self, fraction: float | None) -> torch.Tensor:
        """One step at the schedule's learning rate for `fraction` of the budget spent; returns the loss."""
        cfg = self.cfg
        apply_lr(self.optimizer, lr_at(self.steps, cfg.train.max_steps, cfg.optim, fraction=fraction))
        batch = self.windows.batch(self.micro)
        x = inject_noise(batch["x"], cfg.train.input_noise, self.noise)
        out = self.model(x, batch["channel_mask"])
        loss, _ = training_loss(out.pred.float(), batch["y"], batch["channel_mask"], out.aux_losses, cfg.loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.steps += 1
        return loss.detach()


def train(cfg: RunConfig, micro: int, clip: float) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The loop: until train.time_budget_s of loop time (or train.max_steps) is spent; returns model and summary."""
    bare = BareTrainer(cfg, micro, clip)
    budget, every = cfg.train.time_budget_s, max(1, cfg.train.log_every)
    spent, curve = 0.0, []
    n_traj = sum(len(f) for f in bare.windows.frames)
    print(f"bare loop: {n_traj} trajectories in memory; budget {budget} s", flush=True)
    while bare.steps < cfg.train.max_steps and (budget is None or spent < budget):
        t0 = time.perf_counter()
        loss = bare.step(None if budget is None else spent / budget)
        spent += time.perf_counter() - t0
        if bare.steps % every == 0:
            curve.append((bare.steps, round(spent, 3), float(loss)))
    summary = {"steps": bare.steps, "train_seconds": spent, "samples_per_s": bare.steps * micro / max(spent, 1e-9)}
    summary["loss_curve"] = curve
    summary["final_loss"] = curve[-1][2] if curve else None
    return bare.model, summary


def micro_and_clip(ds_config: str | Path) -> tuple[int, float]:
    """Samples per step (micro-batch x accumulation) and gradient clipping from a DeepSpeed JSON."""
    ds = json.loads(Path(ds_config).read_text())
    micro = int(ds.get("train_micro_batch_size_per_gpu", 1)) * int(ds.get("gradient_accumulation_steps", 1))
    return micro, float(ds.get("gradient_clipping", 0.0))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    micro, clip = micro_and_clip(args.ds_config)
    model, summary = train(cfg, micro, clip)
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
