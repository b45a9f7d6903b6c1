"""Generate small seeded PDE datasets in the public raw layouts (FNO .mat, PDEBench, PDEArena, The Well).

Why: tests, demos and CI need real PDE trajectories in exactly the layouts of the public datasets, without
downloading hundreds of gigabytes. See docs/gen_pde.md.

    python -m nestor_ds.synth --pde ns --layout fno-mat --n 16 --res 64 --steps 20 --visc 1e-3 --out ns.mat
    python -m nestor_ds.synth --demo data/demo            # four PDE families at 64x64, ~2 minutes
    python -m nestor_ds.synth --demo /tmp/tiny --tiny     # the same files at test sizes, < 1 s
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nestor_ds.synth.layouts import COMPATIBLE, DEFAULT_LAYOUT, DEFAULT_STEPS, LAYOUTS, write_dataset
from nestor_ds.synth.solvers import PDES, STABILITY


@dataclass
class DemoItem:
    """One file of the demo set; names follow the public files so readers can parse them the same way."""

    pde: str
    layout: str
    filename: str
    n: int
    res: int
    steps: int
    params: dict = field(default_factory=dict)


def demo_items(tiny: bool) -> list[DemoItem]:
    """The demo set: tens of 64x64 trajectories per family (tiny: 2 trajectories at 16x16)."""
    if tiny:
        return [
            DemoItem("ns", "fno-mat", "ns_V1e-3_N2_T6.mat", 2, 16, 6, {"visc": 1e-3, "record_interval": 0.25}),
            DemoItem("dr", "pdebench-groups", "2D_diff-react_NA_NA.h5", 2, 16, 12, {"record_interval": 0.1}),
            DemoItem("swe", "pdebench-groups", "2D_rdb_NA_NA.h5", 2, 16, 12, {"record_interval": 0.05}),
            DemoItem(
                "cfd",
                "pdebench-cfd",
                "2D_CFD_Rand_M0.1_Eta0.01_Zeta0.01_periodic_16_Train.hdf5",
                2,
                16,
                12,
                {"record_interval": 0.01},
            ),
        ]
    return [
        DemoItem("ns", "fno-mat", "ns_V1e-3_N24_T20.mat", 24, 64, 20, {"visc": 1e-3}),
        DemoItem("dr", "pdebench-groups", "2D_diff-react_NA_NA.h5", 24, 64, 51, {"record_interval": 0.1}),
        DemoItem("swe", "pdebench-groups", "2D_rdb_NA_NA.h5", 24, 64, 51, {"record_interval": 0.02}),
        DemoItem("cfd", "pdebench-cfd", "2D_CFD_Rand_M0.1_Eta0.01_Zeta0.01_periodic_64_Train.hdf5", 24, 64, 21, {}),
    ]


def write_demo(out_dir: Path, tiny: bool = False, seed: int = 0, progress: bool = True) -> list[Path]:
    """Write the four-family demo set into ``out_dir``; returns the written paths."""
    paths = []
    for i, item in enumerate(demo_items(tiny)):
        t0 = time.perf_counter()
        p = write_dataset(
            item.pde,
            item.layout,
            out_dir / item.filename,
            item.n,
            item.res,
            item.steps,
            seed + i,
            progress=progress,
            **item.params,
        )
        if progress:
            print(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        paths.append(p)
    return paths


# Numeric options that must be > 0 (or >= 0): a bad value would otherwise run and write nonsense, e.g.
# --record-interval -1 gave identical frames at t = 0, -1, -2, ...
POSITIVE_INTS = ("n", "res", "steps", "batch_size")
POSITIVE_FLOATS = ("record_interval", "visc", "M")
NON_NEGATIVE_FLOATS = ("eta", "zeta")


def check_args(args: argparse.Namespace) -> None:
    """One-line ValueError naming the option for values no simulation can use."""

    def flag(key: str) -> str:
        return "--" + key.replace("_", "-")

    for key in POSITIVE_INTS:
        v = getattr(args, key)
        if v is not None and v < 1:
            raise ValueError(f"{flag(key)} {v}: expected an integer >= 1")
    for key in POSITIVE_FLOATS + NON_NEGATIVE_FLOATS:
        v = getattr(args, key)
        if v is None:
            continue
        ok = math.isfinite(v) and (v > 0 if key in POSITIVE_FLOATS else v >= 0)
        if not ok:
            raise ValueError(f"{flag(key)} {v}: expected a finite number {'> 0' if key in POSITIVE_FLOATS else '>= 0'}")


def parse_params(args: argparse.Namespace) -> dict:
    params: dict = {}
    for key in ("visc", "record_interval", "time_scheme", "bc", "M", "eta", "zeta"):
        v = getattr(args, key)
        if v is not None:
            params[key] = v
    if args.no_forcing:
        params["forcing"] = False
    for item in args.param:
        key, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"--param expects KEY=VALUE (got {item!r})")
        try:
            params[key] = float(val) if val.lower() not in ("true", "false") else val.lower() == "true"
        except ValueError:
            params[key] = val
    return params


def build_parser() -> argparse.ArgumentParser:
    stab = "\n".join(f"  {k}: {v}" for k, v in STABILITY.items())
    compat = "\n".join(f"  {k}: {', '.join(v)}" for k, v in COMPATIBLE.items())
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Stability (enforced with adaptive substeps between records):\n{stab}\n\n"
        f"Layouts and the PDEs they hold:\n{compat}\n\n"
        f"Defaults: steps {DEFAULT_STEPS}, layout {DEFAULT_LAYOUT}.",
    )
    p.add_argument("--pde", choices=PDES, help="PDE family")
    p.add_argument("--layout", choices=LAYOUTS, help="file layout (default depends on --pde)")
    p.add_argument("--n", type=int, default=16, help="number of trajectories")
    p.add_argument("--res", type=int, default=64, help="grid points per side")
    p.add_argument("--steps", type=int, help="stored frames T (FNO: after the initial state)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output file")
    p.add_argument("--visc", type=float, help="ns viscosity (default 1e-3)")
    p.add_argument("--record-interval", dest="record_interval", type=float, help="time between stored frames")
    p.add_argument("--time-scheme", dest="time_scheme", choices=("cn", "rk4"), help="ns: Crank-Nicolson or IF-RK4")
    p.add_argument("--no-forcing", action="store_true", help="ns: drop the forcing term")
    p.add_argument("--bc", choices=("transmissive", "reflective"), help="swe boundary")
    p.add_argument("--M", type=float, help="cfd Mach number")
    p.add_argument("--eta", type=float, help="cfd shear viscosity")
    p.add_argument("--zeta", type=float, help="cfd bulk viscosity")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="any other solver parameter")
    p.add_argument("--float64", action="store_true", help="fno layouts: store float64")
    p.add_argument("--split", default="train", choices=("train", "valid", "test"), help="pdearena-ns group")
    p.add_argument("--dataset-name", dest="dataset_name", help="the-well dataset_name")
    p.add_argument("--batch-size", type=int, default=16, help="trajectories integrated together")
    p.add_argument("--demo", type=Path, metavar="DIR", help="write the four-family demo set into DIR")
    p.add_argument("--tiny", action="store_true", help="with --demo: test sizes (2 x 16^2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        if args.demo is not None:
            write_demo(args.demo, args.tiny, args.seed, progress=not args.quiet)
            return 0
        if args.pde is None or args.out is None:
            raise ValueError("give --pde and --out (or --demo DIR)")
        layout = args.layout or DEFAULT_LAYOUT[args.pde]
        kw = parse_params(args)
        if args.float64:
            kw["float64"] = True
        if layout == "pdearena-ns":
            kw["split"] = args.split
        if args.dataset_name:
            kw["dataset_name"] = args.dataset_name
        path = write_dataset(
            args.pde,
            layout,
            args.out,
            args.n,
            args.res,
            args.steps,
            args.seed,
            progress=not args.quiet,
            batch_size=args.batch_size,
            **kw,
        )
        if not args.quiet:
            print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)
        return 0
    except (ValueError, KeyError, FloatingPointError, OSError) as e:
        print(f"gen_pde: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
