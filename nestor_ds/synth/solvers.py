"""Seeded numerical solvers for the four PDE families of the NESTOR pre-training corpus.

Why this module exists: the public datasets are hundreds of gigabytes, so tests, demos and CI need small
files with the same physics and the same layouts. Every solver here is written from the equations:

- ``ns``  2D incompressible Navier-Stokes, vorticity form on the periodic unit square (the FNO benchmark):
  dw/dt + u.grad(w) = nu lap(w) + f,  f = 0.1 (sin 2pi(x+y) + cos 2pi(x+y)),  u = (psi_y, -psi_x),
  -lap(psi) = w. Pseudo-spectral with the 2/3 de-aliasing rule; the advection term is taken in the
  conservative form div(u w) so the mean vorticity is conserved to round-off.
- ``dr``  2D FitzHugh-Nagumo diffusion-reaction (PDEBench): du/dt = Du lap(u) + u - u^3 - k - v,
  dv/dt = Dv lap(v) + u - v on [-1, 1]^2 with zero-flux (Neumann) boundaries; finite volume + Heun.
- ``swe`` 2D shallow water radial dam break (PDEBench): conserved (h, hu, hv), finite volume with MUSCL
  (minmod) reconstruction, Rusanov flux and SSP-RK2.
- ``cfd`` 2D compressible Navier-Stokes (PDEBench CFD "Rand"): conserved (rho, rho u, rho v, E) on the
  periodic unit square, same finite-volume scheme plus the viscous stress of shear viscosity eta and
  bulk viscosity zeta.

Every solver takes fixed record times and reaches each of them with adaptive substeps that respect the
stability limit of its scheme (see ``STABILITY`` below); a non-finite state raises ``FloatingPointError``.

Shape legend: N trajectories, F recorded frames (including t = 0), X, Y grid points, C channels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import scipy.fft as sfft
from tqdm import tqdm

PDES = ("ns", "dr", "swe", "cfd")

STABILITY = {
    "ns": "advection CFL: dt <= cfl * dx / max(|u|+|v|) (cfl=0.5); diffusion is implicit (Crank-Nicolson) "
    "or exact (integrating-factor RK4), so unconditionally stable",
    "dr": "explicit diffusion: dt <= 0.9 * dx^2 / (4 max(Du, Dv)); reaction: dt <= 1 / max|1 - 3u^2|",
    "swe": "CFL: dt <= cfl * dx / max(|u| + sqrt(g h)) (cfl=0.4)",
    "cfd": "CFL: dt <= cfl * dx / max(|u| + c) (cfl=0.4); viscous: dt <= 0.8 * dx^2 * rho_min / "
    "(4 (4/3 eta + zeta))",
}


# --------------------------------------------------------------------------------------------------
# Result container
# --------------------------------------------------------------------------------------------------


@dataclass
class Simulation:
    """Solver output, independent of any file layout.

    ``fields_NFXYC[n, f, i, j, c]`` is channel c of trajectory n at time ``t_F[f]`` and point
    ``(x_X[i], y_Y[j])``; frame 0 is the initial condition. ``primary`` names the channels that are the
    dataset's own state (e.g. vorticity for ``ns``, whose velocity channels are derived).
    ``params`` holds scalar PDE parameters; ``per_sample`` holds [N] arrays (seeds, dam radii...).
    """

    pde: str
    fields_NFXYC: np.ndarray
    channels: list[str]
    primary: list[str]
    x_X: np.ndarray
    y_Y: np.ndarray
    t_F: np.ndarray
    params: dict[str, float | str]
    per_sample: dict[str, np.ndarray] = field(default_factory=dict)
    boundary: str = "periodic"

    def channel(self, name: str) -> np.ndarray:
        """[N, F, X, Y] view of one named channel."""
        if name not in self.channels:
            raise KeyError(f"{self.pde}: no channel {name!r} (have {self.channels})")
        return self.fields_NFXYC[..., self.channels.index(name)]


# --------------------------------------------------------------------------------------------------
# Configs (defaults sit next to the solvers that use them)
# --------------------------------------------------------------------------------------------------


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


@dataclass
class DRConfig:
    """PDEBench FitzHugh-Nagumo: t in [0, 5] with 101 frames -> record every 0.05."""

    Du: float = 1e-3
    Dv: float = 5e-3
    k: float = 5e-3
    record_interval: float = 0.05
    xmin: float = -1.0
    xmax: float = 1.0


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


CONFIGS: dict[str, type] = {"ns": NSConfig, "dr": DRConfig, "swe": SWEConfig, "cfd": CFDConfig}


def make_config(pde: str, **overrides) -> NSConfig | DRConfig | SWEConfig | CFDConfig:
    """Config of ``pde`` with keyword overrides; unknown keys are an error (typos must not pass silently)."""
    if pde not in CONFIGS:
        raise ValueError(f"unknown pde {pde!r}; choose one of {PDES}")
    cls = CONFIGS[pde]
    known = set(cls.__dataclass_fields__)
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"{pde}: unknown parameter(s) {bad}; known: {sorted(known)}")
    ri = overrides.get("record_interval", 1.0)
    try:
        ri_ok = not isinstance(ri, (bool, str)) and math.isfinite(float(ri)) and float(ri) > 0
    except (TypeError, ValueError):
        ri_ok = False
    if not ri_ok:
        # record times are k * record_interval: a value <= 0 would store identical frames at t <= 0
        raise ValueError(f"{pde}: record_interval {ri!r}: expected a finite number > 0")
    return cls(**overrides)


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def sample_rngs(seed: int, n: int) -> list[np.random.Generator]:
    """One independent generator per trajectory, so trajectory i depends on (seed, i) only, not on n."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def _check_finite(state: np.ndarray, pde: str, t: float) -> None:
    if not np.all(np.isfinite(state)):
        raise FloatingPointError(f"{pde}: non-finite state at t={t:.4g} (unstable parameters?)")


