"""NESTOR: encoder -> depth x [x = x + ImageMoE(GroupNorm(x))] -> output head.

Also holds what both architectures share: ModelOutput, the input checks and the autoregressive rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ModelConfig
from .embedding import Encoder, OutputHead
from .image_moe import BlockRouting, ImageMoE

AUX_KEYS = ("image_lb", "token_lb", "token_z")


@dataclass
class ModelOutput:
    """pred [B, X, Y, T_ar, C_out]; aux_losses summed over blocks; routing one entry per NESTOR block."""

    pred: torch.Tensor
    aux_losses: dict[str, torch.Tensor]
    routing: list[BlockRouting] = field(default_factory=list)
    cls_logits: torch.Tensor | None = None  # [B, num_datasets] when the DPOT classification head is on


class ForecastModel(nn.Module):
    """Common frame: input checks, channel masking, dataset head and rollout."""

    cfg: ModelConfig

    def _init_common(self, cfg: ModelConfig) -> None:
        D = cfg.width
        self.encoder = Encoder(
            cfg.in_channels, cfg.embed_hidden_dim, D, cfg.patch_size, cfg.grid, cfg.t_in, cfg.dropout
        )
        self.head = OutputHead(D, cfg.head_dim, cfg.patch_size, cfg.t_ar, cfg.c_out)
        self.cls_head = (
            nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D), nn.GELU(), nn.Linear(D, cfg.num_datasets))
            if cfg.num_datasets
            else None
        )

    def configure_spectral(self) -> None:
        """Every AFNO block (baseline blocks and NESTOR's shared ones) gets cfg.afno_spectral and the DFT matrices
        of the training token grid; called at the end of each model's __init__, after all blocks exist."""
        from .afno import SpectralMixing

        for m in self.modules():
            if isinstance(m, SpectralMixing):
                m.set_mode(self.cfg.afno_spectral, self.cfg.grid)

    def check_input(self, x: torch.Tensor, channel_mask: torch.Tensor | None) -> None:
        c = self.cfg
        if x.dim() != 5 or x.shape[3] != c.t_in or x.shape[4] != c.in_channels:
            raise ValueError(f"model input x must be [B, X, Y, t_in={c.t_in}, C={c.in_channels}], got {tuple(x.shape)}")
        if channel_mask is not None and tuple(channel_mask.shape) != (x.shape[0], c.c_out):
            raise ValueError(f"channel_mask must be [B={x.shape[0]}, C_out={c.c_out}], got {tuple(channel_mask.shape)}")

    def finish(
        self, z_BDHW: torch.Tensor, channel_mask: torch.Tensor | None, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head on the token field; padded channels predicted as exactly 0 (they carry no physics).

        With ``predict_residual`` the head predicts the change from the last input frame (every predicted frame is
        last frame + head output): the network starts at the persistence forecast instead of at zero.
        """
        pred = self.head(z_BDHW)
        if self.cfg.predict_residual:
            pred = pred + x[..., -1:, :].to(pred.dtype)
        if channel_mask is not None:
            pred = pred * channel_mask.to(pred.dtype)[:, None, None, None, :]
        cls = self.cls_head(z_BDHW.mean(dim=(2, 3))) if self.cls_head is not None else None
        return pred, cls

    @torch.no_grad()
    def rollout(self, x: torch.Tensor, steps: int, channel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Autoregressive forecast [B, X, Y, steps, C]: predictions slide into the T_in window."""
        if self.cfg.c_out != self.cfg.in_channels:
            raise ValueError(
                f"rollout needs out_channels == in_channels, got {self.cfg.c_out} != {self.cfg.in_channels}"
            )
        was_training = self.training
        self.eval()
        try:
            window, preds, done = x, [], 0
            while done < steps:
                p = self(window, channel_mask).pred
                preds.append(p)
                done += p.shape[3]
                window = torch.cat([window, p.to(window.dtype)], dim=3)[:, :, :, -self.cfg.t_in :]
            return torch.cat(preds, dim=3)[:, :, :, :steps]
        finally:
            self.train(was_training)


class NestorBlock(nn.Module):
    """x = x + ImageMoE(GroupNorm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, cfg.width)
        self.moe = ImageMoE(cfg)

    def forward(self, x_BDHW: torch.Tensor):
        o = self.moe(self.norm(x_BDHW))
        return x_BDHW + o.out_BDHW, o


class Nestor(ForecastModel):
    """Nested MoE neural operator (image-level MoE of attention experts with token-level Sub-MoEs)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self._init_common(cfg)
        self.blocks = nn.ModuleList(NestorBlock(cfg) for _ in range(cfg.depth))
        self.configure_spectral()

    def forward(self, x: torch.Tensor, channel_mask: torch.Tensor | None = None) -> ModelOutput:
        self.check_input(x, channel_mask)
        z = self.encoder(x)
        aux = {k: z.new_zeros((), dtype=torch.float32) for k in AUX_KEYS}
        routing: list[BlockRouting] = []
        for blk in self.blocks:
            z, o = blk(z)
            aux["image_lb"] = aux["image_lb"] + o.image_lb
            aux["token_lb"] = aux["token_lb"] + o.token_lb
            aux["token_z"] = aux["token_z"] + o.token_z
            routing.append(o.routing)
        pred, cls = self.finish(z, channel_mask, x)
        return ModelOutput(pred, aux, routing, cls)
