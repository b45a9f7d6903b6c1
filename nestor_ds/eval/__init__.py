"""Evaluation: metrics (per sample and channel, masked) and the evaluation pass over test splits.

from nestor_ds.eval import evaluate_model
report = evaluate_model(model, data_cfg.datasets, data_cfg, rollout_steps=None, batch_size=4)
"""

from __future__ import annotations

from .metrics import SpectrumConfig, energy_spectrum, l2re, l2re_per_step, masked_mean, spectrum_band_error
from .runner import evaluate_model

__all__ = [
    "evaluate_model",
    "SpectrumConfig",
    "l2re",
    "l2re_per_step",
    "masked_mean",
    "energy_spectrum",
    "spectrum_band_error",
]
