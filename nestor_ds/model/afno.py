"""AFNO (adaptive Fourier neural operator) block, as in DPOT.

Spectral mixing: z = irfft2( S_lambda( MLP_c( rfft2(x) restricted to the first `modes` rows and columns ) ) ),
as DPOT does (rows k_x = 0..modes-1 of the FFT layout, columns k_y = 0..modes-1 of the half spectrum), where MLP_c is a
two-layer complex MLP that is block-diagonal over channels (num_blocks blocks of D/num_blocks) and
S_lambda is soft-shrinkage (sparsity in frequency). Modes outside the kept band are zeroed.
The complex products run as real matmuls on [Re, Im] with the 2x2 real form [[Wr, Wi], [-Wi, Wr]],
one batched matmul per layer instead of DPOT's four einsums (same FLOPs, fewer kernel calls). The Fourier
transforms are complex-free (nestor_ds.model.spectral): real DFT matmuls ("dft") or fp32 FFT islands ("fft"),
so the block compiles with torch.compile and runs in bf16 (ModelConfig.afno_spectral).

Block: x = x + Spectral(GN(x)); x = x + MLP(GN(x)) with a 1x1-conv MLP.
(DPOT also adds GN(x) inside its filter; here the block keeps one residual per sub-layer.)

Shape legend: B samples, D width, H, W token grid, Kx, Ky kept Fourier modes (along H, W). The block-diagonal MLP's
weights are [2 (re, im), nb blocks, in, out] (no letters: blocks are not a shape of the project legend).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .spectral import DFT_MATRICES, SPECTRAL_MODES, dft_forward_modes, dft_inverse_modes, dft_matrices, kept_modes


def complex_block(w: torch.Tensor) -> torch.Tensor:
    """[2, nb, in, out] (real, imag) -> real block matrix [nb, 2 in, 2 out] acting on [Re, Im] rows."""
    wr, wi = w[0], w[1]
    return torch.cat([torch.cat([wr, wi], dim=-1), torch.cat([-wi, wr], dim=-1)], dim=-2)


def interleaved_left(w: torch.Tensor) -> torch.Tensor:
    """complex_block as a left factor [nb, 2O, 2I] on channels ordered (channel, re/im), i.e. interleaved."""
    nb, i, o = w.shape[1:]
    blk = complex_block(w).view(nb, 2, i, 2, o).permute(0, 2, 1, 4, 3).reshape(nb, 2 * i, 2 * o)
    return blk.transpose(1, 2)


class SpectralMixing(nn.Module):
    """Block-diagonal complex MLP on the lowest `modes` Fourier modes of a [B, D, H, W] field.

    The transforms come from nestor_ds.model.spectral (``spectral = "dft" | "fft"``, no complex tensors either
    way); the MLP runs channels-first on the [B, nb, bs * 2, Kx * Ky] layout they produce, so there is no permute
    between the transforms and the MLP. "fft" keeps the whole spectral path in fp32 (cuFFT has no bf16);
    "dft" runs it in the input dtype. ``set_grid`` precomputes the DFT matrices of the training token grid as
    non-persistent buffers (not in the state_dict: checkpoints are the same for both modes).
    """

    def __init__(
        self,
        dim: int,
        num_blocks: int = 4,
        modes: int = 32,
        sparsity: float = 0.01,
        hidden_factor: int = 1,
        scale: float = 0.02,
        spectral: str = "dft",
    ) -> None:
        super().__init__()
        if dim % num_blocks:
            raise ValueError(f"AFNO: width {dim} not divisible by num_blocks={num_blocks}")
        self.dim, self.nb, self.bs = dim, num_blocks, dim // num_blocks
        self.modes, self.sparsity = modes, sparsity
        hid = self.bs * hidden_factor
        self.w1 = nn.Parameter(scale * torch.randn(2, num_blocks, self.bs, hid))
        self.b1 = nn.Parameter(scale * torch.randn(2, num_blocks, hid))
        self.w2 = nn.Parameter(scale * torch.randn(2, num_blocks, hid, self.bs))
        self.b2 = nn.Parameter(scale * torch.randn(2, num_blocks, self.bs))
        self.spectral = spectral
        self.grid: tuple[int, int] | None = None

    def set_mode(self, spectral: str, grid: int | None) -> None:
        """Choose the transform and precompute the DFT matrices for a grid x grid token field."""
        if spectral not in SPECTRAL_MODES:
            raise ValueError(f"AFNO: spectral={spectral!r} not in {SPECTRAL_MODES}")
        self.spectral = spectral
        for name in DFT_MATRICES:
            self._buffers.pop(name, None)
        self.grid = None
        if spectral == "dft" and grid:
            kx, ky = kept_modes(grid, grid, self.modes)
            for name, t in dft_matrices(grid, grid, kx, ky, device=self.w1.device).items():
                self.register_buffer(name, t, persistent=False)
            self.grid = (grid, grid)

    def _dft_mats(self, h: int, w: int, device: torch.device) -> dict[str, torch.Tensor]:
        if self.grid == (h, w):
            return {name: getattr(self, name) for name in DFT_MATRICES}
        return dft_matrices(h, w, *kept_modes(h, w, self.modes), device=device)  # another grid (evaluation)

    @staticmethod
    def _bias(b: torch.Tensor) -> torch.Tensor:
        """[2, nb, out] -> [nb, 2 out, 1], channels interleaved (o, re/im)."""
        return b.permute(1, 2, 0).reshape(b.shape[1], -1, 1)

    def forward(self, x_BDHW: torch.Tensor) -> torch.Tensor:
        B, D, H, W = x_BDHW.shape
        Kx, Ky = kept_modes(H, W, self.modes)
        if self.spectral == "fft":
            xk_BD2KxKy = torch.ops.nestor.rfft2_modes(x_BDHW, Kx, Ky)  # fp32
        else:
            mats = self._dft_mats(H, W, x_BDHW.device)
            xk_BD2KxKy = dft_forward_modes(x_BDHW, mats)
        dt = xk_BD2KxKy.dtype
        h = xk_BD2KxKy.view(B, self.nb, self.bs * 2, Kx * Ky)  # channels (c, re/im) interleaved
        h = F.gelu(interleaved_left(self.w1.to(dt)) @ h + self._bias(self.b1.to(dt)))
        h = interleaved_left(self.w2.to(dt)) @ h + self._bias(self.b2.to(dt))
        h = F.softshrink(h, self.sparsity) if self.sparsity > 0 else h
        yk_BD2KxKy = h.reshape(B, D, 2, Kx, Ky)
        if self.spectral == "fft":
            y_BDHW = torch.ops.nestor.irfft2_modes(yk_BD2KxKy, H, W)
        else:
            y_BDHW = dft_inverse_modes(yk_BD2KxKy, mats)
        return y_BDHW.to(x_BDHW.dtype)


class ConvMLP(nn.Module):
    """Pointwise MLP on a [B, D, H, W] field: 1x1 conv -> GELU -> 1x1 conv."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class AFNOBlock(nn.Module):
    """x = x + Spectral(GN(x)); x = x + MLP(GN(x))."""

    def __init__(
        self,
        dim: int,
        num_blocks: int = 4,
        modes: int = 32,
        mlp_ratio: float = 1.0,
        sparsity: float = 0.01,
        norm_groups: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, dim)
        self.filter = SpectralMixing(dim, num_blocks, modes, sparsity)
        self.norm2 = nn.GroupNorm(norm_groups, dim)
        self.mlp = ConvMLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x_BDHW: torch.Tensor) -> torch.Tensor:
        x = x_BDHW + self.filter(self.norm1(x_BDHW))
        return x + self.mlp(self.norm2(x))


def afno_stack(cfg: ModelConfig, n: int) -> nn.Sequential:
    """`n` AFNO blocks as the model config sets them: the baseline's body and NESTOR's shared global expert."""
    args = (cfg.width, cfg.afno_num_blocks, cfg.afno_modes, cfg.afno_mlp_ratio, cfg.afno_sparsity, cfg.norm_groups)
    return nn.Sequential(*(AFNOBlock(*args, cfg.dropout) for _ in range(n)))
