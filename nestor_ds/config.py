"""Run configuration: YAML -> typed dataclasses, validated on load, overridable from the command line.

Why one module: every default lives next to the component it configures (``DataConfig`` in
``nestor_ds.data``, ``ModelConfig`` in ``nestor_ds.model``, ``MoEConfig`` in ``nestor_ds.moe``, ...); this module
only composes them, builds them from nested dicts with precise error messages (``config.yaml: unknown key
'model.widht'``), applies ``--set a.b=c`` overrides, and flattens the result for printing and MLflow.

The science lives in the YAML; ZeRO stage, precision, micro-batch and accumulation live in the DeepSpeed JSON
(``--ds_config``), which is read separately and never duplicated here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from nestor_ds.data.config import DataConfig
from nestor_ds.model.config import ModelConfig
from nestor_ds.model.presets import get_preset
from nestor_ds.tracking.tracker import TrackingConfig
from nestor_ds.typed_config import ConfigError, build_dataclass, flatten  # noqa: F401  (flatten: re-exported)


@dataclass
class OptimConfig:
    """AdamW/Adam with a warm-up + one-cycle or cosine schedule (the authors': Adam(0.9, 0.9), wd 1e-6, lr 1e-3)."""

    name: str = "adamw"  # adam | adamw
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.9)
    eps: float = 1e-8
    weight_decay: float = 1e-6
    schedule: str = "onecycle"  # onecycle | cosine | constant
    warmup_steps: int = 20
    final_lr_ratio: float = 0.01  # lr at the last step, relative to lr
    div_factor: float = 25.0  # onecycle starts at lr / div_factor (torch's OneCycleLR default 25; DPOT and NESTOR use 1e4)

    def validate(self) -> None:
        _check(self.name in ("adam", "adamw"), "optim.name", f"must be adam or adamw, got {self.name!r}")
        _check(self.schedule in ("onecycle", "cosine", "constant"), "optim.schedule",
               f"must be onecycle, cosine or constant, got {self.schedule!r}")
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.div_factor >= 1, "optim.div_factor", f"must be >= 1 (start lr = lr / div_factor), got {self.div_factor}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", "must be two numbers in [0, 1)")


@dataclass
class LossConfig:
    """Weights of the load-balancing and router z-losses added to the masked relative L2 loss."""

    image_lb_weight: float = 3e-2  # authors' pre-training value
    token_lb_weight: float = 1e-4
    token_z_weight: float = 0.0


