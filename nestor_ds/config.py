"""Run configuration for the entries: YAML -> typed dataclasses, validated on load, overridable from the command line.

Why one module: every default lives next to the component it configures (``DataConfig`` in
``nestor_ds.data``, ``ModelConfig`` in ``nestor_ds.model``, ``MoEConfig`` in ``nestor_ds.moe``, ``OptimConfig`` /
``LossConfig`` / ``TrainConfig`` / ``FinetuneConfig`` in ``nestor_ds.engine``, ...), and the engine composes them in
``RunConfig`` (``nestor_ds.engine.run_config``, re-exported here with ``format_config``). This module builds that
from nested dicts with precise error messages (``config.yaml: unknown key 'model.widht'``), merges the model section
(``nestor_ds.model.presets.merge_model_config``) and applies ``--set a.b=c`` overrides. It sits above the engine:
the entries, tools and tests import it, the engine never does (docs/ARCHITECTURE.md, "Packages").

The science lives in the YAML; ZeRO stage, precision, micro-batch and accumulation live in the DeepSpeed JSON
(``--ds_config``), which is read separately and never duplicated here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from nestor_ds.data.config import DataConfig
from nestor_ds.engine.loss import LossConfig
from nestor_ds.engine.optim import OptimConfig
from nestor_ds.engine.run_config import RunConfig, format_config
from nestor_ds.engine.train_config import TrainConfig
from nestor_ds.engine.transfer import FinetuneConfig
from nestor_ds.model.config import ModelConfig
from nestor_ds.model.presets import merge_model_config
from nestor_ds.tracking.tracker import TrackingConfig
from nestor_ds.typed_config import ConfigError, build_dataclass, deep_merge, flatten

# re-exported: callers import the sections and helpers from here
__all__ = [
    "ConfigError",
    "FinetuneConfig",
    "LossConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "deep_merge",
    "flatten",
    "format_config",
    "load_config",
    "parse_overrides",
    "read_yaml",
]


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.max_steps=10", "model.moe.backend=deepspeed"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.max_steps=10")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is both a value and a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _model_from_dict(
    raw: dict[str, Any], data: DataConfig, base: dict[str, Any] | None
) -> tuple[ModelConfig, int | str, str | None]:
    """(ModelConfig, ep_size, preset name): ``merge_model_config`` over ``base`` (a checkpoint's model, fine-tuning)
    with t_in/t_ar/resolution/in_channels defaulting to the data section's; ``moe.ep_size`` is the run's own."""
    raw = dict(raw)
    moe = dict(raw.pop("moe", {}) or {})
    ep_size = moe.pop("ep_size", "auto")
    data_fields = {"t_in": data.t_in, "t_ar": data.t_ar, "resolution": data.resolution, "in_channels": data.channels}
    return merge_model_config({**raw, "moe": moe}, base, data_fields), ep_size, raw.get("preset")


def config_from_dict(raw: dict[str, Any], base_model: dict[str, Any] | None = None) -> RunConfig:
    """Build and validate a RunConfig from plain dicts; ``base_model``: a pre-trained checkpoint's model config that
    the YAML's ``model`` section overrides (fine-tuning)."""
    raw = dict(raw or {})
    known = {f.name for f in dataclasses.fields(RunConfig)} - {"ep_size"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}' (known sections: {', '.join(sorted(known))})")
    data = build_dataclass(DataConfig, raw.get("data", {}) or {}, "data")
    model, ep_size, preset = _model_from_dict(raw.get("model", {}) or {}, data, base_model)
    cfg = RunConfig(
        data=data,
        model=model,
        optim=build_dataclass(OptimConfig, raw.get("optim", {}) or {}, "optim"),
        loss=build_dataclass(LossConfig, raw.get("loss", {}) or {}, "loss"),
        train=build_dataclass(TrainConfig, raw.get("train", {}) or {}, "train"),
        tracking=build_dataclass(TrackingConfig, raw.get("tracking", {}) or {}, "tracking"),
        finetune=build_dataclass(FinetuneConfig, raw.get("finetune", {}) or {}, "finetune"),
        ep_size=ep_size,
        preset=preset,
    )
    cfg.validate()
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML run config as a plain dict, with one-line errors for a missing file or bad YAML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of sections (data, model, optim, ...), got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides, build and validate it.

    Relative dataset paths are resolved against the current directory (where users run commands), not the
    YAML file's directory, so the same YAML works from the repository root as documented.
    """
    raw = deep_merge(read_yaml(path) if path is not None else {}, parse_overrides(overrides or []))
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path or '<defaults>'}: {e}") from None
    except (TypeError, ValueError) as e:  # a component's own validate()
        raise ConfigError(f"{path or '<defaults>'}: {e}") from None
