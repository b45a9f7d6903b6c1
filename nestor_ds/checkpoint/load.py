"""What users load: the `local`-layout weights of any checkpoint form, and a ready model (`load_pretrained`).

A DeepSpeed tag of a bf16/fp16 ZeRO-1/2 run holds its module weights rounded to 16 bits; the fp32 master weights the
optimizer updates live in the optimizer files. Export, fine-tuning and evaluation start from those fp32 masters when
the tag has them (`fp32_master.py`), so nothing downstream starts from rounded weights.

The run config returned with the weights is data from a file that may be someone else's (a downloaded export):
its model section builds the model, but its dataset paths may name a `pipe:` command or a URL. Whoever needs
its datasets reads them with `nestor_ds.data.config.saved_dataset_specs`, which the data layer never runs or
fetches from (`check_saved`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nestor_ds.checkpoint.convert import deepspeed_to_local_state, inference_model_config
from nestor_ds.checkpoint.fp32_master import gather_fp32_master_state
from nestor_ds.checkpoint.layout import CheckpointError, read_run_config, resolve_checkpoint
from nestor_ds.checkpoint.safe_load import gather_deepspeed_state, load_state_strict, read_safetensors
from nestor_ds.log import get_logger

log = get_logger(__name__)


def load_local_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(local-layout state, run config, source description) from a .safetensors, tag dir or checkpoint root.

    From a DeepSpeed tag: the module state, or for a 16-bit ZeRO-1/2 run the fp32 master weights."""
    p = resolve_checkpoint(path)
    if p.is_file():
        state, run_cfg = read_safetensors(p)
        return state, run_cfg, str(p)
    run_cfg = read_run_config(p)
    state = gather_deepspeed_state(p)
    if any(v.is_floating_point() and v.dtype != torch.float32 for v in state.values()):  # fp32 runs: module = master
        master = gather_fp32_master_state(p, state)
        if master is not None:
            log.info("%s: fp32 master weights from the ZeRO optimizer files", p)
            state = master
    return deepspeed_to_local_state(state), run_cfg, str(p)


def read_saved_config(path: str | Path) -> dict[str, Any]:
    """The run config saved with a checkpoint (its tag's nestor_config.json) or an export (its metadata), without
    reading any weights. Its data specs are the saver's text: read them with `saved_dataset_specs`."""
    p = resolve_checkpoint(path)
    if p.is_dir():
        return read_run_config(p)
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:  # metadata only, no tensors read
            return json.loads((f.metadata() or {})["nestor_config"])
    except Exception as err:  # safetensors raises its own error types; a file without our metadata
        raise CheckpointError(f"{p}: no readable run config ({str(err).splitlines()[0]})") from None


def load_pretrained(
    path: str | Path, device: str | torch.device = "cpu", model_overrides: Mapping[str, Any] | None = None
) -> torch.nn.Module:
    """Eval-mode model (local MoE backend, ep_size 1) from a .safetensors export or a DeepSpeed checkpoint.

    The run config travels with the model as `model.run_config` (a dict: model, data, ...).
    `model_overrides` changes ModelConfig fields that do not touch weights (e.g. {"attention": "sdpa"}).
    """
    from nestor_ds.model import build_model  # the model package is heavy; import on use

    state, run_cfg, source = load_local_state(path)
    model = build_model(inference_model_config(run_cfg, model_overrides))
    load_state_strict(model, state, source)
    model.run_config = run_cfg
    return model.to(device).eval()
