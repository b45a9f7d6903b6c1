"""The DeepSpeed JSON (``--ds_config``): read it, and take micro-batch, accumulation and ZeRO stage from it.

Why apart from the YAML: ZeRO stage, precision, micro-batch and accumulation are DeepSpeed's to own; the run config
never duplicates them. Combinations that cannot work are refused at start with the fix named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nestor_ds.engine.run_config import RunConfig
from nestor_ds.errors import UserError


def load_ds_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--ds_config {p}: file not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--ds_config {p}: not valid JSON ({e.msg} at line {e.lineno})") from None


def check_ds_config(ds: dict[str, Any], cfg: RunConfig, world_size: int) -> tuple[int, int, int]:
    """(micro-batch, accumulation, ZeRO stage) from the JSON; refuse combinations that cannot work, naming the fix."""
    micro = int(ds.get("train_micro_batch_size_per_gpu", 0))
    accum = int(ds.get("gradient_accumulation_steps", 1))
    if micro <= 0:
        raise UserError("ds_config: train_micro_batch_size_per_gpu must be set to a positive integer")
    if "train_batch_size" in ds and int(ds["train_batch_size"]) != micro * accum * world_size:
        raise UserError(
            f"ds_config: train_batch_size={ds['train_batch_size']} != micro ({micro}) x accumulation ({accum}) x "
            f"data-parallel size ({world_size}); drop train_batch_size and DeepSpeed derives it"
        )
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if cfg.model.arch == "nestor" and cfg.model.moe.backend == "megablocks" and not ds.get("bf16", {}).get("enabled"):
        raise UserError("model.moe.backend=megablocks runs its experts in bf16: use a *_bf16.json ds_config")
    return micro, accum, stage
