"""Optimizer with DeepSpeed-MoE parameter groups, and the learning-rate schedule.

Why a client ``torch.optim`` optimizer: a DeepSpeed-config Adam builds FusedAdam (a 45 s C++ compile on CPU);
torch's AdamW runs everywhere. Expert parameters must sit in their own groups (DeepSpeed reduces them over the
expert-data-parallel group, not the whole world): ``split_params_into_different_moe_groups_for_optimizer`` does it.

The schedule is a pure function of the step, applied before every optimizer step, so a resumed run needs no
scheduler state to continue the same trajectory.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from nestor_ds.config import OptimConfig


def build_param_groups(named_groups: dict[str, tuple[list[torch.nn.Parameter], float]]) -> list[dict]:
    """``{"pretrained": (params, lr_multiplier), ...}`` -> torch param groups, experts split out for DeepSpeed."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = [
        {"name": name, "params": [p for p in params if p.requires_grad], "lr_multiplier": mult}
        for name, (params, mult) in named_groups.items()
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters (is everything frozen?)")
    return [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]


def build_optimizer(param_groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    for g in param_groups:
        g.setdefault("lr_multiplier", 1.0)
        g["lr"] = cfg.lr * g["lr_multiplier"]
    return cls(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_at(step: int, total_steps: int, cfg: OptimConfig, fraction: Optional[float] = None) -> float:
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


def trainable(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in params if p.requires_grad]
