"""Carry pre-trained weights into a model built for another problem (fine-tuning).

The source is always the single-process ``local`` layout (``nestor_ds.checkpoint.load.load_local_state``
gathers a DeepSpeed checkpoint of any world size / ``ep_size``, or reads an export). When the target's token MoE
is expert parallel (``ep_size > 1``), each token-MoE's weights are cut to this rank's experts, so reloading with
another world size or ``ep_size`` works. Tensors whose shape no longer fits (another channel count, ``T_in``,
resolution) are re-initialised and reported; the caller gives them their own learning rate.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nestor_ds.checkpoint.convert import to_model_layout
from nestor_ds.typed_config import check

# which parameter-name prefixes each --load choice carries over
PARTS = {
    "all": ("encoder.", "blocks.", "head.", "cls_head."),
    "embedding+blocks": ("encoder.", "blocks."),
    "blocks": ("blocks.",),
}
# which names each freeze option matches (regular expressions searched in the parameter name). The shared AFNO
# expert is anchored to the block level: the token MoE's shared SwiGLU expert (``...experts.N.moe.shared.``) is not it.
FREEZE = {
    "routers": (r"\.router\.", r"\.gate\."),
    "experts": (r"\.experts\.",),
    "shared_afno": (r"^blocks\.\d+\.moe\.shared\.",),
    "embedding": (r"^encoder\.",),
}


@dataclass
class FinetuneConfig:
    """How a pre-trained checkpoint is carried to a downstream dataset (used by ``nestor_ds/finetune.py``)."""

    pretrained: str | None = None  # DeepSpeed checkpoint directory or exported .safetensors (--pretrained sets it)
    load: str = "all"  # parts carried over: all | embedding+blocks | blocks (the rest starts fresh)
    freeze: list[str] = field(default_factory=list)  # parts not trained: routers, experts, shared_afno, embedding
    new_lr_multiplier: float = 1.0  # lr multiplier for re-initialised parts
    pretrained_lr_multiplier: float = 1.0  # lr multiplier for the parts loaded from the checkpoint

    def validate(self) -> None:
        check(self.load in PARTS, "finetune.load", f"must be all, embedding+blocks or blocks, got {self.load!r}")
        bad = set(self.freeze) - set(FREEZE)
        check(
            not bad,
            "finetune.freeze",
            f"unknown part(s) {sorted(bad)}; choose from routers, experts, shared_afno, embedding",
        )


@dataclass
class TransferReport:
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # in the selected parts, but the shape changed
    not_selected: list[str] = field(default_factory=list)  # outside the selected parts: fresh init
    unused: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    resized: list[str] = field(default_factory=list)  # loaded after resizing (positional embedding)

    def summary(self) -> str:
        lines = [
            f"pre-trained weights: {len(self.loaded)} tensors loaded, {len(self.reinitialised)} re-initialised "
            f"(shape changed), {len(self.not_selected)} freshly initialised (not selected), "
            f"{len(self.unused)} unused"
        ]
        for title, names in (
            ("resized to the new grid", self.resized),
            ("re-initialised", self.reinitialised),
            ("not selected", self.not_selected),
            ("unused", self.unused),
        ):
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


def load_pretrained_parts(model: nn.Module, local_state: Mapping[str, torch.Tensor], load: str) -> TransferReport:
    """Copy the selected, shape-compatible tensors into ``model``; report everything else."""
    prefixes = PARTS[load]
    source = to_model_layout(model, local_state)
    own = model.state_dict()
    report = TransferReport()
    update = {}
    for key, target in own.items():
        if not key.startswith(prefixes):
            report.not_selected.append(key)
        elif key in source and tuple(source[key].shape) == tuple(target.shape):
            update[key] = source[key].to(dtype=target.dtype)
            report.loaded.append(key)
        elif key.endswith("pos_embed.pos") and key in source and source[key].shape[:2] == target.shape[:2]:
            # another resolution: the learned [1, D, H, W] table is resized to the new token grid, as the model
            # itself does at run time, instead of being thrown away
            update[key] = F.interpolate(
                source[key].float(), size=tuple(target.shape[-2:]), mode="bicubic", align_corners=False
            ).to(target.dtype)
            report.loaded.append(key)
            report.resized.append(key)
        else:
            report.reinitialised.append(key)
    report.unused = sorted(set(source) - set(own))
    model.load_state_dict(update, strict=False)
    return report


def freeze(model: nn.Module, parts: list[str]) -> list[str]:
    """``requires_grad = False`` on the named parts; returns the frozen parameter names."""
    patterns = [re.compile(p) for part in parts for p in FREEZE[part]]
    frozen = []
    for name, param in model.named_parameters():
        if any(p.search(name) for p in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
