"""The study report's PNG figures (tools/study_report.py): L2RE against cost, error growth over a rollout, the
dataset x image-expert heat map and specialisation over training.

Why its own module: the figures need matplotlib (headless) and the arithmetic of error bars (``mean_std``); the
report's tables and text stay readable without them.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from nestor_ds.tracking.expert_stats import mutual_information_bits

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def figure_vs_cost(groups, path: Path, x_of: str) -> None:
    """Mean test one-step and rollout L2RE against wall-clock budget or training FLOPs, one line per model."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    models = sorted({m for m, _ in groups})
    for m in models:
        pts = [(b, ts) for (mm, b), ts in groups.items() if mm == m]
        for ax, key in zip(axes, ("l2re_1step", "l2re_rollout")):
            xs = [b if x_of == "budget" else statistics.fmean(t.get("train_flops") or 0 for t in ts) for b, ts in pts]
            ms = [mean_std([t["test"]["mean"][key] for t in ts]) for _, ts in pts]
            ax.errorbar(xs, [v for v, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3, label=m)
            ax.set_xlabel("training wall-clock budget (s)" if x_of == "budget" else "training FLOPs")
            ax.set_ylabel(f"test {key} (mean over datasets)")
            if x_of == "flops":
                ax.set_xscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_rollout_growth(groups, path: Path) -> None:
    """L2RE at each rollout step at the largest budget (mean over datasets and seeds)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    top = max(b for _, b in groups)
    for (m, b), ts in groups.items():
        if b != top:
            continue
        curves = [
            [
                statistics.fmean(ds["l2re_curve"][k] for ds in t["test"]["datasets"].values())
                for k in range(len(next(iter(t["test"]["datasets"].values()))["l2re_curve"]))
            ]
            for t in ts
        ]
        mean = [statistics.fmean(c[k] for c in curves) for k in range(len(curves[0]))]
        ax.plot(range(1, len(mean) + 1), mean, marker="o", label=m)
    ax.set_xlabel("rollout step")
    ax.set_ylabel("test L2RE at the step")
    ax.set_title(f"error growth, budget {top:.0f} s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_heatmap(trial: dict[str, Any], path: Path) -> bool:
    """Dataset x image-expert shares of block 0 at the end of training (one NESTOR trial)."""
    usage = trial.get("expert_usage") or {}
    if not usage:
        return False
    block = sorted(usage)[0]
    counts = usage[block]["dataset_expert"]
    names = usage[block].get("datasets") or [str(i) for i in range(len(counts))]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    rows = [[c / max(1, sum(r)) for c in r] for r in counts]
    im = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("image expert")
    ax.set_title(f"{trial['id']}: block {block}, MI {usage[block].get('mi_bits', float('nan')):.3f} bits")
    fig.colorbar(im, ax=ax, label="share of the dataset's samples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def specialisation_over_training(trials: list[dict[str, Any]], path: Path) -> list[str]:
    """Mutual information between dataset and image expert over training (trials with a usage curve: the trainer's
    ``train.usage_every`` records): a figure, one line per trial and block, and a sentence with first, middle and
    last records. Empty when no trial has a curve."""
    curves = [t for t in trials if len(t.get("usage_curve") or []) > 1]
    if not curves:
        return []
    fig, ax = plt.subplots(figsize=(6, 3.8))
    said = []
    for t in curves:
        rows = t["usage_curve"]
        for block in sorted(rows[-1]["mi_bits"]):
            pts = [(r["seconds"], r["mi_bits"][block]) for r in rows if block in r["mi_bits"]]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=".", label=f"{t['id']} block {block}")
            mid = pts[len(pts) // 2]
            pooled = [r["dataset_expert"][block] for r in rows if block in r.get("dataset_expert", {})]
            whole = f"; pooled over the run {mutual_information_bits(np.sum(pooled, axis=0)):.3f}" if pooled else ""
            said.append(
                f"{t['id']} block {block}: {pts[0][1]:.3f} at {pts[0][0]:.0f} s, {mid[1]:.3f} at {mid[0]:.0f} s, "
                f"{pts[-1][1]:.3f} at {pts[-1][0]:.0f} s{whole}"
            )
    ax.set_xlabel("training seconds")
    ax.set_ylabel("I(dataset; image expert), bits")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    every = max(r["step"] - q["step"] for t in curves for q, r in zip(t["usage_curve"], t["usage_curve"][1:]))
    return [
        "### Over training",
        "",
        f"Each point is the routing of the steps since the previous record (every {every} steps, "
        "`train.usage_every`; the last record ends with the run); 'pooled' is the MI of all records' counts summed, "
        "which is lower than the records' when the dataset-to-expert mapping drifts over training: "
        + "; ".join(said)
        + ".",
        "",
        f"![specialisation over training]({path.name})",
        "",
    ]
