"""Synthetic PDE data (`python -m nestor_ds.synth`): seeded solvers -> files in the public raw layouts.

The data flow, file by file:
  solvers.py        `simulate()`: PDE family, config and seeds -> a `Simulation` (dispatch to the families)
  ns.py, dr.py, swe.py, cfd.py   one solver per PDE family (common.py, finite_volume.py: shared numerics)
  layouts.py        a `Simulation` -> a file in a public layout (FNO .mat, PDEBench, PDEArena, The Well)
  cli.py            the command line (single files and the four-family demo set)

The files it writes are read back by `nestor_ds.shards.ingest` like the public datasets.
"""
