"""The AFNO-only baseline (DPOT-style): the same encoder and head as NESTOR, `depth` AFNO blocks between."""

from __future__ import annotations

import torch
from torch import nn

from .afno import AFNOBlock
from .config import ModelConfig
from .nestor import AUX_KEYS, ForecastModel, ModelOutput


class AFNONet(ForecastModel):
    """encoder -> depth x AFNOBlock -> head; aux losses are zeros and routing is empty."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self._init_common(cfg)
        self.blocks = nn.Sequential(
            *(
                AFNOBlock(
                    cfg.width,
                    cfg.afno_num_blocks,
                    cfg.afno_modes,
                    cfg.afno_mlp_ratio,
                    cfg.afno_sparsity,
                    cfg.norm_groups,
                    cfg.dropout,
                )
                for _ in range(cfg.depth)
            )
        )
        self.configure_spectral()

    def forward(self, x: torch.Tensor, channel_mask: torch.Tensor | None = None) -> ModelOutput:
        self.check_input(x, channel_mask)
        z = self.blocks(self.encoder(x))
        pred, cls = self.finish(z, channel_mask, x)
        aux = {k: pred.new_zeros((), dtype=torch.float32) for k in AUX_KEYS}
        return ModelOutput(pred, aux, [], cls)
