"""`python -m nestor_ds.model --preset NAME [--json] [--set key=value ...]`: parameter and FLOP accounting."""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from .flops import account
from .presets import get_preset, list_presets


def parse_sets(items: list[str]) -> dict:
    """key=value pairs (values parsed as YAML scalars; `moe.top_k=1` reaches the token MoE)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nestor_ds.model", description=__doc__)
    ap.add_argument("--preset", default="nestor-ti", help=f"one of {list_presets()}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a ModelConfig field")
    ap.add_argument(
        "--json", action="store_true", help="last line: JSON with total_params, active_params, flops_per_sample"
    )
    ap.add_argument("--list", action="store_true", help="list presets and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(list_presets()))
        return 0
    try:
        cfg = get_preset(args.preset, parse_sets(args.set))
        acc = account(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"preset            {args.preset} (arch={cfg.arch}, width={cfg.width}, depth={cfg.depth}, "
        f"resolution={cfg.resolution}, t_in={cfg.t_in})"
    )
    print(f"total params      {acc.total_params:,} ({acc.total_params / 1e6:.2f} M)")
    print(f"active params     {acc.active_params:,} ({acc.active_params / 1e6:.2f} M) per sample")
    print(
        f"forward FLOPs     {acc.flops_per_sample / 1e9:.3f} G per sample "
        f"(matmul/conv/attention {acc.matmul_flops / 1e9:.3f} G + FFT {acc.fft_flops / 1e9:.3f} G)"
    )
    print(f"training FLOPs    {3 * acc.flops_per_sample / 1e9:.3f} G per sample (3 x forward)")
    if args.json:
        print(json.dumps(acc.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
