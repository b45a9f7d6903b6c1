"""The figures logged at each evaluation: predictions, expert usage, rollout curves (rank 0 draws them).

Glue between an evaluation report, the routing counts and ``figures.py``; drawing code stays in ``figures.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from nestor_ds.tracking import figures


@torch.no_grad()
def log_eval_figures(
    tracker: Any, model: torch.nn.Module, cfg: Any, report: dict[str, Any], usage: Any, device: torch.device, step: int
) -> None:
    """Prediction/truth/error panels of the first test trajectory of each dataset, the dataset x image-expert
    heat map and token-expert heat map per block, and the rollout error curves.

    Every rank must call this (the prediction forward passes are collectives under expert parallelism);
    only rank 0's tracker writes.
    """
    from nestor_ds.data import build_eval_batches

    was_training = model.training
    model.eval()
    for ds_id, spec in enumerate(cfg.data.datasets):
        batch = next(iter(build_eval_batches(spec, cfg.data, ds_id, 1, 1)), None)
        if batch is None:
            continue
        mask = batch["channel_mask"].to(device)
        pred = model(batch["x"].to(device, dtype=next(model.parameters()).dtype), mask).pred.float().cpu()
        channels = report.get("datasets", {}).get(spec.name, {}).get("channels") or [
            f"c{i}" for i in range(int(mask.sum()))
        ]
        n = len(channels)
        fig = figures.prediction_panels(
            pred[0, :, :, 0, :n],
            batch["y"][0, :, :, 0, :n],
            channels,
            title=f"{spec.name}: one-step prediction, step {step}",
        )
        tracker.log_figure(fig, f"predictions/{spec.name}_step{step:08d}.png")
    model.train(was_training)

    curves = {name: ds["l2re_curve"] for name, ds in report.get("datasets", {}).items() if ds.get("l2re_curve")}
    if curves:
        fig = figures.rollout_error_curve(curves, title=f"rollout L2RE per step (step {step})")
        tracker.log_figure(fig, f"rollout/rollout_error_step{step:08d}.png")

    if usage is not None:
        names = [d.name for d in cfg.data.datasets]
        for block in sorted(getattr(usage, "blocks", {})):
            counts = usage.counts_matrix(block)
            fig = figures.expert_usage_heatmap(
                counts,
                names,
                [f"E{i}" for i in range(counts.shape[1])],
                title=f"block {block}: samples per image expert",
            )
            tracker.log_figure(fig, f"experts/block{block}_image_experts_step{step:08d}.png")
            fig = figures.token_expert_heatmap(
                usage.token_counts(block), title=f"block {block}: tokens per token expert"
            )
            tracker.log_figure(fig, f"experts/block{block}_token_experts_step{step:08d}.png")
