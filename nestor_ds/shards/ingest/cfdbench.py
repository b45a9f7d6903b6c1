"""CFDBench (Luo et al., arXiv:2310.05963; repository `luo-yining/CFDBench`): one folder per simulated case.

Public layout (the interpolated 64x64 release; facts from the repository's README.md and its loaders
`src/dataset/{cavity,tube,dam,cylinder}.py`):

    <problem>/<subset>/caseNNNN/u.npy      (T, height, width): x-velocity, row i along y, column j along x
                               /v.npy      same shape: y-velocity
                               /case.json  the case's parameters (a flat JSON object of numbers)

`problem` is `cavity`, `tube`, `dam` or `cylinder`; `subset` is `bc`, `geo` or `prop` (which operating
parameter the subset varies). The JSON keys per problem (what the loaders read): cavity `vel_top`, `density`,
`viscosity`, `height`, `width`; tube `vel_in`, `density`, `viscosity`, `height`, `width`; dam `velocity`,
`density`, `viscosity`, `barrier_height`, `barrier_width`, `height`, `width`, `dx`, `dy`; cylinder `vel_in`,
`density`, `viscosity`, `radius`, `x_min`, `x_max`, `y_min`, `y_max`.

The source file of a case is its `case.json` (the build unit is a file: `expand_inputs` finds every
`case.json` under a directory), so one line names the case for every error; `u.npy` / `v.npy` are its siblings.

Mapping to `[T, X, Y, C]`: channels `u, v, mask` (mask is channel 2: 1 = fluid, 0 = solid), each case's
`(T, height, width)` arrays transposed to `[T, width, height]` so that axis 1 runs along x as everywhere else
in the shards. The mask is not stored: like CFDBench's loaders it is derived from case.json, constant in time:
- cavity, tube: all fluid (the loaders mark only a padded boundary ring, which is not added here: padding
  would change the grid per problem and the corpus resizes every dataset to one grid anyway);
- cylinder: solid where `x^2 + y^2 <= radius^2` at the grid point `x = x_min + j (x_max - x_min) / width`,
  `y = y_min + i (y_max - y_min) / height` (the loaders' point convention): the cylinder is centred on the
  physical origin, which the loader records as `center_x = -x_min`, `center_y = -y_min` from the corner;
- dam: solid on the barrier, columns `int(0.5 / dx)` to `int((0.5 + barrier_width) / dx)` (exclusive) and rows
  `0` to `int(barrier_height / dy)` (exclusive): the barrier's left edge at x = 0.5 m, its foot on the
  bottom wall, as in `src/dataset/dam.py` (whose own slice of that box is empty, so its mask is all fluid).

Cases differ in length, and the builder needs one trajectory shape per dataset, so every case is cut into
consecutive windows of `FRAMES` = 20 frames (DPOT's CFDBench trajectories, docs/reference.md); the trailing
`T mod 20` frames are dropped and a case shorter than 20 frames is an error. `source_index` is the window
number, meta `frame_start` its first frame.

Shape legend: T frames, X, Y grid points, C channels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from nestor_ds.shards.ingest.base import Entry, Reader, SourceInfo, one_line, uniform_grid
from nestor_ds.shards.schema import DataFormatError

CASE_FILE = "case.json"
FIELD_FILES = {"u": "u.npy", "v": "v.npy"}
CHANNELS = ("u", "v", "mask")
FRAMES = 20
PROBLEMS = ("cavity", "tube", "dam", "cylinder")
SUBSETS = ("bc", "geo", "prop")

# Keys each problem's mask needs, and the key that identifies the problem when the folder names do not.
MASK_KEYS = {"cavity": (), "tube": (), "cylinder": ("radius", "x_min", "x_max", "y_min", "y_max"),
             "dam": ("barrier_height", "barrier_width", "dx", "dy")}
SIGNATURE_KEY = {"cylinder": "radius", "dam": "barrier_height", "cavity": "vel_top", "tube": "vel_in"}
# Seconds between stored frames: `data_delta_time` of CFDBench's loaders. For the cylinder they disagree
# (0.1 in CylinderFlowDataset, 0.001 in CylinderFlowAutoDataset); 0.001 is the one its auto-regressive training uses.
FRAME_DT = {"cavity": 0.1, "tube": 0.1, "dam": 0.1, "cylinder": 0.001}
DAM_BARRIER_LEFT = 0.5  # x of the barrier's upstream face (m), fixed in CFDBench's dam geometry


def is_case_file(path: str | Path) -> bool:
    """Whether `path` names a CFDBench case's parameter file (detection is by name: a case has no magic bytes)."""
    return Path(path).name == CASE_FILE


def fluid_mask(problem: str, params: dict[str, float], height: int, width: int) -> np.ndarray:
    """[height, width] float mask, 1 in the fluid and 0 in the solid, derived from the case's parameters."""
    mask = np.ones((height, width), dtype=np.float64)
    if problem == "cylinder":
        x = params["x_min"] + np.arange(width) * (params["x_max"] - params["x_min"]) / width
        y = params["y_min"] + np.arange(height) * (params["y_max"] - params["y_min"]) / height
        mask[y[:, None] ** 2 + x[None, :] ** 2 <= params["radius"] ** 2] = 0.0
    elif problem == "dam":
        left = int(DAM_BARRIER_LEFT / params["dx"])
        right = int((DAM_BARRIER_LEFT + params["barrier_width"]) / params["dx"])
        mask[: int(params["barrier_height"] / params["dy"]), left:right] = 0.0
    return mask


