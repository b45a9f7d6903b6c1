"""What every PDE solver of the synthetic corpus shares: the `Simulation` result, per-trajectory random
generators, record-time marching with adaptive substeps, and random initial fields.

Shape legend: R trajectories, T recorded frames (including t = 0), X, Y grid points, C channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm


@dataclass
class Simulation:
    """Solver output, independent of any file layout.

    ``fields_RTXYC[r, t, i, j, c]`` is channel c of trajectory r at time ``t_T[t]`` and point
    ``(x_X[i], y_Y[j])``; frame 0 is the initial condition. ``primary`` names the channels that are the
    dataset's own state (e.g. vorticity for ``ns``, whose velocity channels are derived).
    ``params`` holds scalar PDE parameters; ``per_sample`` holds [R] arrays (seeds, dam radii...).
    """

    pde: str
    fields_RTXYC: np.ndarray
    channels: list[str]
    primary: list[str]
    x_X: np.ndarray
    y_Y: np.ndarray
    t_T: np.ndarray
    params: dict[str, float | str]
    per_sample: dict[str, np.ndarray] = field(default_factory=dict)
    boundary: str = "periodic"

    def channel(self, name: str) -> np.ndarray:
        """[R, T, X, Y] view of one named channel."""
        if name not in self.channels:
            raise KeyError(f"{self.pde}: no channel {name!r} (have {self.channels})")
        return self.fields_RTXYC[..., self.channels.index(name)]


def sample_rngs(seed: int, n: int) -> list[np.random.Generator]:
    """One independent generator per trajectory, so trajectory i depends on (seed, i) only, not on n."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def check_finite(state: np.ndarray, pde: str, t: float) -> None:
    """FloatingPointError for a state that blew up, naming the PDE and the time."""
    if not np.all(np.isfinite(state)):
        raise FloatingPointError(f"{pde}: non-finite state at t={t:.4g} (unstable parameters?)")


def march(
    state: np.ndarray,
    record_interval: float,
    n_records: int,
    max_dt: Callable[[np.ndarray], float],
    step: Callable[[np.ndarray, float], np.ndarray],
    observe: Callable[[np.ndarray], np.ndarray],
    pde: str,
    bar: tqdm | None,
) -> list[np.ndarray]:
    """Advance ``state`` to times k * record_interval (k = 1..n_records) with adaptive substeps.

    Substeps are ``min(max_dt(state), time left to the next record)`` so every record lands exactly on its
    time; returns the observed frames, the initial one first.
    """
    frames = [observe(state)]
    t = 0.0
    for k in range(1, n_records + 1):
        t_rec = k * record_interval
        while t_rec - t > 1e-12 * max(1.0, t_rec):
            dt = min(max_dt(state), t_rec - t)
            if not dt > 0.0 or not math.isfinite(dt):
                raise FloatingPointError(f"{pde}: time step collapsed (dt={dt}) at t={t:.4g}")
            state = step(state, dt)
            t += dt
        check_finite(state, pde, t_rec)
        frames.append(observe(state))
        if bar is not None:
            bar.update(1)
    return frames


def grf_2d(rng: np.random.Generator, res: int, alpha: float = 2.5, tau: float = 7.0) -> np.ndarray:
    """Periodic Gaussian random field on the unit square with covariance (-lap + tau^2)^(-alpha).

    Spectral coefficients are complex normal scaled by ``sqrt(2) * sigma * (4 pi^2 |k|^2 + tau^2)^(-alpha/2)``,
    ``sigma = tau^(alpha - 1)``, mean mode zero, and the real part of the inverse FFT is taken (times res^2
    to undo the 1/res^2 of the inverse transform), as in the FNO data generator.
    """
    k = np.fft.fftfreq(res, d=1.0 / res)
    kx, ky = np.meshgrid(k, k, indexing="ij")
    sigma = tau ** (0.5 * (2 * alpha - 2))
    sqrt_eig = res**2 * math.sqrt(2.0) * sigma * (4 * math.pi**2 * (kx**2 + ky**2) + tau**2) ** (-alpha / 2)
    sqrt_eig[0, 0] = 0.0
    xi = rng.standard_normal((res, res)) + 1j * rng.standard_normal((res, res))
    return np.real(np.fft.ifft2(sqrt_eig * xi))


def smooth_random_field(rng: np.random.Generator, res: int, modes: int) -> np.ndarray:
    """Periodic field from random Fourier modes |k| <= modes, zero mean, scaled to max |value| = 1."""
    coef = np.zeros((res, res), dtype=complex)
    for kx in range(-modes, modes + 1):
        for ky in range(-modes, modes + 1):
            if 0 < kx * kx + ky * ky <= modes * modes:
                coef[kx % res, ky % res] = rng.standard_normal() + 1j * rng.standard_normal()
    f = np.real(np.fft.ifft2(coef))
    return f / max(np.abs(f).max(), 1e-12)


def cell_centres(lo: float, hi: float, res: int) -> np.ndarray:
    """Centres of `res` equal cells on [lo, hi] (finite-volume grids)."""
    dx = (hi - lo) / res
    return lo + dx * (np.arange(res) + 0.5)
