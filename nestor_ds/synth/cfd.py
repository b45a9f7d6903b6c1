"""2D compressible Navier-Stokes (PDEBench CFD "Rand"): conserved (rho, rho u, rho v, E) on the periodic unit
square, the finite-volume scheme of finite_volume.py plus the viscous stress of shear viscosity eta and bulk
viscosity zeta.

Shape legend: R trajectories, T recorded frames (including t = 0), X, Y grid points, C channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from nestor_ds.synth.common import march, smooth_random_field
from nestor_ds.synth.finite_volume import fv_divergence, ssp_rk2

STABILITY = "CFL: dt <= cfl * dx / max(|u| + c) (cfl=0.4); viscous: dt <= 0.8 * dx^2 * rho_min / (4 (4/3 eta + zeta))"


@dataclass
class CFDConfig:
    """PDEBench 2D CFD 'Rand': periodic unit square, t in [0, 1] with 21 frames -> record every 0.05."""

    M: float = 0.1
    eta: float = 1e-2
    zeta: float = 1e-2
    gamma: float = 5.0 / 3.0
    record_interval: float = 0.05
    cfl: float = 0.4
    modes: int = 4  # random initial fields use Fourier modes |k| <= modes
    density_amp: float = 0.3
    pressure_amp: float = 0.3


RHO_FLOOR, P_FLOOR = 1e-6, 1e-6


def _ddx(a: np.ndarray, axis: int, dx: float) -> np.ndarray:
    return (np.roll(a, -1, axis=axis) - np.roll(a, 1, axis=axis)) / (2 * dx)


def solve_cfd(prim0_RCXY: np.ndarray, frames: int, cfg: CFDConfig, bar: tqdm | None = None) -> np.ndarray:
    """Integrate primitive (rho, p, u, v) initial states; returns [R, T, X, Y, 4] (density, pressure, vx, vy)."""
    res = prim0_RCXY.shape[-1]
    dx = 1.0 / res
    gm1 = cfg.gamma - 1.0
    mu_eff = 4.0 / 3.0 * cfg.eta + cfg.zeta

    def primitive(U: np.ndarray) -> tuple[np.ndarray, ...]:
        rho = np.maximum(U[:, 0], RHO_FLOOR)
        u, v = U[:, 1] / rho, U[:, 2] / rho
        p = np.maximum(gm1 * (U[:, 3] - 0.5 * rho * (u * u + v * v)), P_FLOOR)
        return rho, u, v, p

    def flux(U: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        rho, u, v, p = primitive(U)
        un = u if axis == 2 else v
        F = np.stack([rho * un, U[:, 1] * un, U[:, 2] * un, (U[:, 3] + p) * un], axis=1)
        F[:, axis - 1] += p
        return F, np.abs(un) + np.sqrt(cfg.gamma * p / rho)

    def viscous(U: np.ndarray) -> np.ndarray:
        """Divergence of the viscous stress (momentum) and of stress . velocity (energy), central differences."""
        _, u, v, _ = primitive(U)
        ux, uy, vx, vy = _ddx(u, 1, dx), _ddx(u, 2, dx), _ddx(v, 1, dx), _ddx(v, 2, dx)
        div = ux + vy
        lam = cfg.zeta - 2.0 / 3.0 * cfg.eta
        sxx = 2 * cfg.eta * ux + lam * div
        syy = 2 * cfg.eta * vy + lam * div
        sxy = cfg.eta * (uy + vx)
        out = np.zeros_like(U)
        out[:, 1] = _ddx(sxx, 1, dx) + _ddx(sxy, 2, dx)
        out[:, 2] = _ddx(sxy, 1, dx) + _ddx(syy, 2, dx)
        out[:, 3] = _ddx(sxx * u + sxy * v, 1, dx) + _ddx(sxy * u + syy * v, 2, dx)
        return out

    def rhs(U: np.ndarray) -> np.ndarray:
        r = fv_divergence(U, (dx, dx), flux, "periodic", (1, 2))
        return r + viscous(U) if mu_eff > 0 else r

    def max_dt(U: np.ndarray) -> float:
        rho, u, v, p = primitive(U)
        speed = float(np.max(np.maximum(np.abs(u), np.abs(v)) + np.sqrt(cfg.gamma * p / rho)))
        dt = cfg.cfl * dx / speed
        if mu_eff > 0:
            dt = min(dt, 0.8 * dx * dx * float(rho.min()) / (4 * mu_eff))
        return dt

    def fix(U: np.ndarray) -> np.ndarray:
        U[:, 0] = np.maximum(U[:, 0], RHO_FLOOR)
        return U

    def observe(U: np.ndarray) -> np.ndarray:
        rho, u, v, p = primitive(U)
        return np.stack([rho, p, u, v], axis=-1)

    rho, p, u, v = (prim0_RCXY[:, i] for i in range(4))
    U0 = np.stack([rho, rho * u, rho * v, p / gm1 + 0.5 * rho * (u * u + v * v)], axis=1)
    step = lambda U, dt: ssp_rk2(U, dt, rhs, fix)  # noqa: E731
    return np.stack(march(U0, cfg.record_interval, frames - 1, max_dt, step, observe, "cfd", bar), axis=1)


def cfd_initial(rngs: list[np.random.Generator], res: int, cfg: CFDConfig) -> np.ndarray:
    """Random smooth (rho, p, u, v) around rho = p = 1; velocity scaled to Mach number M of the mean state."""
    c0 = math.sqrt(cfg.gamma)  # sound speed of rho = p = 1
    out = []
    for rng in rngs:
        rho = 1.0 + cfg.density_amp * smooth_random_field(rng, res, cfg.modes)
        p = 1.0 + cfg.pressure_amp * smooth_random_field(rng, res, cfg.modes)
        u = smooth_random_field(rng, res, cfg.modes)
        v = smooth_random_field(rng, res, cfg.modes)
        scale = cfg.M * c0 / max(float(np.max(np.sqrt(u * u + v * v))), 1e-12)
        out.append(np.stack([rho, p, u * scale, v * scale]))
    return np.stack(out)
