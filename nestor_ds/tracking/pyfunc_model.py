"""MLflow pyfunc model of an exported NESTOR checkpoint (a "models from code" file: MLflow copies and runs it).

Loading (`mlflow.pyfunc.load_model`, `mlflow models serve`) executes this file, which defines
:class:`NestorRollout` and hands an instance to `mlflow.models.set_model`; no Python object is pickled.
`load_context` reads the weights with `nestor_ds.checkpoint.load.load_pretrained` from the model's
`weights` artifact, a safetensors file (tensors and JSON metadata only). The `nestor_ds` package travels
with the model (`code/`, which MLflow puts first on sys.path when it loads the model), so loading needs no
checkout of this repository (tests/test_mlflow_models.py runs it from a fresh `python -I` outside the
repository). The run config inside the weights only builds the model: its dataset paths are never opened here.

Input (named tensor `x`): float32 [B, X, Y, T_in, C], the last T_in frames, channels-last as in the shards.
Named tensor `channel_mask`: float32 [B, C], 1 for channels the sample's dataset has, 0 for padding. Parameter
`steps`: how many frames to forecast. Output: float32 [B, X, Y, steps, C], the same as
`load_pretrained(...).rollout(x, steps)`.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class NestorRollout(PythonModel):
    """Autoregressive rollout of the exported model; see the module docstring for the input format."""

    def load_context(self, context):  # no type hints: MLflow would read them as a schema
        from nestor_ds.checkpoint.load import load_pretrained

        self.model = load_pretrained(context.artifacts["weights"], device="cpu")
        self.default_steps = int(context.model_config.get("default_steps", 1)) if context.model_config else 1

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        if isinstance(model_input, dict):
            x, mask = model_input["x"], model_input.get("channel_mask")
        elif hasattr(model_input, "columns"):  # a DataFrame from a request without named tensors
            raise ValueError("send {'inputs': {'x': [...]}}: a named tensor x of shape [B, X, Y, T_in, C]")
        else:
            x, mask = model_input, None
        steps = int((params or {}).get("steps") or self.default_steps)
        if steps < 1:
            raise ValueError(f"params.steps must be >= 1, got {steps}")
        x_t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        mask_t = None if mask is None else torch.as_tensor(np.asarray(mask)).to(torch.float32)
        with torch.no_grad():
            return self.model.rollout(x_t, steps, mask_t).numpy()


mlflow.models.set_model(NestorRollout())
