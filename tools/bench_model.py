"""Training-step throughput of nestor-ti vs afno-ti, eager vs compiled, token MoE vs dense, DFT vs FFT.

    python -m tools.bench_model [--json] [--device cpu|cuda] [--dtype fp32|bf16] [--compile]
                                [--routing static|dropless] [--batch 8] [--res 128] [--threads 2] [--reps 5]

Everything is measured side by side in one process (repetitions interleaved A B A B ..., median taken), because
the machine may be shared; no ratio is taken against a number recorded elsewhere.

- Models: forward + loss + backward of nestor-ti and afno-ti at the same batch and resolution (parameters cast to
  --dtype, as DeepSpeed does for bf16). Achieved FLOP rate = analytic training FLOPs (3 x forward,
  nestor_ds.model.flops) x samples/s; MFU = that rate / the device's dense bf16 peak (CUDA only).
  With --compile each model also runs compiled the way the trainer compiles it (regional, nestor_ds/engine/
  compile.py) and `compile_speedup` = compiled / eager samples/s.
- host_syncs_per_step: reads of tensor values back to the host during one training step
  (nestor_ds.engine.sync_count; on CUDA also the syncs torch.cuda.set_sync_debug_mode reports).
- kernels_per_step: device kernels launched by one training step (torch.profiler; on CPU the aten operators
  that run kernels, i.e. the leaf operators).
- Token MoE (--routing) vs one dense SwiGLU of the same activated FLOPs per token (`moe_vs_dense`).
- AFNO spectral mixing at nestor-ti's width and token grid: real DFT matmuls vs fp32 FFT islands
  (`spectral_dft_vs_fft` = FFT time / DFT time; > 1: the DFT is faster).
With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from tqdm import tqdm

from nestor_ds.engine.compile import apply_compile
from nestor_ds.engine.perf import peak_flops
from nestor_ds.engine.sync_count import count_host_reads
from nestor_ds.model import build_model, get_preset
from nestor_ds.model.afno import SpectralMixing
from nestor_ds.model.flops import forward_flops
from nestor_ds.moe import SwiGLU, build_token_moe

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def routing_overrides(routing: str) -> dict:
    return {"image_routing": routing, "moe": {"routing": routing}}


class ModelBench:
    """One model's training step (forward + masked L2 loss + aux losses + backward) on fixed random data."""

    def __init__(
        self,
        name: str,
        batch: int,
        res: int,
        device: torch.device,
        dtype: torch.dtype,
        routing: str,
        compile_: bool,
        cuda_graphs: bool = False,
    ) -> None:
        over = {"resolution": res, **(routing_overrides(routing) if name.startswith("nestor") else {})}
        self.cfg = get_preset(name, over)
        torch.manual_seed(0)
        self.model = build_model(self.cfg).to(device=device, dtype=dtype).train()
        self.plan = apply_compile(self.model, compile_, cuda_graphs, device)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, res, res, self.cfg.t_in, self.cfg.in_channels, generator=g).to(device, dtype)
        self.y = torch.randn(batch, res, res, self.cfg.t_ar, self.cfg.c_out, generator=g).to(device)
        self.mask = torch.ones(batch, self.cfg.c_out, dtype=torch.bool, device=device)
        self.device = device
        mm, fft = forward_flops(self.cfg)
        self.train_flops_per_sample = 3 * (mm + fft)

    def step(self) -> None:
        from nestor_ds.config import LossConfig
        from nestor_ds.engine.loss import training_loss

        self.plan.step_begin()
        self.model.zero_grad(set_to_none=True)
        out = self.model(self.x, self.mask)
        loss, _ = training_loss(out.pred.float(), self.y, self.mask, out.aux_losses, LossConfig())
        loss.backward()


def synced(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    def run() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def interleave(steps: dict[str, Callable[[], None]], reps: int, warmup: int, desc: str) -> dict[str, list[float]]:
    """Seconds per call of each closure, repetitions interleaved (A B A B ...)."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in tqdm(range(reps), desc=desc, leave=False):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def host_syncs(fn: Callable[[], None], device: torch.device) -> int:
    """Host reads during one call: tensor-value reads counted in Python, plus (CUDA) the driver-level syncs that
    torch.cuda.set_sync_debug_mode reports, whichever is larger (they overlap)."""
    ctx = warnings.catch_warnings(record=True) if device.type == "cuda" else contextlib.nullcontext([])
    with ctx as caught, count_host_reads() as reads:
        if device.type == "cuda":
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    cuda_syncs = sum("synchroniz" in str(w.message).lower() for w in (caught or []))
    return max(reads.total, cuda_syncs)


def kernels_per_step(fn: Callable[[], None], device: torch.device) -> int:
    """Device kernels of one call (CUDA), or leaf aten operators (CPU), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.name.startswith("aten::") and not e.cpu_children)