@dataclass
class TrainConfig:
    """Loop length, noise, evaluation, checkpoint and logging cadence."""

    seed: int = 0
    max_steps: int = 200
    input_noise: float = 5e-4  # DPOT's noise injection: x += s * ||x||_2 * N(0, 1), per sample and channel
    log_every: int = 10
    eval_every: int = 100  # 0 disables periodic evaluation (the final one still runs)
    eval_batch_size: int = 4
    eval_max_trajectories: Optional[int] = 8
    eval_rollout_steps: Optional[int] = 5  # None -> every dataset's rollout_steps
    eval_windows: str = "all"  # all: every start frame with t_in frames before it (DPOT-style) | first: one per trajectory
    ckpt_every: int = 100
    keep_last: int = 3
    output_dir: str = "runs"
    threads_per_rank: Optional[int] = None  # torch intra-op threads; None -> cores / local ranks
    stop_at: Optional[int] = None  # stop cleanly after this step, as a preemption would (staged runs, tests)
    compile: bool = False  # regional torch.compile of the model's blocks (nestor_ds/engine/compile.py)
    cuda_graphs: bool = False  # CUDA graphs for the compiled regions (needs compile, CUDA and static routing)
    time_budget_s: Optional[float] = None  # stop after this many seconds of training (evaluation/saves excluded)
    flop_budget: Optional[float] = None  # stop after this many training FLOPs (3 x forward, analytic)

    def validate(self) -> None:
        _check(self.max_steps > 0, "train.max_steps", "must be > 0")
        _check(self.ckpt_every > 0, "train.ckpt_every", "must be > 0")
        _check(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        _check(self.log_every > 0, "train.log_every", "must be > 0")
        _check(not self.cuda_graphs or self.compile, "train.cuda_graphs",
               "needs train.compile: true (the graphs are captured from the compiled regions)")
        _check(self.eval_windows in ("all", "first"), "train.eval_windows",
               f"must be all or first, got {self.eval_windows!r}")
        for key in ("time_budget_s", "flop_budget"):
            value = getattr(self, key)
            _check(value is None or (isinstance(value, (int, float)) and value > 0), f"train.{key}",
                   f"must be a positive number or null, got {value!r}")


@dataclass
class FinetuneConfig:
    """How a pre-trained checkpoint is carried to a downstream dataset (used by ``nestor_ds/finetune.py``)."""

    pretrained: Optional[str] = None
    load: str = "all"  # all | embedding+blocks | blocks
    freeze: list[str] = field(default_factory=list)  # routers, experts, shared_afno, embedding
    new_lr_multiplier: float = 1.0  # lr multiplier for re-initialised parts
    pretrained_lr_multiplier: float = 1.0

    def validate(self) -> None:
        _check(self.load in ("all", "embedding+blocks", "blocks"), "finetune.load",
               f"must be all, embedding+blocks or blocks, got {self.load!r}")
        bad = set(self.freeze) - {"routers", "experts", "shared_afno", "embedding"}
        _check(not bad, "finetune.freeze", f"unknown part(s) {sorted(bad)}; choose from routers, experts, shared_afno, embedding")


@dataclass
class RunConfig:
    """Everything a run needs besides the DeepSpeed JSON."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ep_size: Union[int, str] = "auto"  # from model.moe.ep_size in YAML; resolved against the world size at start
    preset: Optional[str] = None  # from model.preset in YAML: the registry entry the model fields override

    def validate(self) -> None:
        for part in (self.data, self.model, self.optim, self.train, self.finetune):
            if hasattr(part, "validate"):
                part.validate()
        d, m = self.data, self.model
        for key in ("t_in", "t_ar", "resolution"):
            _check(getattr(d, key) == getattr(m, key), f"model.{key}",
                   f"= {getattr(m, key)} disagrees with data.{key} = {getattr(d, key)}")
        _check(d.channels == m.in_channels, "model.in_channels",
               f"= {m.in_channels} disagrees with data.channels = {d.channels}")
        _check(self.ep_size == "auto" or (isinstance(self.ep_size, int) and self.ep_size >= 1),
               "model.moe.ep_size", f"must be 'auto' or a positive integer, got {self.ep_size!r}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return json.loads(json.dumps(out, default=str))

    def digest(self) -> str:
        """Hash of the science-relevant configuration (stored in checkpoints; resume warns on mismatch)."""
        d = self.to_dict()
        for volatile in ("tracking",):
            d.pop(volatile, None)
        # fields that do not change the training trajectory (max_steps does: it shapes the lr schedule)
        volatile = ("output_dir", "ckpt_every", "keep_last", "log_every", "stop_at", "threads_per_rank")
        d["train"] = {k: v for k, v in d["train"].items() if k not in volatile and not k.startswith("eval_")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {msg}")


# ----------------------------------------------------------------------------------------------------------
# YAML + overrides


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


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _model_from_dict(raw: dict[str, Any], data: DataConfig) -> tuple[ModelConfig, Union[int, str], Optional[str]]:
    """Preset first, then fields; t_in/t_ar/resolution/channels default to the data section's."""
    raw = dict(raw)
    moe = dict(raw.pop("moe", {}) or {})
    ep_size = moe.pop("ep_size", "auto")
    preset = raw.pop("preset", None)
    base = dataclasses.asdict(get_preset(preset)) if preset else dataclasses.asdict(ModelConfig())
    base_moe = base.pop("moe")
    base_moe.pop("ep_size", None)
    for key, dkey in (("t_in", "t_in"), ("t_ar", "t_ar"), ("resolution", "resolution"), ("in_channels", "channels")):
        raw.setdefault(key, getattr(data, dkey))
    merged = deep_merge(base, raw)
    merged["moe"] = deep_merge(base_moe, moe)
    return build_dataclass(ModelConfig, merged, "model"), ep_size, preset


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    raw = dict(raw or {})
    known = {f.name for f in dataclasses.fields(RunConfig)} - {"ep_size"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}' (known sections: {', '.join(sorted(known))})")
    data = build_dataclass(DataConfig, raw.get("data", {}) or {}, "data")
    model, ep_size, preset = _model_from_dict(raw.get("model", {}) or {}, data)
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


def load_config(path: Optional[str | Path], overrides: Optional[list[str]] = None) -> RunConfig:
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


def format_config(cfg: RunConfig, ds_config: Optional[dict[str, Any]] = None) -> str:
    """Human-readable resolved configuration, printed at start."""
    from nestor_ds.tracking.redact import redact

    text = yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False, default_flow_style=None, width=110)
    if ds_config is not None:
        text += "ds_config:\n" + "".join(f"  {line}\n" for line in json.dumps(ds_config, indent=2).splitlines())
    return text