def _march(
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
        _check_finite(state, pde, t_rec)
        frames.append(observe(state))
        if bar is not None:
            bar.update(1)
    return frames


# --------------------------------------------------------------------------------------------------
# Gaussian random fields (FNO-style)
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# 2D incompressible Navier-Stokes (pseudo-spectral, vorticity form)
# --------------------------------------------------------------------------------------------------


class SpectralNS:
    """Pseudo-spectral vorticity solver on [0, 1)^2 for a batch of fields w_NXY (y is the rfft axis)."""

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
        """[N, X, Y, 3]: vorticity, vx, vy."""
        u, v = self.velocity(w_hat)
        return np.stack([self.ifft(w_hat), u, v], axis=-1)


def solve_ns(w0_NXY: np.ndarray, frames: int, cfg: NSConfig, bar: tqdm | None = None) -> np.ndarray:
    """Integrate initial vorticities; returns [N, frames, X, Y, 3] (vorticity, vx, vy), frame 0 = w0."""
    solver = SpectralNS(w0_NXY.shape[-1], cfg)
    w_hat = solver.dealias * solver.fft(w0_NXY)
    out = _march(w_hat, cfg.record_interval, frames - 1, solver.max_dt, solver.step, solver.observe, "ns", bar)
    return np.stack(out, axis=1)


def ns_initial(rngs: list[np.random.Generator], res: int, cfg: NSConfig) -> np.ndarray:
    return np.stack([grf_2d(r, res, cfg.grf_alpha, cfg.grf_tau) for r in rngs])


# --------------------------------------------------------------------------------------------------
# 2D FitzHugh-Nagumo diffusion-reaction (finite volume, Neumann)
# --------------------------------------------------------------------------------------------------


def _laplacian_neumann(a: np.ndarray, dx: float) -> np.ndarray:
    """5-point Laplacian of cell averages over the last two axes with zero-flux walls (mirror ghosts)."""
    p = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    return (p[..., 2:, 1:-1] + p[..., :-2, 1:-1] + p[..., 1:-1, 2:] + p[..., 1:-1, :-2] - 4 * a) / dx**2


def solve_dr(uv0_N2XY: np.ndarray, frames: int, cfg: DRConfig, bar: tqdm | None = None) -> np.ndarray:
    """Integrate (u, v); returns [N, frames, X, Y, 2]. Heun (RK2) with the limits in ``STABILITY['dr']``."""
    res = uv0_N2XY.shape[-1]
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

    out = _march(uv0_N2XY, cfg.record_interval, frames - 1, max_dt, step, lambda s: np.moveaxis(s, 1, -1), "dr", bar)
    return np.stack(out, axis=1)


# --------------------------------------------------------------------------------------------------
# Finite volume machinery (MUSCL-minmod + Rusanov + SSP-RK2) for systems of conservation laws
# --------------------------------------------------------------------------------------------------


def _sl(a: np.ndarray, axis: int, start: int | None, stop: int | None) -> np.ndarray:
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(start, stop)
    return a[tuple(idx)]


def _minmod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(a * b > 0, np.sign(a) * np.minimum(np.abs(a), np.abs(b)), 0.0)


def _pad2(U_NVXY: np.ndarray, axis: int, bc: str, normal_var: int | None) -> np.ndarray:
    """Two ghost cells along ``axis`` (2 = x, 3 = y) for periodic, transmissive or reflective walls."""
    width = [(0, 0)] * U_NVXY.ndim
    width[axis] = (2, 2)
    if bc == "periodic":
        return np.pad(U_NVXY, width, mode="wrap")
    if bc == "transmissive":
        return np.pad(U_NVXY, width, mode="edge")
    if bc == "reflective":
        p = np.pad(U_NVXY, width, mode="symmetric")
        if normal_var is not None:
            n = p.shape[axis]
            for ghost in (0, 1, n - 2, n - 1):
                idx = [slice(None)] * p.ndim
                idx[1], idx[axis] = normal_var, ghost
                p[tuple(idx)] *= -1.0
        return p
    raise ValueError(f"unknown boundary condition {bc!r}")


FluxFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def fv_divergence(U_NVXY: np.ndarray, dxs: tuple[float, float], flux: FluxFn, bc: str, normals: tuple[int, int]) -> np.ndarray:
    """-(dF/dx + dG/dy) for cell averages U with MUSCL-minmod faces and the Rusanov (local Lax-Friedrichs) flux.

    ``flux(U, axis)`` returns (physical flux along axis, local max wave speed [N, X, Y]).
    """
    out = np.zeros_like(U_NVXY)
    for axis, dx, normal in ((2, dxs[0], normals[0]), (3, dxs[1], normals[1])):
        P = _pad2(U_NVXY, axis, bc, normal)
        slope = _minmod(_sl(P, axis, 1, -1) - _sl(P, axis, 0, -2), _sl(P, axis, 2, None) - _sl(P, axis, 1, -1))
        C = _sl(P, axis, 1, -1)  # cells -1 .. n
        UL = _sl(C + 0.5 * slope, axis, 0, -1)  # faces -1/2 .. n-1/2
        UR = _sl(C - 0.5 * slope, axis, 1, None)
        FL, aL = flux(UL, axis)
        FR, aR = flux(UR, axis)
        a = np.maximum(aL, aR)[:, None]
        F = 0.5 * (FL + FR) - 0.5 * a * (UR - UL)
        out -= (_sl(F, axis, 1, None) - _sl(F, axis, 0, -1)) / dx
    return out


def ssp_rk2(U: np.ndarray, dt: float, rhs: Callable[[np.ndarray], np.ndarray], fix: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    U1 = fix(U + dt * rhs(U))
    return fix(0.5 * (U + U1 + dt * rhs(U1)))


# --------------------------------------------------------------------------------------------------
# 2D shallow water (radial dam break)
# --------------------------------------------------------------------------------------------------

H_FLOOR = 1e-6


def solve_swe(h0_NXY: np.ndarray, frames: int, cfg: SWEConfig, bar: tqdm | None = None) -> np.ndarray:
    """Integrate a dam break from rest; returns [N, frames, X, Y, 3] (h, vx, vy)."""
    res = h0_NXY.shape[-1]
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

    U0 = np.stack([h0_NXY, np.zeros_like(h0_NXY), np.zeros_like(h0_NXY)], axis=1)
    return np.stack(_march(U0, cfg.record_interval, frames - 1, max_dt, step, observe, "swe", bar), axis=1)


def swe_initial(rngs: list[np.random.Generator], res: int, cfg: SWEConfig) -> tuple[np.ndarray, np.ndarray]:
    """Water column of random radius at the centre; returns (h0 [N, X, Y], radius [N])."""
    xc = cell_centres(cfg.xmin, cfg.xmax, res)
    X, Y = np.meshgrid(xc, xc, indexing="ij")
    r = np.sqrt(X**2 + Y**2)
    radii = np.array([rng.uniform(cfg.r_min, cfg.r_max) for rng in rngs])
    h0 = np.where(r[None] < radii[:, None, None], cfg.h_in, cfg.h_out).astype(float)
    return h0, radii


# --------------------------------------------------------------------------------------------------
# 2D compressible Navier-Stokes (periodic)
# --------------------------------------------------------------------------------------------------

RHO_FLOOR, P_FLOOR = 1e-6, 1e-6


def _ddx(a: np.ndarray, axis: int, dx: float) -> np.ndarray:
    return (np.roll(a, -1, axis=axis) - np.roll(a, 1, axis=axis)) / (2 * dx)


def solve_cfd(prim0_N4XY: np.ndarray, frames: int, cfg: CFDConfig, bar: tqdm | None = None) -> np.ndarray:
    """Integrate primitive (rho, p, u, v) initial states; returns [N, frames, X, Y, 4] (density, pressure, vx, vy)."""
    res = prim0_N4XY.shape[-1]
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

    rho, p, u, v = (prim0_N4XY[:, i] for i in range(4))
    U0 = np.stack([rho, rho * u, rho * v, p / gm1 + 0.5 * rho * (u * u + v * v)], axis=1)
    step = lambda U, dt: ssp_rk2(U, dt, rhs, fix)  # noqa: E731
    return np.stack(_march(U0, cfg.record_interval, frames - 1, max_dt, step, observe, "cfd", bar), axis=1)


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


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def cell_centres(lo: float, hi: float, res: int) -> np.ndarray:
    dx = (hi - lo) / res
    return lo + dx * (np.arange(res) + 0.5)


def simulate(
    pde: str, n: int, res: int, frames: int, seed: int, batch_size: int = 16, progress: bool = False, **params
) -> Simulation:
    """Run ``n`` seeded trajectories of ``pde`` on a res x res grid and record ``frames`` frames (t = 0 first).

    Trajectories are integrated in batches of ``batch_size`` (a batch shares its adaptive time step); the
    random initial condition of trajectory i depends only on (seed, i).
    """
    if n < 1 or res < 8 or frames < 2:
        raise ValueError(f"{pde}: need n >= 1, res >= 8, frames >= 2 (got n={n}, res={res}, frames={frames})")
    cfg = make_config(pde, **params)
    rngs = sample_rngs(seed, n)
    per_sample: dict[str, np.ndarray] = {"seed": np.array([seed * 100003 + i for i in range(n)], dtype=np.int64)}
    bar = tqdm(total=(frames - 1) * n, desc=f"{pde} {n}x{res}^2", unit="frame", disable=not progress)
    chunks = []

    class _ScaledBar:  # one update per record advances every trajectory of the batch
        def __init__(self, k: int):
            self.k = k

        def update(self, m: int) -> None:
            bar.update(m * self.k)

    for lo in range(0, n, batch_size):
        rb = rngs[lo : lo + batch_size]
        sb = _ScaledBar(len(rb))
        if pde == "ns":
            chunks.append(solve_ns(ns_initial(rb, res, cfg), frames, cfg, sb))
        elif pde == "dr":
            uv0 = np.stack([r.standard_normal((2, res, res)) for r in rb])
            chunks.append(solve_dr(uv0, frames, cfg, sb))
        elif pde == "swe":
            h0, radii = swe_initial(rb, res, cfg)
            per_sample.setdefault("radius", np.zeros(n))[lo : lo + len(rb)] = radii
            chunks.append(solve_swe(h0, frames, cfg, sb))
        else:
            chunks.append(solve_cfd(cfd_initial(rb, res, cfg), frames, cfg, sb))
    bar.close()
    fields = np.concatenate(chunks, axis=0)
    t = cfg.record_interval * np.arange(frames)
    params_out = {k: v for k, v in asdict(cfg).items()}
    if pde == "ns":
        xs = np.arange(res) / res
        return Simulation(pde, fields, ["vorticity", "vx", "vy"], ["vorticity"], xs, xs.copy(), t, params_out, per_sample, "periodic")
    if pde == "dr":
        xs = cell_centres(cfg.xmin, cfg.xmax, res)
        return Simulation(pde, fields, ["u", "v"], ["u", "v"], xs, xs.copy(), t, params_out, per_sample, "neumann")
    if pde == "swe":
        xs = cell_centres(cfg.xmin, cfg.xmax, res)
        return Simulation(pde, fields, ["h", "vx", "vy"], ["h"], xs, xs.copy(), t, params_out, per_sample, cfg.bc)
    xs = cell_centres(0.0, 1.0, res)
    chans = ["density", "pressure", "vx", "vy"]
    return Simulation(pde, fields, chans, chans, xs, xs.copy(), t, params_out, per_sample, "periodic")
