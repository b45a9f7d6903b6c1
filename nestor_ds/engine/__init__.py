"""The shared training engine: one loop (``trainer.run_training``) behind the pre-training and fine-tune entries.

Set-up (``run_setup.py``), what the loop records (``bookkeeping.py``) and the loop (``trainer.py``); the configs of
its parts beside them, composed in ``run_config.RunConfig``. The engine never imports ``nestor_ds.config`` (which
reads YAML into a ``RunConfig`` for the entries): the package graph has no cycle (docs/ARCHITECTURE.md, "Packages").
"""

from __future__ import annotations

from nestor_ds.engine.report import TrainResult
from nestor_ds.engine.trainer import run_training

__all__ = ["TrainResult", "run_training"]
