"""Training-step throughput of nestor-ti vs afno-ti, and of the token-MoE layer vs a dense SwiGLU.

    python tools/bench_model.py [--json] [--batch 8] [--res 128] [--threads 2] [--reps 5]

Forward + backward samples/s for both models at the same batch and resolution, measured side by side
(repetitions interleaved, median taken) because the machine is shared; achieved FLOP rate = analytic
training FLOPs (3 x forward, nestor_ds.model.flops) x samples/s. The token-MoE comparison runs nestor-ti's
token MoE (local backend, this device's kernel: 6 experts top-2 + 1 shared) against one SwiGLU whose hidden
width gives the same activated FLOPs per token. With --json the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
from tqdm import tqdm

from nestor_ds.model import build_model, get_preset
from nestor_ds.model.flops import forward_flops
from nestor_ds.moe import SwiGLU, build_token_moe

AUTHORS_NESTOR_TI = 3.2       # samples/s, authors' code, B=8, 128^2, 2 threads (docs/REFERENCE)


def model_step(name: str, batch: int, res: int) -> tuple[Callable[[], None], int]:
    """One fwd+bwd closure and the model's forward FLOPs per sample at this resolution."""
    cfg = get_preset(name, {"resolution": res})
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, res, res, cfg.t_in, cfg.in_channels, generator=g)
    y = torch.randn(batch, res, res, cfg.t_ar, cfg.c_out, generator=g)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(x)
        loss = (out.pred - y).square().mean() + sum(out.aux_losses.values())
        loss.backward()

    mm, fft = forward_flops(cfg)
    return step, mm + fft


def layer_step(layer: torch.nn.Module, x: torch.Tensor, moe: bool) -> Callable[[], None]:
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        out = layer(x).out_ND if moe else layer(x)
        out.square().mean().backward()
    return step


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(steps: dict[str, Callable[[], None]], reps: int, warmup: int, desc: str) -> dict[str, float]:
    """Median seconds per call of each closure, repetitions interleaved (A B A B ...)."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in tqdm(range(reps), desc=desc, leave=False):
        for k, fn in steps.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2048, help="rows for the token-MoE vs dense comparison")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.res % 8 or args.reps < 1:
        print("error: need --batch >= 1, --res divisible by 8, --reps >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    nestor, f_nestor = model_step("nestor-ti", args.batch, args.res)
    afno, f_afno = model_step("afno-ti", args.batch, args.res)
    t = interleave({"nestor": nestor, "afno": afno}, args.reps, args.warmup, "models")
    sps = {k: args.batch / v for k, v in t.items()}
    rate = {"nestor": 3 * f_nestor * sps["nestor"], "afno": 3 * f_afno * sps["afno"]}

    D = 512
    mcfg = get_preset("nestor-ti").moe                     # the token MoE inside nestor-ti's image experts
    moe = build_token_moe(mcfg, D)
    dense = SwiGLU(D, mcfg.hidden_dim(D) * mcfg.top_k + mcfg.shared_hidden_dim(D))
    x = torch.randn(args.tokens, D)
    tl = interleave({"moe": layer_step(moe, x, True), "dense": layer_step(dense, x, False)},
                    args.reps * 2, args.warmup, "layers")

    res = {
        "batch": args.batch, "res": args.res, "threads": args.threads,
        "nestor_samples_per_s": round(sps["nestor"], 3),
        "afno_samples_per_s": round(sps["afno"], 3),
        "nestor_gflop_per_s": round(rate["nestor"] / 1e9, 2),
        "afno_gflop_per_s": round(rate["afno"] / 1e9, 2),
        "flop_rate_ratio": round(rate["nestor"] / rate["afno"], 3),
        "nestor_vs_authors": round(sps["nestor"] / AUTHORS_NESTOR_TI, 3),
        "moe_ms": round(1e3 * tl["moe"], 2), "dense_ms": round(1e3 * tl["dense"], 2),
        "moe_vs_dense": round(tl["dense"] / tl["moe"], 3),
    }
    print(f"nestor-ti {res['nestor_samples_per_s']} samples/s ({res['nestor_gflop_per_s']} GFLOP/s), "
          f"afno-ti {res['afno_samples_per_s']} samples/s ({res['afno_gflop_per_s']} GFLOP/s); "
          f"FLOP-rate ratio {res['flop_rate_ratio']}; nestor-ti vs authors' 3.2/s: {res['nestor_vs_authors']}x")
    print(f"token MoE {res['moe_ms']} ms vs dense SwiGLU {res['dense_ms']} ms (same activated FLOPs, "
          f"{args.tokens} tokens): throughput ratio {res['moe_vs_dense']}")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
