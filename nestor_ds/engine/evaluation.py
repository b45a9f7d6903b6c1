"""Evaluation during and at the end of training: L2RE per dataset on the test splits, logged to MLflow."""

from __future__ import annotations

from typing import Any

from nestor_ds.engine.compile import CompilePlan, eager_for_evaluation
from nestor_ds.engine.distributed import DistInfo
from nestor_ds.engine.run_config import RunConfig
from nestor_ds.log import get_logger

log = get_logger(__name__)


def evaluate(
    engine: Any,
    cfg: RunConfig,
    dist_info: DistInfo,
    tracker: Any,
    step: int,
    prefix: str = "eval",
    usage: Any = None,
    figures: bool = False,
) -> dict[str, Any]:
    """One-step and short-rollout L2RE per dataset on the test split, logged to MLflow.

    Each rank scores a disjoint share of the test trajectories and the sums are all-reduced, so every rank gets
    the report one process would; under expert parallelism the ranks run their forward passes in lock-step
    (`nestor_ds.eval.runner`), since each one is a collective.
    """
    from nestor_ds.eval import evaluate_model

    model = engine.module
    was_training = model.training
    model.eval()
    report = evaluate_model(
        model,
        cfg.data,
        rollout_steps=cfg.train.eval_rollout_steps,
        batch_size=cfg.train.eval_batch_size,
        max_trajectories=cfg.train.eval_max_trajectories,
        device=engine.device,
        progress=dist_info.is_main,
        dtype=next(model.parameters()).dtype,
        windows=cfg.train.eval_windows,
    )
    metrics = {}
    for name, ds in report.get("datasets", {}).items():
        metrics[f"{prefix}/{name}/l2re_1step"] = ds["l2re_1step"]
        if ds.get("l2re_rollout") is not None:
            metrics[f"{prefix}/{name}/l2re_rollout"] = ds["l2re_rollout"]
    tracker.log_metrics(metrics, step=step)
    if dist_info.is_main:
        scores = (f"{k.split('/')[1]}={v:.4f}" for k, v in metrics.items() if k.endswith("l2re_1step"))
        log.info("step %d %s: %s", step, prefix, "  ".join(scores))
    if figures and cfg.tracking.figure_every_eval:
        from nestor_ds.tracking.report_figures import log_eval_figures

        log_eval_figures(tracker, model, cfg, report, usage, engine.device, step)
    tracker.log_dict(report, f"{prefix}_step{step:08d}.json")
    model.train(was_training)
    return report


def evaluate_eager(plan: CompilePlan, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate` with compiled regions run eagerly (evaluation routes dropless, other batch sizes)."""
    with eager_for_evaluation(plan):
        return evaluate(*args, **kwargs)
