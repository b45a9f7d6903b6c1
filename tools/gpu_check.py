#!/usr/bin/env python
"""Check the GPU paths of NESTOR-DS on one CUDA device, in one short run, and write what was measured.

    python -m tools.gpu_check --out gpu_check.json [--parts equivalence,kernels,bench,legacy,train]

1. CUDA vs CPU: the same weights give the same fp32 output (local MoE backend, grouped_mm on both).
2. bf16 autocast forward + backward is finite; which attention kernel SDPA can use (flash / efficient / math),
   and whether flash-attn and MegaBlocks are importable.
3. bench: the bf16 training step of nestor-ti (static routing) and afno-ti, eager at the first micro-batch, then
   compiled (regional) with CUDA graphs over a micro-batch sweep (--batches, stops at OOM or --bench-budget):
   samples/s, TFLOP/s, MFU against the dense bf16 peak, kernels and host syncs per step, best micro-batch
   (the value for ds_configs/*_bf16.json); token MoE (static and dropless) vs a dense SwiGLU of equal FLOPs.
   `python -m tools.gpu_check --parts bench --out docs/gpu_bench_h200.json` runs in about 6 minutes on an H200.
4. legacy: our token MoE (ep 1, grouped kernel) against DeepSpeed's legacy MoE layer (ep 1) on one GPU in bf16,
   on balanced, skewed + padded and trained-routing inputs (`python -m tools.bench_moe_ep --one-device`):
   `ceiling_vs_legacy`, the most an expert-parallel path can gain over that layer (docs/benchmarks.md).
5. train: the real entry on one GPU with NCCL: tiny generated data -> shards -> `python -m nestor_ds.train`
   with ds_configs/zero2_bf16.json (NESTOR, local token-MoE backend) and zero3_bf16.json (AFNO baseline).
Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, reps: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def check_equivalence() -> dict:
    from nestor_ds.model import build_model, get_preset

    torch.manual_seed(0)
    cfg = get_preset("nestor-tiny", {"resolution": 32, "width": 64, "num_heads": 4})
    cpu = build_model(cfg).eval()
    gpu = build_model(cfg).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(4, 32, 32, cfg.t_in, cfg.in_channels)
    mask = torch.ones(4, cfg.in_channels, dtype=torch.bool)
    with torch.no_grad():
        a = cpu(x, mask).pred
        b = gpu(x.cuda(), mask.cuda()).pred.cpu()
    return {
        "cpu_vs_cuda_fp32_max_abs_diff": float((a - b).abs().max()),
        "ok": bool(torch.allclose(a, b, atol=1e-3, rtol=1e-3)),
    }


def check_kernels() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict = {}
    q = torch.randn(8, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            out[f"sdpa_{name}_bf16"] = True
        except RuntimeError as e:
            out[f"sdpa_{name}_bf16"] = f"unavailable: {str(e).splitlines()[0][:120]}"
    for mod in ("flash_attn", "megablocks", "deepspeed"):
        try:
            m = __import__(mod)
            out[f"{mod}_version"] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001 - report, do not fail
            out[f"{mod}_version"] = f"not importable ({type(e).__name__})"
    from nestor_ds.moe.experts import grouped_mm_supported

    out["grouped_mm_cuda_bf16"] = grouped_mm_supported(torch.device("cuda"), torch.bfloat16, 512, 512)
    return out


def bench_models(batches: list[int], res: int, budget_s: float) -> dict:
    """Micro-batch sweep of the bf16 training step, eager vs compiled (+ CUDA graphs), nestor-ti and afno-ti.

    The step is tools/bench_model.py's (forward + loss + backward, parameters in bf16 as DeepSpeed casts them;
    nestor-ti with static routing, which compile and CUDA graphs need). For each model: eager at the first batch
    (the "before"), then the compiled model at every batch until memory runs out or the time budget is spent; the
    best micro-batch (samples/s) is the one for ds_configs/*_bf16.json. Kernels per step from torch.profiler.
    """
    from nestor_ds.engine.perf import peak_flops
    from tools.bench_model import ModelBench, host_syncs, kernels_per_step, synced

    t_start = time.perf_counter()
    dev = torch.device("cuda")
    torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per micro-batch (CUDA graphs)
    peak = peak_flops(dev)
    out: dict = {"device": torch.cuda.get_device_name(), "resolution": res, "peak_bf16_flops": peak, "models": {}}

    def measure(bench: ModelBench, batch: int) -> dict:
        step = synced(bench.step, dev)
        step()
        sec = timed(step, reps=10, warmup=3)
        rate = bench.train_flops_per_sample * batch / sec
        return {
            "samples_per_s": round(batch / sec, 2),
            "tflop_per_s": round(rate / 1e12, 2),
            "mfu": round(rate / peak, 4) if peak else None,
            "kernels_per_step": kernels_per_step(bench.step, dev),
            "host_syncs_per_step": host_syncs(step, dev),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }

    for preset in ("nestor-ti", "afno-ti"):
        rows: dict = {"eager": {}, "compiled": {}}
        torch.cuda.reset_peak_memory_stats()
        eager = ModelBench(preset, batches[0], res, dev, torch.bfloat16, "static", compile_=False)
        rows["eager"][batches[0]] = measure(eager, batches[0])
        del eager
        for batch in batches:
            if time.perf_counter() - t_start > budget_s:
                rows["stopped"] = f"time budget {budget_s:.0f} s spent before batch {batch}"
                break
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch._dynamo.reset()  # fresh code cache per (model, batch)
            try:
                bench = ModelBench(preset, batch, res, dev, torch.bfloat16, "static", compile_=True, cuda_graphs=True)
                rows["compiled"][batch] = measure(bench, batch)
            except torch.cuda.OutOfMemoryError:
                rows["stopped"] = f"out of memory at batch {batch}"
                break
            finally:
                bench = None
            print(preset, batch, json.dumps(rows["compiled"].get(batch)), flush=True)
        done = rows["compiled"]
        if done:
            best = max(done, key=lambda b: done[b]["samples_per_s"])
            rows["best_micro_batch"] = best
            rows["best"] = done[best]
            e = rows["eager"][batches[0]]
            same = done.get(batches[0])
            if same:
                rows["compile_speedup_at_first_batch"] = round(same["samples_per_s"] / e["samples_per_s"], 3)
                rows["kernels_reduction_at_first_batch"] = round(
                    e["kernels_per_step"] / max(1, same["kernels_per_step"]), 2
                )
        out["models"][preset] = rows
    m = out["models"]
    if m.get("nestor-ti", {}).get("best") and m.get("afno-ti", {}).get("best"):
        out["flop_rate_ratio_best"] = round(
            m["nestor-ti"]["best"]["tflop_per_s"] / m["afno-ti"]["best"]["tflop_per_s"], 3
        )

    from nestor_ds.moe import MoEConfig, SwiGLU, build_token_moe

    D, N = 512, 16384
    for routing in ("static", "dropless"):
        mcfg = MoEConfig(num_experts=6, top_k=2, num_shared_experts=1, routing=routing)
        moe = build_token_moe(mcfg, D).to(dev, torch.bfloat16).train()
        dense = SwiGLU(D, mcfg.hidden_dim(D) * mcfg.top_k + mcfg.shared_hidden_dim(D)).to(dev, torch.bfloat16)
        xt = torch.randn(N, D, device=dev, dtype=torch.bfloat16)
        moe_c = torch.compile(moe, fullgraph=routing == "static") if routing == "static" else moe
        dense_c = torch.compile(dense)

        def moe_step(moe_c=moe_c, xt=xt) -> None:
            moe_c(xt).out_ND.float().square().mean().backward()

        def dense_step(dense_c=dense_c, xt=xt) -> None:
            dense_c(xt).float().square().mean().backward()

        out[f"moe_vs_dense_{routing}"] = round(timed(dense_step) / timed(moe_step), 3)
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    return out


def legacy_ceiling(tokens: tuple[int, ...] = (4096, 16384), reps: int = 5) -> dict:
    """tools/bench_moe_ep.py --one-device in its own process (it starts a process group of one, which must not
    leak into the training runs of the `train` part), on the routing profile of a trained model."""
    profile = ROOT / "docs" / "routing_profiles" / "nestor-64-s0-b480.json"
    cmd = [sys.executable, "-m", "tools.bench_moe_ep", "--one-device", "--json", "--reps", str(reps)]
    cmd += ["--tokens", *map(str, tokens), "--profile", str(profile)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-500:]}"}
    return json.loads(proc.stdout)


def train_entry(workdir: Path) -> dict:
    from nestor_ds.shards.build import BuildConfig, build
    from nestor_ds.synth.layouts import write_dataset

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}  # `-m nestor_ds.train` from any cwd
    shards = {}
    for i, (name, pde, layout) in enumerate((("ns", "ns", "fno-mat"), ("dr", "dr", "pdebench-groups"))):
        raw = write_dataset(pde, layout, workdir / f"{name}.h5", n=8, res=32, steps=16, seed=i)
        build(
            BuildConfig(
                inputs=[str(raw)], out=str(workdir / "shards" / name), name=name, test_fraction=0.25, progress=False
            )
        )
        shards[name] = workdir / "shards" / name
    datasets = "[" + ",".join(f"{{name: {n}, path: '{p}'}}" for n, p in shards.items()) + "]"
    common = [
        f"data.datasets={datasets}",
        "data.resolution=32",
        "data.channels=2",
        "data.t_in=10",
        "train.max_steps=20",
        "train.eval_every=0",
        "train.ckpt_every=20",
        "tracking.enabled=false",
        f"train.output_dir={workdir / 'runs'}",
    ]
    results = {}
    for label, ds, extra in (
        ("zero2_bf16_nestor_local_moe", "zero2_bf16.json", ["model.preset=nestor-tiny", "model.moe.backend=local"]),
        ("zero3_bf16_afno", "zero3_bf16.json", ["model.preset=afno-tiny"]),
    ):
        cmd = [
            sys.executable,
            "-m",
            "nestor_ds.train",
            "--ds_config",
            str(ROOT / "ds_configs" / ds),
            "--config",
            str(ROOT / "configs" / "pretrain_demo.yaml"),
            "--run-name",
            label,
        ]
        for s in common + extra:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
        metrics = workdir / "runs" / label / "metrics.jsonl"
        rows = metrics.read_text().splitlines() if metrics.is_file() else []
        losses = [json.loads(row)["train/loss"] for row in rows]
        results[label] = {
            "exit": proc.returncode,
            "seconds": time.perf_counter() - t0,
            "first_loss": losses[:1],
            "last_loss": losses[-1:],
            "steps": len(losses),
            "stderr_tail": proc.stderr[-1500:] if proc.returncode else "",
        }
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="JSON report path")
    p.add_argument("--batches", default="16,32,64,128,256", help="bench: micro-batches swept (compiled, bf16)")
    p.add_argument("--bench-budget", type=float, default=330.0, help="bench: seconds after which the sweep stops")
    p.add_argument("--res", type=int, default=128)
    p.add_argument(
        "--parts",
        default="equivalence,kernels,bench,legacy,train",
        help="comma-separated subset of: equivalence, kernels, bench, legacy, train (default: all)",
    )
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check")
        return 0
    report: dict = {"torch": torch.__version__, "cuda": torch.version.cuda}
    parts = set(args.parts.split(","))
    for name, fn in (
        ("equivalence", check_equivalence),
        ("kernels", check_kernels),
        ("bench", lambda: bench_models([int(b) for b in args.batches.split(",")], args.res, args.bench_budget)),
        ("legacy", legacy_ceiling),
    ):
        if name not in parts:
            continue
        try:
            report[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failing part must not hide the others
            report[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(name, json.dumps(report[name]), flush=True)
    if "train" in parts:
        with tempfile.TemporaryDirectory() as d:
            try:
                report["train"] = train_entry(Path(d))
            except Exception as e:  # noqa: BLE001
                report["train"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print("train", json.dumps(report["train"]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
