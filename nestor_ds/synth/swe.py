"""2D shallow water radial dam break (PDEBench): conserved (h, hu, hv), finite volume with MUSCL (minmod)
reconstruction, Rusanov flux and SSP-RK2.

Shape legend: R trajectories, T recorded frames (including t = 0), X, Y grid points, C channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from nestor_ds.synth.common import cell_centres, march
from nestor_ds.synth.finite_volume import fv_divergence, ssp_rk2

STABILITY = "CFL: dt <= cfl * dx / max(|u| + sqrt(g h)) (cfl=0.4)"


@dataclass
class SWEConfig:
    """PDEBench radial dam break: domain [-2.5, 2.5]^2, h = 2 inside radius r ~ U(0.3, 0.7), 1 outside."""

    g: float = 1.0
    h_in: float = 2.0
    h_out: float = 1.0
    r_min: float = 0.3
    r_max: float = 0.7
    record_interval: float = 0.01
    bc: str = "transmissive"  # or "reflective"
    cfl: float = 0.4
    xmin: float = -2.5
    xmax: float = 2.5


H_FLOOR = 1e-6


def solve_swe(h0_RXY: np.ndarray, frames: int, cfg: SWEConfig, bar: tqdm | None = None) -> np.ndarray:
    """Integrate a dam break from rest; returns [R, T, X, Y, 3] (h, vx, vy)."""
    res = h0_RXY.shape[-1]
    dx = (cfg.xmax - cfg.xmin) / res
    g = cfg.g

    def flux(U: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        h = np.maximum(U[:, 0], H_FLOOR)
        u, v = U[:, 1] / h, U[:, 2] / h
        un = u if axis == 2 else v
        F = np.stack([h * un, U[:, 1] * un, U[:, 2] * un], axis=1)
        F[:, axis - 1] += 0.5 * g * h * h  # pressure in the normal momentum (var 1 for x, 2 for y)
        return F, np.abs(un) + np.sqrt(g * h)

    def max_dt(U: np.ndarray) -> float:
        h = np.maximum(U[:, 0], H_FLOOR)
        speed = float(np.max(np.maximum(np.abs(U[:, 1]), np.abs(U[:, 2])) / h + np.sqrt(g * h)))
        return cfg.cfl * dx / speed

    def fix(U: np.ndarray) -> np.ndarray:
        U[:, 0] = np.maximum(U[:, 0], H_FLOOR)
        return U

    rhs = lambda U: fv_divergence(U, (dx, dx), flux, cfg.bc, (1, 2))  # noqa: E731
    step = lambda U, dt: ssp_rk2(U, dt, rhs, fix)  # noqa: E731

    def observe(U: np.ndarray) -> np.ndarray:
        return np.stack([U[:, 0], U[:, 1] / U[:, 0], U[:, 2] / U[:, 0]], axis=-1)

    U0 = np.stack([h0_RXY, np.zeros_like(h0_RXY), np.zeros_like(h0_RXY)], axis=1)
    return np.stack(march(U0, cfg.record_interval, frames - 1, max_dt, step, observe, "swe", bar), axis=1)


def swe_initial(rngs: list[np.random.Generator], res: int, cfg: SWEConfig) -> tuple[np.ndarray, np.ndarray]:
    """Water column of random radius at the centre; returns (h0 [R, X, Y], radius [R])."""
    xc = cell_centres(cfg.xmin, cfg.xmax, res)
    X, Y = np.meshgrid(xc, xc, indexing="ij")
    r = np.sqrt(X**2 + Y**2)
    radii = np.array([rng.uniform(cfg.r_min, cfg.r_max) for rng in rngs])
    h0 = np.where(r[None] < radii[:, None, None], cfg.h_in, cfg.h_out).astype(float)
    return h0, radii
