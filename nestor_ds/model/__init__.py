"""NESTOR and the AFNO baseline.

from nestor_ds.model import build_model, get_preset
model = build_model(get_preset("nestor-ti"))
out = model(x_BXYTC, channel_mask_BC)     # ModelOutput(pred, aux_losses, routing)
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .config import ModelConfig
from .image_moe import BlockRouting
from .nestor import ModelOutput
from .presets import get_preset, list_presets

__all__ = ["build_model", "ModelConfig", "ModelOutput", "BlockRouting", "get_preset", "list_presets"]


def build_model(cfg: ModelConfig, ep_size: int | None = None) -> nn.Module:
    """Nestor for arch='nestor', AFNONet for arch='afno' (config validated first).

    ep_size: the expert-parallel group size the engine resolved for this run (None: the config's). The built model
    keeps its own copy of the config with it; the caller's config is not changed."""
    if ep_size is not None and cfg.arch == "nestor" and ep_size != cfg.moe.ep_size:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, ep_size=ep_size))
    cfg.validate()
    if cfg.arch == "nestor":
        from .nestor import Nestor

        return Nestor(cfg)
    from .afno_net import AFNONet

    return AFNONet(cfg)
