"""Seeded numerical solvers for the four PDE families of the NESTOR pre-training corpus: the dispatch.

Why these solvers exist: the public datasets are hundreds of gigabytes, so tests, demos and CI need small files
with the same physics and the same layouts. Every solver is written from the equations, one module per family:

- ``ns``  2D incompressible Navier-Stokes, vorticity form, pseudo-spectral (ns.py, the FNO benchmark)
- ``dr``  2D FitzHugh-Nagumo diffusion-reaction, finite volume + Heun (dr.py, PDEBench)
- ``swe`` 2D shallow water radial dam break, MUSCL + Rusanov + SSP-RK2 (swe.py, PDEBench)
- ``cfd`` 2D compressible Navier-Stokes with viscous stress, same finite-volume scheme (cfd.py, PDEBench CFD)

Shared pieces: common.py (`Simulation`, generators, marching, random fields) and finite_volume.py. Every solver
takes fixed record times and reaches each of them with adaptive substeps that respect the stability limit of its
scheme (``STABILITY``); a non-finite state raises ``FloatingPointError``.

Shape legend: R trajectories, T recorded frames (including t = 0), X, Y grid points, C channels.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
from tqdm import tqdm

from nestor_ds.synth import cfd, dr, ns, swe
from nestor_ds.synth.cfd import CFDConfig, cfd_initial, solve_cfd
from nestor_ds.synth.common import Simulation, cell_centres, sample_rngs
from nestor_ds.synth.dr import DRConfig, dr_initial, solve_dr
from nestor_ds.synth.ns import NSConfig, ns_initial, solve_ns
from nestor_ds.synth.swe import SWEConfig, solve_swe, swe_initial

PDES = ("ns", "dr", "swe", "cfd")

STABILITY = {"ns": ns.STABILITY, "dr": dr.STABILITY, "swe": swe.STABILITY, "cfd": cfd.STABILITY}

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
            chunks.append(solve_dr(dr_initial(rb, res), frames, cfg, sb))
        elif pde == "swe":
            h0, radii = swe_initial(rb, res, cfg)
            per_sample.setdefault("radius", np.zeros(n))[lo : lo + len(rb)] = radii
            chunks.append(solve_swe(h0, frames, cfg, sb))
        else:
            chunks.append(solve_cfd(cfd_initial(rb, res, cfg), frames, cfg, sb))
    bar.close()
    channels, primary, xs, boundary = _grid_and_channels(pde, cfg, res)
    t = cfg.record_interval * np.arange(frames)
    return Simulation(
        pde, np.concatenate(chunks, axis=0), channels, primary, xs, xs.copy(), t, asdict(cfg), per_sample, boundary
    )


def _grid_and_channels(
    pde: str, cfg: NSConfig | DRConfig | SWEConfig | CFDConfig, res: int
) -> tuple[list[str], list[str], np.ndarray, str]:
    """(channels, primary channels, grid coordinates of one axis, boundary) of a family's output."""
    if pde == "ns":
        return ["vorticity", "vx", "vy"], ["vorticity"], np.arange(res) / res, "periodic"
    if pde == "dr":
        return ["u", "v"], ["u", "v"], cell_centres(cfg.xmin, cfg.xmax, res), "neumann"
    if pde == "swe":
        return ["h", "vx", "vy"], ["h"], cell_centres(cfg.xmin, cfg.xmax, res), cfg.bc
    chans = ["density", "pressure", "vx", "vy"]
    return chans, list(chans), cell_centres(0.0, 1.0, res), "periodic"
