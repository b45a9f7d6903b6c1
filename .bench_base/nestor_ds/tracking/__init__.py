"""MLflow tracking (rank 0 only), expert-usage statistics and review figures.

See docs/review_runs.md for the metric names and how to read a run.
"""

from nestor_ds.tracking.expert_stats import ExpertUsage, mutual_information_bits, normalised_entropy
from nestor_ds.tracking.figures import (
    expert_usage_heatmap,
    prediction_panels,
    rollout_error_curve,
    token_expert_heatmap,
)
from nestor_ds.tracking.system import run_environment
from nestor_ds.tracking.tracker import PRETRAIN_RUN_TAG, Tracker, TrackingConfig, flatten

__all__ = [
    "PRETRAIN_RUN_TAG",
    "ExpertUsage",
    "Tracker",
    "TrackingConfig",
    "expert_usage_heatmap",
    "flatten",
    "mutual_information_bits",
    "normalised_entropy",
    "prediction_panels",
    "rollout_error_curve",
    "run_environment",
    "token_expert_heatmap",
]
