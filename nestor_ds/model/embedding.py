"""Input encoding (DPOT's): grid channels, per-frame patch embedding, positional embedding,
temporal aggregation of the T_in frames into one token field, and the output head.

Shape legend: B samples, X, Y grid, T frames (T_in inputs), C channels, D width, H, W token grid (X/patch,
Y/patch), L = H*W tokens per sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def append_grid(x_BXYTC: torch.Tensor) -> torch.Tensor:
    """Append normalised (x, y, t) coordinates in [0, 1] as 3 extra channels -> [B, X, Y, T, C+3]."""
    B, X, Y, T, _ = x_BXYTC.shape
    dev, dt = x_BXYTC.device, x_BXYTC.dtype
    gx = torch.linspace(0, 1, X, device=dev, dtype=dt).view(1, X, 1, 1, 1).expand(B, X, Y, T, 1)
    gy = torch.linspace(0, 1, Y, device=dev, dtype=dt).view(1, 1, Y, 1, 1).expand(B, X, Y, T, 1)
    gt = torch.linspace(0, 1, T, device=dev, dtype=dt).view(1, 1, 1, T, 1).expand(B, X, Y, T, 1)
    return torch.cat([x_BXYTC, gx, gy, gt], dim=-1)


class PatchEmbed(nn.Module):
    """Per-frame patch embedding: conv(k = stride = patch) -> GELU -> 1x1 conv to width D."""

    def __init__(self, in_ch: int, hidden: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_ch, hidden, patch, stride=patch), nn.GELU(), nn.Conv2d(hidden, dim, 1))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """[B*T, C, X, Y] (every frame of every sample) -> [B*T, D, H, W]."""
        return self.proj(frames)


class PositionalEmbedding(nn.Module):
    """Learned [1, D, H, W] table; bicubically resized when the token grid differs from training."""

    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.empty(1, dim, grid, grid))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, h: int, w: int) -> torch.Tensor:
        if self.pos.shape[-2:] == (h, w):
            return self.pos
        return F.interpolate(self.pos, size=(h, w), mode="bicubic", align_corners=False)


class TemporalAggregation(nn.Module):
    """DPOT's "exp_mlp": z = sum_t W_t (x_t * cos(tau_t * gamma)), tau_t = t / (T-1), W_t in R^{DxD}.

    gamma spans 2^-10 .. 2^10 so that the cosine features resolve both slow and fast time scales.
    The sum over t and the T matmuls run as one [..., T*D] x [T*D, D] matmul.
    """

    def __init__(self, t_in: int, dim: int) -> None:
        super().__init__()
        self.t_in = t_in
        self.w_TDD = nn.Parameter(torch.randn(t_in, dim, dim) / (t_in * math.sqrt(dim)))
        self.gamma_D = nn.Parameter(2.0 ** torch.linspace(-10, 10, dim))

    def forward(self, x_BLTD: torch.Tensor) -> torch.Tensor:
        """[B, L, T, D] token features per input frame -> [B, L, D] (any leading dims)."""
        T, D = x_BLTD.shape[-2:]
        if T != self.t_in:
            raise ValueError(f"temporal aggregation: input has T={T} frames, the model was built for t_in={self.t_in}")
        # cos(tau * gamma) in fp32: gamma reaches 2^10, where bf16 phases are meaningless
        tau_T = torch.linspace(0, 1, T, device=x_BLTD.device, dtype=torch.float32)
        feat_TD = torch.cos(tau_T[:, None] * self.gamma_D.float()[None, :]).to(x_BLTD.dtype)
        return (x_BLTD * feat_TD).reshape(*x_BLTD.shape[:-2], T * D) @ self.w_TDD.reshape(T * D, D)


class OutputHead(nn.Module):
    """DPOT's head: transposed conv back to the grid -> GELU -> 1x1 -> GELU -> 1x1 to T_ar*C_out."""

    def __init__(self, dim: int, hidden: int, patch: int, t_ar: int, c_out: int) -> None:
        super().__init__()
        self.t_ar, self.c_out = t_ar, c_out
        self.net = nn.Sequential(
            nn.ConvTranspose2d(dim, hidden, patch, stride=patch),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.GELU(),
            nn.Conv2d(hidden, t_ar * c_out, 1),
        )

    def forward(self, z_BDHW: torch.Tensor) -> torch.Tensor:
        y = self.net(z_BDHW)  # [B, T_ar*C, X, Y]
        B, _, X, Y = y.shape
        return y.view(B, self.t_ar, self.c_out, X, Y).permute(0, 3, 4, 1, 2)  # [B, X, Y, T_ar, C]


class Encoder(nn.Module):
    """[B, X, Y, T_in, C] -> token field [B, D, H, W] (grid channels, patches, positions, time)."""

    def __init__(
        self, in_channels: int, embed_hidden: int, dim: int, patch: int, grid: int, t_in: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.patch = patch
        self.patch_embed = PatchEmbed(in_channels + 3, embed_hidden, dim, patch)
        self.pos_embed = PositionalEmbedding(dim, grid)
        self.time_agg = TemporalAggregation(t_in, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BXYTC: torch.Tensor) -> torch.Tensor:
        B, X, Y, T, _ = x_BXYTC.shape
        if X % self.patch or Y % self.patch:
            raise ValueError(f"encoder: grid {X}x{Y} is not divisible by patch_size={self.patch}")
        x = append_grid(x_BXYTC)
        x = x.permute(0, 3, 4, 1, 2).reshape(B * T, -1, X, Y)  # frames as batch
        z = self.patch_embed(x)  # [B*T, D, H, W]
        D, H, W = z.shape[1:]
        z = z + self.pos_embed(H, W)
        z = self.time_agg(z.view(B, T, D, H * W).permute(0, 3, 1, 2))  # [B, L, T, D] -> [B, L, D]
        z = z.view(B, H, W, D).permute(0, 3, 1, 2).contiguous()
        return self.drop(z)