class CfdbenchReader(Reader):
    """One CFDBench case (its `case.json` plus sibling `u.npy`, `v.npy`), cut into windows of FRAMES frames."""

    layout = "cfdbench"
    data_keys = ("u", "v")

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.case_dir = Path(self.path).parent
        self._params: dict[str, Any] | None = None
        self._problem = ""

    @staticmethod
    def matches(f: h5py.File) -> bool:
        return False  # not an HDF5 layout: detected by file name (is_case_file)

    def where(self, entry: Entry) -> str:
        return f"key 'u', 'v' frames {entry.local}..{entry.local + FRAMES - 1}"

    def _field_path(self, key: str) -> Path:
        return self.case_dir / FIELD_FILES[key]

    def _load_params(self) -> dict[str, Any]:
        """case.json as a dict, checked to hold the numbers the mask needs; the problem it belongs to."""
        if self._params is not None:
            return self._params
        try:
            params = json.loads(Path(self.path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataFormatError(self.path, f"unreadable case parameters ({one_line(exc)})") from None
        if not isinstance(params, dict):
            raise DataFormatError(self.path, f"holds a JSON {type(params).__name__}: expected an object of parameters")
        self._problem = self._which_problem(params)
        for key in MASK_KEYS[self._problem]:
            value = params.get(key)
            if key not in params:
                raise DataFormatError(self.path, f"missing key {key!r} (needed for the {self._problem} mask)")
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise DataFormatError(self.path, f"key {key!r} is {value!r}: expected a finite number")
        for key in ("dx", "dy"):
            if key in MASK_KEYS[self._problem] and params[key] <= 0:
                raise DataFormatError(self.path, f"key {key!r} is {params[key]!r}: expected a grid step > 0")
        self._params = params
        return params

    def _which_problem(self, params: dict[str, Any]) -> str:
        """The problem from the folder names (`<problem>/<subset>/caseNNNN`), else from a key only it has."""
        parts = self.case_dir.parts
        if len(parts) >= 3 and parts[-3] in PROBLEMS:
            return parts[-3]
        for problem, key in SIGNATURE_KEY.items():
            if key in params:
                return problem
        raise DataFormatError(self.path, f"cannot tell the problem: the case is not under {'/'.join(PROBLEMS)}/"
                                         f"<subset>/ and has none of the keys {sorted(SIGNATURE_KEY.values())}")

    def _open_field(self, key: str) -> np.ndarray:
        """Memory-mapped `u.npy` / `v.npy` (the header is read, not the data), or an error naming the file."""
        path = self._field_path(key)
        if not path.is_file():
            raise DataFormatError(path, f"missing file: a CFDBench case needs {', '.join(FIELD_FILES.values())} "
                                        f"beside {CASE_FILE}")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataFormatError(path, f"unreadable .npy file ({one_line(exc)})") from None
        if arr.ndim != 3 or 0 in arr.shape:
            raise DataFormatError(path, f"key {key!r} has shape {arr.shape}: expected 3 dims (T, height, width)")
        if arr.dtype.kind != "f":
            raise DataFormatError(path, f"key {key!r} has dtype {arr.dtype}: expected float32/float64")
        return arr

    def _fields(self) -> tuple[np.ndarray, np.ndarray]:
        u, v = self._open_field("u"), self._open_field("v")
        if v.shape != u.shape:
            raise DataFormatError(self._field_path("v"), f"key 'v' has shape {v.shape}: expected {u.shape} like u.npy")
        if u.shape[0] < FRAMES:
            raise DataFormatError(self._field_path("u"), f"key 'u' has shape {u.shape}: expected at least {FRAMES} "
                                                         f"frames (one trajectory)")
        return u, v

    def scan(self) -> SourceInfo:
        self._load_params()
        u, _ = self._fields()
        t_len, height, width = u.shape
        entries = tuple(Entry(k, local=k * FRAMES) for k in range(t_len // FRAMES))
        return SourceInfo(self.path, self.layout, (FRAMES, width, height, len(CHANNELS)), CHANNELS, entries)

    def read_one(self, entry: Entry) -> tuple[np.ndarray, dict[str, Any]]:
        params = self._load_params()
        u, v = self._fields()
        _, height, width = u.shape
        window = slice(entry.local, entry.local + FRAMES)
        mask = fluid_mask(self._problem, params, height, width)
        frames_u, frames_v = np.asarray(u[window]), np.asarray(v[window])
        fields = np.stack([frames_u, frames_v, np.broadcast_to(mask, frames_u.shape).astype(frames_u.dtype)], axis=-1)
        dt = FRAME_DT[self._problem]
        parts = self.case_dir.parts
        return np.ascontiguousarray(fields.transpose(0, 2, 1, 3)), {
            "x": self._axis(params, width, "x_min", "x_max", "width"),
            "y": self._axis(params, height, "y_min", "y_max", "height"),
            "t": [(entry.local + i) * dt for i in range(FRAMES)], "dt": dt,
            "params": {k: v for k, v in params.items() if isinstance(v, int | float | str | bool)},
            "problem": self._problem, "subset": parts[-2] if len(parts) >= 2 and parts[-2] in SUBSETS else None,
            "case": "/".join(parts[-3:]), "frame_start": entry.local,
        }

    @staticmethod
    def _axis(params: dict[str, Any], n: int, lo_key: str, hi_key: str, size_key: str) -> list[float]:
        """Grid points along one axis in metres: the loaders' `lo + k * extent / n`, from 0 when only the extent
        is stored, a uniform [0, 1) grid when neither is."""
        lo, hi, size = params.get(lo_key), params.get(hi_key), params.get(size_key)
        if isinstance(lo, int | float) and isinstance(hi, int | float):
            return (lo + np.arange(n) * (hi - lo) / n).tolist()
        if isinstance(size, int | float):
            return (np.arange(n) * size / n).tolist()
        return uniform_grid(n)
