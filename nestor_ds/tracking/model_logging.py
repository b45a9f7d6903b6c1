"""Log an exported NESTOR model to MLflow as a pyfunc model and, when asked, register it.

Why: reviewers find a run's model under "Logged models" and in the Model Registry, and load or serve it with
MLflow alone (`mlflow.pyfunc.load_model("models:/<name>/<version>")`, `mlflow models serve`). The pyfunc is
"models from code" (`pyfunc_model.py`, given as a file path), so MLflow pickles nothing of ours; the weights
travel as the safetensors file written by `nestor_ds/checkpoint/export.py` and are read by `load_pretrained`.

Called at the end of pre-training and fine-tuning (rank 0, after the last checkpoint; `tracking.log_model`,
`tracking.register_model`) and by `python -m nestor_ds.tracking.register` (`register.py`).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("nestor_ds.tracking")

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # nestor_ds/, shipped as the model's code
MODEL_NAME = "model"  # the logged model's name within the run
# what loading the model imports; pinned to the versions this process runs (and the test suite tested)
REQUIREMENTS = ("mlflow", "torch", "numpy", "safetensors", "pyyaml", "tqdm")


def pinned_requirements() -> list[str]:
    """`name==version` of REQUIREMENTS as installed here (a local build tag such as +cpu dropped)."""
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def model_signature(run_config: Mapping[str, Any]) -> Any:
    """Inputs x [B, X, Y, t_in, C] and channel_mask [B, C]; param `steps`; output [B, X, Y, steps, C].

    X and Y are free (-1): the model interpolates its position embedding to other grids.
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    from nestor_ds.checkpoint.convert import inference_model_config

    m = inference_model_config(run_config)
    return ModelSignature(
        inputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, -1, -1, m.t_in, m.in_channels), "x"),
                TensorSpec(np.dtype(np.float32), (-1, m.c_out), "channel_mask"),
            ]
        ),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1, m.c_out))]),
        params=ParamSchema([ParamSpec("steps", "long", 1)]),
    )


def log_pyfunc_model(
    tracking_uri: str,
    run_id: str,
    weights: str | Path,
    run_config: Mapping[str, Any],
    register_as: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Log `weights` (an exported .safetensors) as the run's pyfunc model; register it when `register_as` is set.

    Returns {"model_uri", "model_id", "version" (None unless registered)}. Raises what MLflow raises.
    """
    import os
    import warnings

    import mlflow
    from mlflow.models import Model

    from nestor_ds.redact import redact

    mlflow.set_tracking_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tags = {k: str(v) for k, v in (tags or {}).items()}
    with tempfile.TemporaryDirectory(prefix="nestor-model-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no input example": the signature states the shapes
        cfg_file = Path(tmp) / "run_config.json"
        cfg_file.write_text(json.dumps(redact(dict(run_config)), indent=2))
        info = Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=str(PYFUNC_FILE),
            artifacts={"weights": str(weights), "run_config": str(cfg_file)},
            code_paths=[str(PACKAGE_DIR)],
            signature=model_signature(run_config),
            pip_requirements=pinned_requirements(),
            tags=tags or None,
        )
    out = {"model_uri": info.model_uri, "model_id": getattr(info, "model_id", None), "version": None}
    if register_as:
        version = mlflow.register_model(info.model_uri, register_as, tags=tags or None)
        out["version"] = version.version
        log.info("MLflow: registered %s as models:/%s/%s", info.model_uri, register_as, version.version)
    return out


def eval_tags(final_eval: Mapping[str, Any] | None) -> dict[str, str]:
    """Evaluation metrics of a run's final evaluation report as registry tags (`eval/<dataset>/<metric>`)."""
    tags = {}
    for name, ds in ((final_eval or {}).get("datasets") or {}).items():
        for key in ("l2re_1step", "l2re_rollout"):
            if ds.get(key) is not None:
                tags[f"eval/{name}/{key}"] = f"{float(ds[key]):.6g}"
    return tags


def log_trained_model(tracker: Any, checkpoint_tag: Path, out: Path, final_eval: Mapping[str, Any] | None) -> None:
    """End of a training run (rank 0): export the last checkpoint to `out`, log it, register it if configured.

    Best effort: the training result is on disk whatever happens here; a failure is one warning line
    naming the command that does it later (`python -m nestor_ds.tracking.register`).
    """
    cfg = tracker.cfg
    if not tracker.active or not cfg.log_model:
        return
    from nestor_ds.checkpoint.export import export_checkpoint
    from nestor_ds.checkpoint.safe_load import read_safetensors
    from nestor_ds.tracking.buffer import one_line

    try:
        weights = export_checkpoint(checkpoint_tag, out)
        tracker.flush()  # the model's params copy and the Datasets panel should see what the run logged
        _, run_config = read_safetensors(weights)
        log_pyfunc_model(
            tracker.tracking_uri, tracker.run_id, weights, run_config, cfg.register_model, eval_tags(final_eval)
        )
    except Exception as exc:  # noqa: BLE001 - never fail a finished training over its MLflow model
        log.warning(
            "MLflow: model not logged (%s); later: python -m nestor_ds.tracking.register --checkpoint %s --out %s "
            "--name NAME",
            one_line(exc),
            checkpoint_tag,
            out,
        )
