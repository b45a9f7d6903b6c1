"""What a run shows and leaves besides metrics: the rank-0 progress bar, ``run_summary.json`` and the result an entry
reads."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nestor_ds.engine.budget import Budget
from nestor_ds.engine.run_config import RunConfig


@dataclass
class TrainResult:
    """What an entry and the tests read after a run."""

    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # all-reduced loss per optimizer step, this process's run
    final_eval: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    preempted: bool = False
    model: torch.nn.Module | None = None  # the trained module (this rank's experts under expert parallelism)


class Progress:
    """Rank-0 progress bar (step, loss, samples/s, ETA); other ranks stay quiet."""

    def __init__(self, enabled: bool, start: int, total: int | None, name: str) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=start, desc=name, unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=1.0
            )

    def update(self, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{metrics['train/loss']:.4f}",
                l2=f"{metrics['train/rel_l2']:.4f}",
                sps=f"{metrics.get('perf/samples_per_s', 0):.1f}",
                refresh=False,
            )
            self.bar.update(1)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"[nestor-ds] {text}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_summary(
    path: Path, cfg: RunConfig, step: int, stats: dict[str, Any], budget: Budget, final_eval: dict[str, Any], usage: Any
) -> None:
    """run_summary.json beside metrics.jsonl: what a finished run reached and cost (read by tools/study.py)."""
    summary = {
        "steps": step,
        "model_stats": stats,
        **budget.metrics(step),
        "final_eval": final_eval,
        "expert_usage": usage.summary([d.name for d in cfg.data.datasets]),
    }
    path.write_text(json.dumps(summary, indent=1))


USAGE_LOG = "expert_usage.jsonl"  # one row per usage record (train.usage_every, evaluations, end of run)


def append_usage_row(path: Path, cfg: RunConfig, step: int, budget: Budget, usage: Any) -> None:
    """A row of expert_usage.jsonl: the step, the budget spent (budgeted runs) and, per block, the dataset x
    image-expert counts of the steps since the previous row and their mutual information (read by tools/study.py)."""
    spent = budget.metrics(step) if budget.active else {}  # budgeted runs: training seconds and FLOPs so far
    row = {"step": step, **spent, "blocks": usage.summary([d.name for d in cfg.data.datasets])}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
