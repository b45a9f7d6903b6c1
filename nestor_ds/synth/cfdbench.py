"""Writer of CFDBench's public layout (Luo et al., arXiv:2310.05963; repository `luo-yining/CFDBench`).

Why: the CFDBench reader of the shard builder (`nestor_ds/shards/ingest/cfdbench.py`) must be tested on folders
laid out like the released data without downloading 13 GB. CFDBench's generator (ANSYS Fluent, then an
interpolation to 64x64 that is not in its repository) leaves one folder per case, as its README and its loaders
`src/dataset/{cavity,tube,dam,cylinder}.py` read them:

    <problem>/<subset>/caseNNNN/u.npy, v.npy   (T, height, width): row i along y, column j along x
                               /case.json      flat JSON object of the case's parameters (indent 2)

Here the velocity comes from a seeded solver of this package (`ns`: its `vx`, `vy`; any Simulation with those
channels) and is set to 0 inside the problem's obstacle (the cylinder, the dam's barrier), where the released
interpolated fields are at rest too. The obstacle is placed here from the same case.json numbers the reader
derives its mask from, so a test comparing the reader's mask with the zeroed region checks both sides.

The parameter values are stand-ins on CFDBench's keys (not its sampled ranges); the grid is the simulation's
(res x res; CFDBench's is 64x64). Deterministic: the same Simulation gives the same bytes.

Shape legend: R trajectories (cases), T frames, X, Y grid points.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nestor_ds.synth.common import Simulation

PROBLEMS = ("cavity", "tube", "dam", "cylinder")
SUBSETS = ("bc", "geo", "prop")
DAM_BARRIER_LEFT = 0.5  # m: the barrier's upstream face, fixed in CFDBench's dam geometry


def case_params(problem: str, r: int, res: int, visc: float) -> dict[str, float]:
    """case.json of case r: CFDBench's keys for `problem`, with values that vary with r (as a subset's do)."""
    vel = 0.5 + 0.1 * r
    if problem == "cavity":
        return {"vel_top": vel, "density": 1.0, "viscosity": visc, "height": 1.0, "width": 1.0}
    if problem == "tube":
        return {"vel_in": vel, "density": 1.0, "viscosity": visc, "height": 0.1, "width": 1.0}
    if problem == "cylinder":
        return {
            "vel_in": vel,
            "density": 1.0,
            "viscosity": visc,
            "radius": 0.1 + 0.02 * r,
            "x_min": -0.3,
            "x_max": 0.7,
            "y_min": -0.5,
            "y_max": 0.5,
        }
    if problem == "dam":
        return {
            "case_no": float(r),
            "velocity": vel,
            "density": 1.0,
            "viscosity": visc,
            "barrier_height": 0.1 + 0.02 * r,
            "barrier_width": 0.1,
            "height": 0.4,
            "width": 1.5,
            "dx": 1.5 / res,
            "dy": 0.4 / res,
        }
    raise ValueError(f"unknown CFDBench problem {problem!r}: expected one of {PROBLEMS}")


def obstacle(problem: str, params: dict[str, float], height: int, width: int) -> np.ndarray:
    """[height, width] bool, True inside the solid: the cylinder centred on the physical origin (grid points
    `lo + k * extent / n`), or the dam's barrier (left face at x = 0.5 m, foot on the bottom wall)."""
    solid = np.zeros((height, width), dtype=bool)
    if problem == "cylinder":
        for i in range(height):
            y = params["y_min"] + i * (params["y_max"] - params["y_min"]) / height
            for j in range(width):
                x = params["x_min"] + j * (params["x_max"] - params["x_min"]) / width
                solid[i, j] = x * x + y * y <= params["radius"] ** 2
    elif problem == "dam":
        left = int(DAM_BARRIER_LEFT / params["dx"])
        right = int((DAM_BARRIER_LEFT + params["barrier_width"]) / params["dx"])
        solid[: int(params["barrier_height"] / params["dy"]), left:right] = True
    return solid


def write_cfdbench(
    root: str | Path, sim: Simulation, problem: str, subset: str = "prop", start: int = 0, float64: bool = False
) -> list[Path]:
    """Write each trajectory of `sim` as a case folder `root/problem/subset/caseNNNN` (numbered from `start`);
    returns the case folders. `u.npy` / `v.npy` hold the `vx` / `vy` channels as (T, height, width)."""
    if problem not in PROBLEMS:
        raise ValueError(f"unknown CFDBench problem {problem!r}: expected one of {PROBLEMS}")
    if subset not in SUBSETS:
        raise ValueError(f"unknown CFDBench subset {subset!r}: expected one of {SUBSETS}")
    dtype = np.float64 if float64 else np.float32
    u_RTXY, v_RTXY = sim.channel("vx"), sim.channel("vy")
    height, width = u_RTXY.shape[3], u_RTXY.shape[2]
    visc = float(sim.params.get("visc", 1e-3))
    cases = []
    for r in range(u_RTXY.shape[0]):
        case = Path(root) / problem / subset / f"case{start + r:04d}"
        case.mkdir(parents=True, exist_ok=True)
        params = case_params(problem, start + r, width, visc)
        solid = obstacle(problem, params, height, width)
        for name, field in (("u", u_RTXY[r]), ("v", v_RTXY[r])):
            arr = np.ascontiguousarray(field.transpose(0, 2, 1), dtype=dtype)  # [T, X, Y] -> (T, height, width)
            arr[:, solid] = 0.0
            np.save(case / f"{name}.npy", arr, allow_pickle=False)
        (case / "case.json").write_text(json.dumps(params, indent=2, ensure_ascii=False), encoding="utf-8")
        cases.append(case)
    return cases
