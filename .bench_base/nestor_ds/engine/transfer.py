"""Carry pre-trained weights into a model built for another problem (fine-tuning).

The source is always the single-process ``local`` layout (``checkpoint_io.load_local_state`` gathers a DeepSpeed
checkpoint of any world size / ``ep_size``, or reads an export). When the target runs the ``deepspeed`` MoE
backend, each token-MoE's weights are cut to this rank's experts, so reloading with another world size or
``ep_size`` works. Tensors whose shape no longer fits (another channel count, ``T_in``, resolution) are
re-initialised and reported; the caller gives them their own learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

# which parameter-name prefixes each --load choice carries over
PARTS = {
    "all": ("encoder.", "blocks.", "head."),
    "embedding+blocks": ("encoder.", "blocks."),
    "blocks": ("blocks.",),
}
# which names each freeze option matches (substring of the parameter name)
FREEZE = {
    "routers": (".router.", ".gate."),
    "experts": (".experts.",),
    "shared_afno": (".shared.",),
    "embedding": ("encoder.",),
}


@dataclass
class TransferReport:
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # in the selected parts, but the shape changed
    not_selected: list[str] = field(default_factory=list)   # outside the selected parts: fresh init
    unused: list[str] = field(default_factory=list)         # in the checkpoint, not in the model

    def summary(self) -> str:
        lines = [f"pre-trained weights: {len(self.loaded)} tensors loaded, {len(self.reinitialised)} re-initialised "
                 f"(shape changed), {len(self.not_selected)} freshly initialised (not selected), {len(self.unused)} unused"]
        for title, names in (("re-initialised", self.reinitialised), ("not selected", self.not_selected), ("unused", self.unused)):
            if names:
                lines.append(f"  {title}: " + ", ".join(_compress(names)))
        return "\n".join(lines)


def _compress(names: list[str], limit: int = 12) -> list[str]:
    """Group names by their first two components so a report of hundreds of tensors stays readable."""
    groups: dict[str, int] = {}
    for n in names:
        key = ".".join(n.split(".")[:2])
        groups[key] = groups.get(key, 0) + 1
    out = [f"{k}.* ({v})" if v > 1 else k for k, v in groups.items()]
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def to_target_layout(model: nn.Module, local_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert token-MoE weights of the local layout to the layout of ``model``'s MoE modules (this rank's experts)."""
    from nestor_ds.moe.deepspeed_backend import DeepSpeedTokenMoE, deepspeed_state_from_local

    state = dict(local_state)
    for name, module in model.named_modules():
        if not isinstance(module, DeepSpeedTokenMoE):
            continue
        prefix = name + "."
        sub = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        if not sub:
            continue
        converted = deepspeed_state_from_local(sub, ep_rank=_ep_rank(module), ep_size=module.ep_size)
        state.update({prefix + k: v for k, v in converted.items()})
    return state


def _ep_rank(module: nn.Module) -> int:
    """This rank's place in its expert-parallel group, also before ``deepspeed.initialize`` created the group:
    DeepSpeed groups consecutive ranks (``[0..ep-1], [ep..2ep-1], ...``), so it is ``rank % ep_size``."""
    if module.moe.deepspeed_moe.ep_group is not None:
        return module.ep_rank()
    return torch.distributed.get_rank() % module.ep_size if torch.distributed.is_initialized() else 0


def load_pretrained_parts(model: nn.Module, local_state: Mapping[str, torch.Tensor], load: str) -> TransferReport:
    """Copy the selected, shape-compatible tensors into ``model``; report everything else."""
    prefixes = PARTS[load]
    source = to_target_layout(model, local_state)
    own = model.state_dict()
    report = TransferReport()
    update = {}
    for key, target in own.items():
        if not key.startswith(prefixes):
            report.not_selected.append(key)
        elif key in source and tuple(source[key].shape) == tuple(target.shape):
            update[key] = source[key].to(dtype=target.dtype)
            report.loaded.append(key)
        else:
            report.reinitialised.append(key)
    report.unused = sorted(set(source) - set(own))
    model.load_state_dict(update, strict=False)
    return report


def freeze(model: nn.Module, parts: list[str]) -> list[str]:
    """``requires_grad = False`` on the named parts; returns the frozen parameter names."""
    patterns = tuple(p for part in parts for p in FREEZE[part])
    frozen = []
    for name, param in model.named_parameters():
        if any(name.startswith(p) if p.endswith(".") and not p.startswith(".") else p in name for p in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
