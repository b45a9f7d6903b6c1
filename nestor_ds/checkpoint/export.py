"""Export: a DeepSpeed checkpoint directory -> one safetensors file in the `local` layout (run config inside).

The weights are loaded into a freshly built local model before writing, so a file that would not load is never
written. The CLI is `python -m nestor_ds.checkpoint` (cli.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nestor_ds.checkpoint.convert import inference_model_config
from nestor_ds.checkpoint.layout import FORMAT_NAME, FORMAT_VERSION
from nestor_ds.checkpoint.load import load_local_state
from nestor_ds.checkpoint.safe_load import load_state_strict
from nestor_ds.errors import UserError


def save_safetensors(
    state: Mapping[str, torch.Tensor], run_cfg: Mapping[str, Any], out: str | Path, source: str = ""
) -> Path:
    """Write weights + run config (metadata 'nestor_config', and `<out>.json` beside it), credentials masked."""
    from safetensors.torch import save_file

    from nestor_ds.redact import mask_secrets, redact

    run_cfg, source = redact(dict(run_cfg)), mask_secrets(source)  # a checkpoint saved before masking covered it

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}  # no shared storage
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "nestor_config": json.dumps(run_cfg),
        "source": source,
    }
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out)
    out.with_suffix(".json").write_text(json.dumps(run_cfg, indent=2))
    return out


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Gather + convert a DeepSpeed checkpoint and write it as one safetensors file, floats in `dtype`.

    The weights are the fp32 masters where the checkpoint has them (`load_local_state`); they are loaded into a
    freshly built local model first, so a file that would not load is never written.
    """
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    state, run_cfg, source = load_local_state(checkpoint)
    from nestor_ds.model import build_model

    load_state_strict(build_model(inference_model_config(run_cfg)), state, source)
    state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    return save_safetensors(state, run_cfg, out, source=source)
