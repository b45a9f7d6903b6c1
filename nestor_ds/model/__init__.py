"""NESTOR and the AFNO baseline.

from nestor_ds.model import build_model, get_preset
model = build_model(get_preset("nestor-ti"))
out = model(x_BXYTC, channel_mask_BC)     # ModelOutput(pred, aux_losses, routing)
"""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .image_moe import BlockRouting
from .nestor import ModelOutput
from .presets import get_preset, list_presets

__all__ = ["build_model", "ModelConfig", "ModelOutput", "BlockRouting", "get_preset", "list_presets"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """Nestor for arch='nestor', AFNONet for arch='afno' (config validated first)."""
    cfg.validate()
    if cfg.arch == "nestor":
        from .nestor import Nestor

        return Nestor(cfg)
    from .afno_net import AFNONet

    return AFNONet(cfg)
