"""The shared training engine: one loop (``trainer.run_training``) behind the pre-training and fine-tune entries."""

from nestor_ds.engine.trainer import TrainResult, run_training

__all__ = ["TrainResult", "run_training"]
