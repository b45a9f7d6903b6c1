"""2D incompressible Navier-Stokes in vorticity form on the periodic unit square (the FNO benchmark):
dw/dt + u.grad(w) = nu lap(w) + f,  f = 0.1 (sin 2pi(x+y) + cos 2pi(x+y)),  u = (psi_y, -psi_x), -lap(psi) = w.
Pseudo-spectral with the 2/3 de-aliasing rule; the advection term is taken in the conservative form div(u w) so
the mean vorticity is conserved to round-off.

Shape legend: R trajectories, T recorded frames (including t = 0), X, Y grid points, C channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
from tqdm import tqdm

from nestor_ds.synth.common import grf_2d, march

STABILITY = (
    "advection CFL: dt <= cfl * dx / max(|u|+|v|) (cfl=0.5); diffusion is implicit (Crank-Nicolson) "
    "or exact (integrating-factor RK4), so unconditionally stable"
)


@dataclass
class NSConfig:
    """FNO Navier-Stokes. FNO records every 1 time unit; its GRF uses alpha=2.5, tau=7."""

    visc: float = 1e-3
    record_interval: float = 1.0
    forcing: bool = True
    time_scheme: str = "cn"  # "cn": Heun advection + Crank-Nicolson diffusion; "rk4": integrating-factor RK4
    cfl: float = 0.5
    dt_max: float = 1e-2
    grf_alpha: float = 2.5
    grf_tau: float = 7.0


class SpectralNS:
    """Pseudo-spectral vorticity solver on [0, 1)^2 for a batch of fields w_RXY (y is the rfft axis)."""

    def __init__(self, res: int, cfg: NSConfig):
        self.res, self.cfg = res, cfg
        kint_x = np.fft.fftfreq(res, d=1.0 / res)
        kint_y = np.fft.rfftfreq(res, d=1.0 / res)
        kx, ky = np.meshgrid(2 * math.pi * kint_x, 2 * math.pi * kint_y, indexing="ij")
        self.ikx, self.iky = 1j * kx, 1j * ky
        self.k2 = kx**2 + ky**2
        inv = np.zeros_like(self.k2)
        inv[self.k2 > 0] = 1.0 / self.k2[self.k2 > 0]
        self.inv_k2 = inv  # psi_hat = w_hat / |k|^2 (mean mode dropped)
        # 2/3 rule: keep |k| <= res/3 in each direction
        ix, iy = np.meshgrid(np.abs(kint_x), kint_y, indexing="ij")
        self.dealias = ((ix <= res / 3) & (iy <= res / 3)).astype(float)
        x = np.arange(res) / res
        X, Y = np.meshgrid(x, x, indexing="ij")
        f = 0.1 * (np.sin(2 * math.pi * (X + Y)) + np.cos(2 * math.pi * (X + Y)))
        self.f_hat = self.fft(f) if cfg.forcing else np.zeros_like(self.k2, dtype=complex)
        self.dx = 1.0 / res

    def fft(self, a: np.ndarray) -> np.ndarray:
        return sfft.rfft2(a, axes=(-2, -1), workers=1)

    def ifft(self, a_hat: np.ndarray) -> np.ndarray:
        return sfft.irfft2(a_hat, s=(self.res, self.res), axes=(-2, -1), workers=1)

    def velocity(self, w_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """u = d psi / dy, v = -d psi / dx with -lap(psi) = w."""
        psi_hat = w_hat * self.inv_k2
        return self.ifft(self.iky * psi_hat), self.ifft(-self.ikx * psi_hat)

    def rhs(self, w_hat: np.ndarray) -> np.ndarray:
        """Spectral -div(u w) + f, de-aliased. The zero mode is exactly zero (k = 0 multiplies it)."""
        u, v = self.velocity(w_hat)
        w = self.ifft(w_hat)
        adv = self.ikx * self.fft(u * w) + self.iky * self.fft(v * w)
        return self.dealias * (self.f_hat - adv)

    def max_dt(self, w_hat: np.ndarray) -> float:
        u, v = self.velocity(w_hat)
        speed = float(np.max(np.abs(u) + np.abs(v)))
        return min(self.cfg.dt_max, self.cfg.cfl * self.dx / max(speed, 1e-12))

    def step(self, w_hat: np.ndarray, dt: float) -> np.ndarray:
        nu_k2 = self.cfg.visc * self.k2
        if self.cfg.time_scheme == "cn":
            # Heun predictor-corrector for advection/forcing, Crank-Nicolson for diffusion
            a, b = 1.0 - 0.5 * dt * nu_k2, 1.0 / (1.0 + 0.5 * dt * nu_k2)
            n0 = self.rhs(w_hat)
            w_star = (a * w_hat + dt * n0) * b
            return (a * w_hat + 0.5 * dt * (n0 + self.rhs(w_star))) * b
        if self.cfg.time_scheme == "rk4":
            # integrating-factor RK4: diffusion integrated exactly by exp(-nu k^2 t)
            e_half = np.exp(-0.5 * dt * nu_k2)
            e_full = e_half * e_half
            k1 = self.rhs(w_hat)
            k2 = self.rhs(e_half * (w_hat + 0.5 * dt * k1))
            k3 = self.rhs(e_half * w_hat + 0.5 * dt * k2)
            k4 = self.rhs(e_full * w_hat + dt * e_half * k3)
            return e_full * w_hat + dt / 6.0 * (e_full * k1 + 2.0 * e_half * (k2 + k3) + k4)
        raise ValueError(f"ns: unknown time_scheme {self.cfg.time_scheme!r} (use 'cn' or 'rk4')")

    def observe(self, w_hat: np.ndarray) -> np.ndarray:
        """[R, X, Y, 3]: vorticity, vx, vy."""
        u, v = self.velocity(w_hat)
        return np.stack([self.ifft(w_hat), u, v], axis=-1)


def solve_ns(w0_RXY: np.ndarray, frames: int, cfg: NSConfig, bar: tqdm | None = None) -> np.ndarray:
    """Integrate initial vorticities; returns [R, T, X, Y, 3] (vorticity, vx, vy), frame 0 = w0."""
    solver = SpectralNS(w0_RXY.shape[-1], cfg)
    w_hat = solver.dealias * solver.fft(w0_RXY)
    out = march(w_hat, cfg.record_interval, frames - 1, solver.max_dt, solver.step, solver.observe, "ns", bar)
    return np.stack(out, axis=1)


def ns_initial(rngs: list[np.random.Generator], res: int, cfg: NSConfig) -> np.ndarray:
    return np.stack([grf_2d(r, res, cfg.grf_alpha, cfg.grf_tau) for r in rngs])