def layer_step(layer: torch.nn.Module, x: torch.Tensor, moe: bool) -> Callable[[], None]:
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        out = layer(x).out_ND if moe else layer(x)
        out.float().square().mean().backward()

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--compile", action="store_true", help="also run the models compiled (regional), side by side")
    ap.add_argument(
        "--routing", choices=("static", "dropless"), default="dropless", help="NESTOR's routing (both levels)"
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (compiled: compile + autotune)")
    ap.add_argument("--tokens", type=int, default=2048, help="rows for the token-MoE vs dense comparison")
    ap.add_argument("--models", default="nestor-ti,afno-ti", help="two presets: MoE model, dense baseline")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    names = args.models.split(",")
    if args.batch < 1 or args.res % 8 or args.reps < 1 or len(names) != 2:
        print("error: need --batch >= 1, --res divisible by 8, --reps >= 1, --models A,B", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peak = peak_flops(device) if device.type == "cuda" else None
    modes = ("eager", "compiled") if args.compile else ("eager",)

    benches = {
        (n, m): ModelBench(n, args.batch, args.res, device, dtype, args.routing, m == "compiled")
        for n in names
        for m in modes
    }
    for (n, m), b in benches.items():  # first call outside the timing: compile (compiled) and lazy inits
        t0 = time.perf_counter()
        synced(b.step, device)()
        if m == "compiled":
            print(f"{n}: compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    times = interleave(
        {f"{n}/{m}": synced(b.step, device) for (n, m), b in benches.items()}, args.reps, args.warmup, "models"
    )
    res: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "routing": args.routing,
        "batch": args.batch,
        "res": args.res,
        "threads": args.threads if device.type == "cpu" else None,
        "reps": args.reps,
        "models": {},
    }
    for (n, m), b in benches.items():
        t = times[f"{n}/{m}"]
        sps = args.batch / statistics.median(t)
        rate = b.train_flops_per_sample * sps
        entry = {
            "samples_per_s": round(sps, 3),
            "samples_per_s_spread": [round(args.batch / max(t), 3), round(args.batch / min(t), 3)],
            "tflop_per_s": float(f"{rate / 1e12:.4g}"),
            "host_syncs_per_step": host_syncs(synced(b.step, device), device),
            "kernels_per_step": kernels_per_step(b.step, device),
        }
        if peak:
            entry["mfu"] = round(rate / peak, 4)
        res["models"].setdefault(n, {})[m] = entry
    best = modes[-1]
    a, d = names
    res["compile_speedup"] = (
        {
            n: round(res["models"][n]["compiled"]["samples_per_s"] / res["models"][n]["eager"]["samples_per_s"], 3)
            for n in names
        }
        if args.compile
        else None
    )
    res["flop_rate_ratio"] = round(res["models"][a][best]["tflop_per_s"] / res["models"][d][best]["tflop_per_s"], 3)
    res["host_syncs_per_step"] = {n: res["models"][n][best]["host_syncs_per_step"] for n in names}
    res["kernels_per_step"] = {n: res["models"][n][best]["kernels_per_step"] for n in names}
    del benches

    # token MoE vs dense SwiGLU of equal activated FLOPs, at nestor-ti's width
    mcfg = get_preset(a, routing_overrides(args.routing)).moe
    D = get_preset(a).width
    torch.manual_seed(0)
    moe = build_token_moe(mcfg, D).to(device, dtype).train()
    dense = SwiGLU(D, mcfg.hidden_dim(D) * mcfg.top_k + mcfg.shared_hidden_dim(D)).to(device, dtype)
    x = torch.randn(args.tokens, D, device=device, dtype=dtype)
    tl = interleave(
        {"moe": synced(layer_step(moe, x, True), device), "dense": synced(layer_step(dense, x, False), device)},
        args.reps * 2,
        args.warmup,
        "layers",
    )
    res["moe_ms"] = round(1e3 * statistics.median(tl["moe"]), 3)
    res["dense_ms"] = round(1e3 * statistics.median(tl["dense"]), 3)
    res["moe_vs_dense"] = round(res["dense_ms"] / res["moe_ms"], 3)

    # AFNO spectral mixing: DFT matmuls vs FFT islands (eager, and compiled with --compile)
    acfg = get_preset(d, {"resolution": args.res})
    grid = acfg.grid
    spec = {}
    for mode in ("dft", "fft"):
        torch.manual_seed(0)
        layer = SpectralMixing(acfg.width, acfg.afno_num_blocks, acfg.afno_modes, acfg.afno_sparsity)
        layer.set_mode(mode, grid)
        layer = layer.to(device, dtype)
        fn = layer_step(
            torch.compile(layer, fullgraph=True) if args.compile else layer,
            torch.randn(args.batch, acfg.width, grid, grid, device=device, dtype=dtype),
            False,
        )
        spec[mode] = synced(fn, device)
    ts = interleave(spec, args.reps * 2, args.warmup + 1, "spectral")
    res["spectral_ms"] = {k: round(1e3 * statistics.median(v), 3) for k, v in ts.items()}
    res["spectral_dft_vs_fft"] = round(res["spectral_ms"]["fft"] / res["spectral_ms"]["dft"], 3)

    for n in names:
        parts = [
            f"{m} {res['models'][n][m]['samples_per_s']} samples/s ({res['models'][n][m]['tflop_per_s']} TFLOP/s"
            + (f", MFU {res['models'][n][m]['mfu']:.1%}" if "mfu" in res["models"][n][m] else "")
            + ")"
            for m in modes
        ]
        print(
            f"{n}: " + "; ".join(parts) + f"; host syncs/step {res['host_syncs_per_step'][n]}, "
            f"kernels/step {res['kernels_per_step'][n]}"
        )
    print(f"FLOP-rate ratio {a}/{d}: {res['flop_rate_ratio']}; compile speedup: {res['compile_speedup']}")
    print(
        f"token MoE ({args.routing}) {res['moe_ms']} ms vs dense SwiGLU {res['dense_ms']} ms: {res['moe_vs_dense']}; "
        f"AFNO spectral DFT {res['spectral_ms']['dft']} ms vs FFT {res['spectral_ms']['fft']} ms"
    )
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
