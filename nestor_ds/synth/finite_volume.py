"""Finite-volume machinery for 2D systems of conservation laws (shallow water, compressible NS): MUSCL
reconstruction with the minmod limiter, the Rusanov (local Lax-Friedrichs) flux and SSP-RK2 time steps.

Shape legend: R trajectories, T recorded frames (including t = 0), X, Y grid points, C channels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _sl(a: np.ndarray, axis: int, start: int | None, stop: int | None) -> np.ndarray:
    """a[..., start:stop, ...] along `axis`."""
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(start, stop)
    return a[tuple(idx)]


def _minmod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smaller slope where both agree in sign, else 0 (the TVD limiter)."""
    return np.where(a * b > 0, np.sign(a) * np.minimum(np.abs(a), np.abs(b)), 0.0)


def _pad2(U_RCXY: np.ndarray, axis: int, bc: str, normal_var: int | None) -> np.ndarray:
    """Two ghost cells along ``axis`` (2 = x, 3 = y) for periodic, transmissive or reflective walls."""
    width = [(0, 0)] * U_RCXY.ndim
    width[axis] = (2, 2)
    if bc == "periodic":
        return np.pad(U_RCXY, width, mode="wrap")
    if bc == "transmissive":
        return np.pad(U_RCXY, width, mode="edge")
    if bc == "reflective":
        p = np.pad(U_RCXY, width, mode="symmetric")
        if normal_var is not None:
            n = p.shape[axis]
            for ghost in (0, 1, n - 2, n - 1):
                idx = [slice(None)] * p.ndim
                idx[1], idx[axis] = normal_var, ghost
                p[tuple(idx)] *= -1.0
        return p
    raise ValueError(f"unknown boundary condition {bc!r}")


FluxFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def fv_divergence(
    U_RCXY: np.ndarray, dxs: tuple[float, float], flux: FluxFn, bc: str, normals: tuple[int, int]
) -> np.ndarray:
    """-(dF/dx + dG/dy) for cell averages U with MUSCL-minmod faces and the Rusanov (local Lax-Friedrichs) flux.

    ``flux(U, axis)`` returns (physical flux along axis, local max wave speed [R, X, Y]).
    """
    out = np.zeros_like(U_RCXY)
    for axis, dx, normal in ((2, dxs[0], normals[0]), (3, dxs[1], normals[1])):
        P = _pad2(U_RCXY, axis, bc, normal)
        slope = _minmod(_sl(P, axis, 1, -1) - _sl(P, axis, 0, -2), _sl(P, axis, 2, None) - _sl(P, axis, 1, -1))
        cells = _sl(P, axis, 1, -1)  # cells -1 .. n
        UL = _sl(cells + 0.5 * slope, axis, 0, -1)  # faces -1/2 .. n-1/2
        UR = _sl(cells - 0.5 * slope, axis, 1, None)
        FL, aL = flux(UL, axis)
        FR, aR = flux(UR, axis)
        a = np.maximum(aL, aR)[:, None]
        F = 0.5 * (FL + FR) - 0.5 * a * (UR - UL)
        out -= (_sl(F, axis, 1, None) - _sl(F, axis, 0, -1)) / dx
    return out


def ssp_rk2(
    U: np.ndarray, dt: float, rhs: Callable[[np.ndarray], np.ndarray], fix: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """One strong-stability-preserving RK2 (Heun) step; `fix` clamps the state (floors) after each stage."""
    U1 = fix(U + dt * rhs(U))
    return fix(0.5 * (U + U1 + dt * rhs(U1)))
