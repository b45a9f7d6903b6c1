"""The AFNO-only baseline (DPOT-style): the same encoder and head as NESTOR, `depth` AFNO blocks between."""

from __future__ import annotations

import torch

from .afno import afno_stack
from .config import ModelConfig
from .nestor import AUX_KEYS, ForecastModel, ModelOutput


class AFNONet(ForecastModel):
    """encoder -> depth x AFNOBlock -> head; aux losses are zeros and routing is empty."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self._init_common(cfg)
        self.blocks = afno_stack(cfg, cfg.depth)
        self.configure_spectral()

    def forward(self, x: torch.Tensor, channel_mask: torch.Tensor | None = None) -> ModelOutput:
        self.check_input(x, channel_mask)
        z = self.blocks(self.encoder(x))
        pred, cls = self.finish(z, channel_mask, x)
        aux = {k: pred.new_zeros((), dtype=torch.float32) for k in AUX_KEYS}
        return ModelOutput(pred, aux, [], cls)
