"""Evaluation metrics, per sample and channel, masked to the real channels.

Shape legend: B samples, X, Y grid, T frames (rollout steps), C channels (padded), Nb wavenumber bands.
Every function returns per-sample, per-channel values (the paper's L2RE is "per sample and channel,
averaged"); `masked_mean` then averages over the real channels only, so padding channels (all-zero
truth, 0/0 error) never enter a reported number.

L2RE(pred, true) = ||pred - true||_2 / ||true||_2, the norm over the grid (and over the frames when a
metric spans several frames).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS = 1e-12  # guards 0/0 on an all-zero truth (padding channels, which the mask then drops)


def _check_pair(pred: torch.Tensor, true: torch.Tensor, channel_mask: torch.Tensor | None) -> None:
    """One-line errors naming the shapes: these metrics take [B, X, Y, T, C] pairs and a [B, C] mask."""
    if pred.shape != true.shape or pred.dim() != 5:
        raise ValueError(f"metrics: pred {tuple(pred.shape)} and true {tuple(true.shape)} must both be [B, X, Y, T, C]")
    if channel_mask is not None and tuple(channel_mask.shape) != (pred.shape[0], pred.shape[-1]):
        raise ValueError(
            f"metrics: channel_mask {tuple(channel_mask.shape)} must be [B, C] = {(pred.shape[0], pred.shape[-1])}"
        )


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """sqrt with a finite gradient at 0 (a perfectly predicted or zeroed padding channel must not give NaN grads)."""
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def l2re(pred: torch.Tensor, true: torch.Tensor, channel_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Relative L2 error over grid and frames: [B, X, Y, T, C] pair -> [B, C] (float64).

    Masked-out channels are set to 0 (use `masked_mean` to average over the real ones).
    """
    _check_pair(pred, true, channel_mask)
    diff = _safe_sqrt((pred.double() - true.double()).square().sum(dim=(1, 2, 3)))
    norm = true.double().square().sum(dim=(1, 2, 3)).sqrt()
    err_BC = diff / norm.clamp_min(EPS)
    return err_BC if channel_mask is None else err_BC * channel_mask.to(err_BC.dtype)


