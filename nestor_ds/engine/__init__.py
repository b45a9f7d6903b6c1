"""The shared training engine: one loop (``trainer.run_training``) behind the pre-training and fine-tune entries.

``run_training`` and ``TrainResult`` are imported on first use: the config sections that live in this package
(``optim``, ``loss``, ``train_config``, ``transfer``) are read by ``nestor_ds.config``, which the trainer imports.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainResult", "run_training"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from nestor_ds.engine import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'nestor_ds.engine' has no attribute {name!r}")
