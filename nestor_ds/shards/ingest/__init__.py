"""One reader per raw PDE dataset layout, turning source files into canonical trajectories.

This package: `base.py` (the Reader interface and shared helpers), one module per public layout family
(`fno.py`, `pdebench.py`, `pdearena.py`, `the_well.py`), and here the registry, layout detection and
`open_reader`. Layouts (docs/data_format.md):
  fno-mat          `u` logical [R, X, Y, T] (v7.3 HDF5: h5py sees (T, Y, X, R); v5: scipy loadmat)
  pdebench-cfd     `Vx`, `Vy`, `density`, `pressure` each [R, T, X, Y] (1D files: [R, T, X])
  pdebench-groups  one group per sample with `data` [T, X, Y, C] and `grid/{x,y,t}`
  pdebench-1d      `tensor` [R, T, X]
  pdearena-ns      split groups with `u`, `vx`, `vy` [R, T, X, Y]
  the-well         `t0_fields`/`t1_fields`/`t2_fields` groups of [R, T, X, Y, (2, (2))] datasets
  cfdbench         a case folder: `case.json` (the source file) beside `u.npy`, `v.npy` (T, height, width)

Shape legend: R trajectories (of a file), T frames, X, Y grid points, C channels.
"""

from __future__ import annotations

from pathlib import Path

import h5py

from nestor_ds.shards.ingest.base import (
    READ_ERRORS,
    Entry,
    H5Reader,
    Reader,
    SourceInfo,
    open_h5,
    unwritten_trajectories,
)
from nestor_ds.shards.ingest.cfdbench import CfdbenchReader, is_case_file
from nestor_ds.shards.ingest.fno import FnoMat5Reader, FnoMat73Reader, is_mat5
from nestor_ds.shards.ingest.pdearena import PdearenaNsReader
from nestor_ds.shards.ingest.pdebench import Pdebench1dReader, PdebenchCfdReader, PdebenchGroupsReader
from nestor_ds.shards.ingest.the_well import TheWellReader
from nestor_ds.shards.schema import LAYOUTS, DataFormatError

__all__ = ["H5_READERS", "READ_ERRORS", "CfdbenchReader", "Entry", "FnoMat5Reader", "FnoMat73Reader", "H5Reader",
           "Pdebench1dReader", "PdebenchCfdReader", "PdebenchGroupsReader", "PdearenaNsReader", "Reader", "SourceInfo",
           "TheWellReader", "detect_layout", "is_case_file", "open_h5", "open_reader", "unwritten_trajectories"]

H5_READERS: dict[str, type[H5Reader]] = {
    # Order matters for detection: the most specific signatures first.
    "the-well": TheWellReader,
    "pdearena-ns": PdearenaNsReader,
    "pdebench-cfd": PdebenchCfdReader,
    "pdebench-1d": Pdebench1dReader,
    "fno-mat": FnoMat73Reader,
    "pdebench-groups": PdebenchGroupsReader,
}
assert set(H5_READERS) | {CfdbenchReader.layout} == set(LAYOUTS)


def detect_layout(path: str | Path) -> str:
    """Name of the layout of `path` (see module docstring); DataFormatError if none matches."""
    path = str(path)
    if not Path(path).is_file():
        raise DataFormatError(path, "no such file")
    if is_case_file(path):
        return CfdbenchReader.layout
    if not h5py.is_hdf5(path):
        if is_mat5(path):
            return "fno-mat"
        raise DataFormatError(path, "unreadable: neither HDF5 (incl. MATLAB v7.3) nor MATLAB v5 .mat")
    with open_h5(path) as f:
        for layout, cls in H5_READERS.items():
            if cls.matches(f):
                return layout
        keys = sorted(f.keys())[:8]
    raise DataFormatError(path, f"unknown layout: top-level keys {keys} match none of {', '.join(LAYOUTS)}")


def open_reader(path: str | Path, layout: str = "auto") -> Reader:
    """Reader for `path`, detecting the layout when `layout == "auto"`."""
    path = str(path)
    if layout == "auto":
        layout = detect_layout(path)
    elif layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected auto or one of {LAYOUTS}")
    if not Path(path).is_file():
        raise DataFormatError(path, "no such file")
    if layout == CfdbenchReader.layout or is_case_file(path):
        if layout != CfdbenchReader.layout or not is_case_file(path):
            raise DataFormatError(path, f"layout {layout} cannot read {Path(path).name}: the cfdbench layout reads "
                                        f"a case's case.json, and case.json is read by no other layout")
        return CfdbenchReader(path)
    if layout == "fno-mat" and not h5py.is_hdf5(path):
        if not is_mat5(path):
            raise DataFormatError(path, "unreadable: neither MATLAB v7.3 (HDF5) nor v5 .mat")
        return FnoMat5Reader(path)
    if not h5py.is_hdf5(path):
        raise DataFormatError(path, f"unreadable: not an HDF5 file (layout {layout})")
    return H5_READERS[layout](path)