def l2re_per_step(pred: torch.Tensor, true: torch.Tensor, channel_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Relative L2 error of each frame separately: [B, X, Y, T, C] pair -> [B, T, C] (the rollout error curve)."""
    _check_pair(pred, true, channel_mask)
    diff = (pred.double() - true.double()).square().sum(dim=(1, 2)).sqrt()
    norm = true.double().square().sum(dim=(1, 2)).sqrt()
    err_BTC = diff / norm.clamp_min(EPS)
    return err_BTC if channel_mask is None else err_BTC * channel_mask[:, None, :].to(err_BTC.dtype)


def masked_mean(values: torch.Tensor, channel_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-sample-and-channel `values` [B, ..., C] over samples and real channels -> [...].

    Channels with mask False do not count; when no channel is real the result is NaN (nothing measured).
    """
    if channel_mask is None:
        channel_mask = torch.ones(values.shape[0], values.shape[-1], dtype=torch.bool, device=values.device)
    w = channel_mask.to(values.dtype).reshape(values.shape[0], *([1] * (values.dim() - 2)), values.shape[-1])
    total = (values * w).sum(dim=0).sum(dim=-1)
    count = w.sum(dim=0).sum(dim=-1)
    return total / count


# --- energy spectrum ------------------------------------------------------------------------------


@dataclass
class SpectrumConfig:
    """Radially binned energy spectrum and its error per wavenumber band.

    Bands split (0, k_nyquist] into `n_bands` equal parts (3: low / mid / high thirds). The mean (k=0)
    is left out by default: its error is the L2RE's business, and it would swamp the low band.
    """

    n_bands: int = 3
    include_dc: bool = False
    band_names: tuple[str, ...] = ("low", "mid", "high")

    def names(self) -> list[str]:
        """Band labels: the given names when there are enough, else band0, band1, ..."""
        if len(self.band_names) == self.n_bands:
            return list(self.band_names)
        return [f"band{i}" for i in range(self.n_bands)]


def radial_wavenumber(nx: int, ny: int, device: torch.device | None = None) -> torch.Tensor:
    """Integer radial wavenumber |k| = round(sqrt(kx^2 + ky^2)) of every rfft2 coefficient: [X, Y//2+1] long."""
    kx = torch.fft.fftfreq(nx, d=1.0 / nx, device=device)
    ky = torch.fft.rfftfreq(ny, d=1.0 / ny, device=device)
    return torch.sqrt(kx[:, None] ** 2 + ky[None, :] ** 2).round().long()


def energy_spectrum(field: torch.Tensor) -> torch.Tensor:
    """Radially binned |FFT|^2 of [B, X, Y, T, C] fields, averaged over frames -> [B, k_max+1, C] (float64).

    Uses rfft2 over (X, Y) and counts each coefficient with kx-conjugate weight 2 (ky > 0 and below
    the Nyquist column) so the sum over bins equals the full-FFT energy (Parseval). Bins beyond
    k_max = min(X, Y)//2 (the corners of the square spectrum) are dropped: they are not resolved
    in every direction.
    """
    B, nx, ny, T, C = field.shape
    f_hat = torch.fft.rfft2(field.double(), dim=(1, 2), norm="forward")  # [B, X, Y//2+1, T, C]
    power = f_hat.real.square() + f_hat.imag.square()
    weight = torch.full((ny // 2 + 1,), 2.0, dtype=torch.float64, device=field.device)
    weight[0] = 1.0
    if ny % 2 == 0:
        weight[-1] = 1.0
    power = power * weight[None, None, :, None, None]
    k_max = min(nx, ny) // 2
    k = radial_wavenumber(nx, ny, field.device).reshape(-1)
    keep = k <= k_max
    flat = power.mean(dim=3).reshape(B, nx * (ny // 2 + 1), C)[:, keep]  # [B, M, C]
    spec = torch.zeros(B, k_max + 1, C, dtype=torch.float64, device=field.device)
    return spec.index_add_(1, k[keep], flat)


def band_edges(k_max: int, cfg: SpectrumConfig) -> list[tuple[int, int]]:
    """Inclusive integer bin ranges [lo, hi] of each band over (0, k_max] (bin 0 added to the first if include_dc)."""
    edges = []
    for i in range(cfg.n_bands):
        lo = math.floor(i * k_max / cfg.n_bands) + 1
        hi = math.floor((i + 1) * k_max / cfg.n_bands)
        edges.append((0 if (i == 0 and cfg.include_dc) else lo, hi))
    return edges


def spectrum_band_error(
    pred: torch.Tensor, true: torch.Tensor, channel_mask: torch.Tensor | None = None, cfg: SpectrumConfig | None = None
) -> torch.Tensor:
    """Energy-spectrum error per wavenumber band: [B, X, Y, T, C] pair -> [B, Nb, C] (float64).

    err_band = sum_{k in band} |E_pred(k) - E_true(k)| / sum_{k in all bands} E_true(k): an L1 distance of
    spectra (too much energy at one k and too little at another do not cancel), as a fraction of the true
    field's energy. Normalising by the whole spectrum rather than by the band keeps the number finite where the
    truth has almost no energy in a band (smooth fields at high k, where a band-relative error explodes); the
    bands' errors add up to the whole-spectrum error. A rollout that loses a band's energy scores that band's
    share of the energy; one that blows up scores >> 1.
    """
    _check_pair(pred, true, channel_mask)
    cfg = cfg or SpectrumConfig()
    e_pred, e_true = energy_spectrum(pred), energy_spectrum(true)
    k_max = e_true.shape[1] - 1
    edges = band_edges(k_max, cfg)
    first = min((lo for lo, hi in edges if hi >= lo), default=0)
    den = e_true[:, first:].sum(dim=1)
    errs = []
    for lo, hi in edges:
        if hi < lo:  # grid too coarse for this many bands
            errs.append(torch.full_like(e_true[:, 0], float("nan")))
            continue
        num = (e_pred[:, lo : hi + 1] - e_true[:, lo : hi + 1]).abs().sum(dim=1)
        errs.append(num / den.clamp_min(EPS))
    err_BNbC = torch.stack(errs, dim=1)
    return err_BNbC if channel_mask is None else err_BNbC * channel_mask[:, None, :].to(err_BNbC.dtype)
