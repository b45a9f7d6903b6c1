"""2D FitzHugh-Nagumo diffusion-reaction (PDEBench): du/dt = Du lap(u) + u - u^3 - k - v, dv/dt = Dv lap(v) + u - v
on [-1, 1]^2 with zero-flux (Neumann) boundaries; finite volume + Heun.

Shape legend: R trajectories, T recorded frames (including t = 0), X, Y grid points, C channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from nestor_ds.synth.common import march

STABILITY = "explicit diffusion: dt <= 0.9 * dx^2 / (4 max(Du, Dv)); reaction: dt <= 1 / max|1 - 3u^2|"


@dataclass
class DRConfig:
    """PDEBench FitzHugh-Nagumo: t in [0, 5] with 101 frames -> record every 0.05."""

    Du: float = 1e-3
    Dv: float = 5e-3
    k: float = 5e-3
    record_interval: float = 0.05
    xmin: float = -1.0
    xmax: float = 1.0


def _laplacian_neumann(a: np.ndarray, dx: float) -> np.ndarray:
    """5-point Laplacian of cell averages over the last two axes with zero-flux walls (mirror ghosts)."""
    p = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    return (p[..., 2:, 1:-1] + p[..., :-2, 1:-1] + p[..., 1:-1, 2:] + p[..., 1:-1, :-2] - 4 * a) / dx**2


def solve_dr(uv0_RCXY: np.ndarray, frames: int, cfg: DRConfig, bar: tqdm | None = None) -> np.ndarray:
    """Integrate (u, v); returns [R, T, X, Y, 2]. Heun (RK2) with the limits in ``STABILITY['dr']``."""
    res = uv0_RCXY.shape[-1]
    dx = (cfg.xmax - cfg.xmin) / res
    D = np.array([cfg.Du, cfg.Dv])[None, :, None, None]
    dt_diff = 0.9 * dx**2 / (4 * max(cfg.Du, cfg.Dv))

    def rhs(s: np.ndarray) -> np.ndarray:
        u, v = s[:, 0], s[:, 1]
        react = np.stack([u - u**3 - cfg.k - v, u - v], axis=1)
        return D * _laplacian_neumann(s, dx) + react

    def max_dt(s: np.ndarray) -> float:
        stiff = float(np.max(np.abs(1.0 - 3.0 * s[:, 0] ** 2))) + 1.0
        return min(dt_diff, 1.0 / stiff)

    def step(s: np.ndarray, dt: float) -> np.ndarray:
        k1 = rhs(s)
        k2 = rhs(s + dt * k1)
        return s + 0.5 * dt * (k1 + k2)

    out = march(uv0_RCXY, cfg.record_interval, frames - 1, max_dt, step, lambda s: np.moveaxis(s, 1, -1), "dr", bar)
    return np.stack(out, axis=1)


def dr_initial(rngs: list[np.random.Generator], res: int) -> np.ndarray:
    """Standard normal noise for (u, v): [R, 2, X, Y]."""
    return np.stack([r.standard_normal((2, res, res)) for r in rngs])
