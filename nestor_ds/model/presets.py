"""Named model configurations. A YAML config can name one and override fields on top of it.

Ti presets reproduce the authors' models (parameter counts and FLOPs checked in tests/test_model.py);
the larger ones are for GPUs; the tiny ones for tests and the CPU demo.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from nestor_ds.errors import UserError
from nestor_ds.moe import MoEConfig
from nestor_ds.typed_config import build_dataclass, deep_merge

from .config import ModelConfig


def _nestor(**kw: Any) -> ModelConfig:
    moe = kw.pop("moe", {})
    return ModelConfig(arch="nestor", moe=MoEConfig(**moe), **kw)


def _afno(**kw: Any) -> ModelConfig:
    return ModelConfig(arch="afno", **kw)


# fields that follow the run's data (channels, frames, grid), not a preset or a pre-trained checkpoint
DATA_BOUND = ("in_channels", "out_channels", "t_in", "t_ar", "resolution")

_PRESETS: dict[str, ModelConfig] = {
    # the authors' NESTOR-Ti: width 512, 2 blocks, 6 image experts top-2, 6 token experts top-2 + 1 shared,
    # with DPOT's 12-way dataset-classification head (counted in the authors' 83.1M) and the authors'
    # LLaMA-style shared token expert of hidden 2/3 * width (341)
    "nestor-ti": _nestor(num_datasets=12, moe={"shared_hidden_ratio": 2 / 3}),
    # GPU sizes (counts in docs/model.md): ~0.19B, ~0.51B, ~1.0B total parameters
    "nestor-s": _nestor(width=768, depth=2, num_heads=12, num_datasets=12),
    "nestor-m": _nestor(width=1024, depth=3, num_heads=16, num_datasets=12),
    "nestor-l": _nestor(width=1024, depth=6, num_heads=16, num_datasets=12),
    # DPOT-Ti: width 512, 4 AFNO blocks, mlp_ratio 1, 4 spectral blocks, 32 modes, classification head
    "afno-ti": _afno(depth=4, num_datasets=12),
    # AFNO baselines with the forward FLOPs of nestor-s / -m / -l (within 3%): equal-compute comparisons
    "afno-s": _afno(width=1024, depth=10, num_datasets=12),
    "afno-m": _afno(width=1536, depth=12, num_datasets=12),
    "afno-l": _afno(width=1536, depth=26, num_datasets=12),
    # tiny: tests and the CPU demo
    "nestor-tiny": _nestor(
        resolution=32,
        patch_size=8,
        width=32,
        depth=2,
        num_heads=4,
        image_experts=4,
        afno_modes=4,
        afno_num_blocks=4,
        shared_afno_layers=1,
        head_dim=16,
        moe={"num_experts": 4, "top_k": 2},
    ),
    "afno-tiny": _afno(resolution=32, patch_size=8, width=32, depth=2, afno_modes=4, afno_num_blocks=4, head_dim=16),
}


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """A fresh copy of preset `name`, with `overrides` (flat fields; `moe` as a dict is merged; `moe.x` keys too)."""
    fields = dict(overrides or {})
    for key in [k for k in fields if k.startswith("moe.")]:
        fields["moe"] = {**(fields.get("moe") or {}), key[4:]: fields.pop(key)}
    return merge_model_config({**fields, "preset": name}).validate()


def merge_model_config(
    fields: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
    data_fields: Mapping[str, Any] | None = None,
) -> ModelConfig:
    """The one merge of a model config, layer over layer: preset -> base -> fields -> data-bound fields.

    - preset: ``fields["preset"]`` (a registry name), else the ModelConfig defaults. An explicit preset replaces
      ``base``: a fine-tune YAML that names one wants that architecture, not the checkpoint's.
    - base: a checkpoint's model config (fine-tuning). Its DATA_BOUND fields and ``moe.ep_size`` are dropped:
      they followed the old data and world size.
    - fields: the YAML's ``model`` section (``moe`` merged key by key).
    - data_fields: values for the DATA_BOUND fields the YAML leaves unset (the run's data section).
    Not validated: the caller validates (the run config checks model and data together).
    """
    own = dict(fields or {})
    preset = own.pop("preset", None)
    if preset is not None:
        if preset not in _PRESETS:
            raise UserError(f"unknown model preset {preset!r}; known: {list_presets()}")
        merged = dataclasses.asdict(_PRESETS[preset])
    else:
        merged = dataclasses.asdict(ModelConfig())
        if base:
            kept = {k: v for k, v in base.items() if k not in DATA_BOUND}
            kept["moe"] = {k: v for k, v in (kept.get("moe") or {}).items() if k != "ep_size"}
            merged = deep_merge(merged, kept)
    for key, value in (data_fields or {}).items():
        own.setdefault(key, value)
    return build_dataclass(ModelConfig, deep_merge(merged, own), "model")
