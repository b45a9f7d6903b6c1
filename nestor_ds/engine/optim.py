"""Optimizer with DeepSpeed-MoE parameter groups, and the learning-rate schedule.

Why a client ``torch.optim`` optimizer: a DeepSpeed-config Adam builds FusedAdam (a 45 s C++ compile on CPU);
torch's AdamW runs everywhere. Expert parameters must sit in their own groups (DeepSpeed reduces them over the
expert-data-parallel group, not the whole world): ``split_params_into_different_moe_groups_for_optimizer`` does it.

The schedule is a pure function of the step, applied before every optimizer step, so a resumed run needs no
scheduler state to continue the same trajectory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nestor_ds.errors import UserError
from nestor_ds.typed_config import check


@dataclass
class OptimConfig:
    """AdamW/Adam with a warm-up + one-cycle or cosine schedule (the authors': Adam(0.9, 0.9), wd 1e-6, lr 1e-3)."""

    name: str = "adamw"  # adam | adamw
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up (fine-tuning multiplies it per part)
    betas: tuple[float, float] = (0.9, 0.9)  # Adam's (beta1, beta2)
    eps: float = 1e-8  # Adam's epsilon
    weight_decay: float = 1e-6  # on every parameter (decoupled from the gradient with adamw)
    schedule: str = "onecycle"  # onecycle | cosine | constant
    warmup_steps: int = 20  # onecycle: cosine rise from lr / div_factor; cosine, constant: linear rise from 0
    final_lr_ratio: float = 0.01  # lr at the last step, relative to lr
    # onecycle starts at lr / div_factor (torch's OneCycleLR default 25; DPOT and NESTOR use 1e4)
    div_factor: float = 25.0
    # torch's fused Adam kernel (one kernel over all tensors): null = where torch has it for the parameters' device
    # (CPU and CUDA). On CPU it is 7x faster than the per-tensor loop torch uses by default there (docs/benchmarks.md)
    fused: bool | None = None

    def validate(self) -> None:
        check(self.name in ("adam", "adamw"), "optim.name", f"must be adam or adamw, got {self.name!r}")
        check(
            self.schedule in ("onecycle", "cosine", "constant"),
            "optim.schedule",
            f"must be onecycle, cosine or constant, got {self.schedule!r}",
        )
        check(self.lr > 0, "optim.lr", "must be > 0")
        check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check(
            self.div_factor >= 1,
            "optim.div_factor",
            f"must be >= 1 (start lr = lr / div_factor), got {self.div_factor}",
        )
        check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", "must be two numbers in [0, 1)"
        )


def build_param_groups(named_groups: dict[str, tuple[list[torch.nn.Parameter], float]]) -> list[dict]:
    """``{"pretrained": (params, lr_multiplier), ...}`` -> torch param groups, experts split out for DeepSpeed."""
    from nestor_ds.compat import split_moe_param_groups

    groups = [
        {"name": name, "params": [p for p in params if p.requires_grad], "lr_multiplier": mult}
        for name, (params, mult) in named_groups.items()
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise UserError("no trainable parameters (is everything frozen?)")
    return [g for g in split_moe_param_groups(groups) if g["params"]]


def build_optimizer(param_groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    for g in param_groups:
        g.setdefault("lr_multiplier", 1.0)
        g["lr"] = cfg.lr * g["lr_multiplier"]
    fused = cfg.fused if cfg.fused is not None else fused_supported(param_groups)
    return cls(
        param_groups,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )


def fused_supported(param_groups: list[dict]) -> bool:
    """Whether torch has a fused Adam kernel for every parameter (floating point, on a supported device)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return all(p.is_floating_point() and p.device.type in devices for g in param_groups for p in g["params"])


def lr_at(step: int, total_steps: int, cfg: OptimConfig, fraction: float | None = None) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    - ``onecycle``: cosine rise from lr / ``div_factor`` to lr over ``warmup_steps``, cosine fall to
      ``final_lr_ratio * lr`` (the shape of torch's OneCycleLR, as DPOT and NESTOR train).
    - ``cosine``: linear warm-up from 0, then cosine decay to ``final_lr_ratio * lr``.
    - ``constant``: linear warm-up, then flat.
    ``fraction``: share of a time/FLOP budget spent (``engine/budget.py``); the decay then follows whichever of
    budget and steps is further along, so a budgeted run reaches the final lr when its budget runs out.
    """
    lr, w = cfg.lr, cfg.warmup_steps
    final = cfg.final_lr_ratio * lr
    if cfg.schedule == "onecycle":
        start = lr / cfg.div_factor
        if step < w:
            return start + (lr - start) * (1 - math.cos(math.pi * (step + 1) / w)) / 2
    elif step < w:
        return lr * (step + 1) / w
    if cfg.schedule == "constant":
        return lr
    span = max(1, total_steps - w - 1)
    progress = min(1.0, (step - w) / span)
    if fraction is not None:
        progress = max(progress, min(1.0, fraction))
    return final + (lr - final) * (1 + math.cos(math.pi * progress)) / 2


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_multiplier", 1.0)
