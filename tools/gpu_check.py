#!/usr/bin/env python
"""Check the GPU paths of NESTOR-DS on one CUDA device, in one short run, and write what was measured.

    python tools/gpu_check.py --out gpu_check.json [--parts equivalence,kernels,bench,train]

1. CUDA vs CPU: the same weights give the same fp32 output (local MoE backend, grouped_mm on both).
2. bf16 autocast forward + backward is finite; which attention kernel SDPA can use (flash / efficient / math),
   and whether flash-attn and MegaBlocks are importable.
3. Throughput of nestor-ti and afno-ti (forward + backward, bf16 autocast, B=32, 128x128): samples/s,
   achieved TFLOP/s from the analytic FLOPs, MFU against the device's dense bf16 peak; token MoE vs dense SwiGLU.
4. train: the real entry on one GPU with NCCL: tiny generated data -> shards -> `nestor_ds/train.py`
   with ds_configs/zero2_bf16.json (DeepSpeed-MoE backend) and zero3_bf16.json (AFNO baseline).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


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
    return {"cpu_vs_cuda_fp32_max_abs_diff": float((a - b).abs().max()), "ok": bool(torch.allclose(a, b, atol=1e-3, rtol=1e-3))}


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


def bench_models(batch: int, res: int) -> dict:
    from nestor_ds.model import build_model, get_preset
    from nestor_ds.model.flops import account

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    out: dict = {"device": name, "batch": batch, "resolution": res}
    for preset in ("nestor-ti", "afno-ti"):
        cfg = get_preset(preset, {"resolution": res})
        torch.manual_seed(0)
        model = build_model(cfg).cuda().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(batch, res, res, cfg.t_in, cfg.in_channels, device="cuda")
        y = torch.randn(batch, res, res, cfg.t_ar, cfg.in_channels, device="cuda")
        mask = torch.ones(batch, cfg.in_channels, dtype=torch.bool, device="cuda")

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                o = model(x, mask)
                loss = (o.pred.float() - y).square().mean() + sum(o.aux_losses.values())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        sec = timed(step)
        flops = 3 * account(cfg).flops_per_sample * batch / sec
        out[preset] = {"samples_per_s": batch / sec, "tflops": flops / 1e12, "mfu": flops / peak if peak else None,
                       "finite": bool(torch.isfinite(model(x, mask).pred).all())}
        torch.cuda.empty_cache()
    out["flop_rate_ratio"] = out["nestor-ti"]["tflops"] / out["afno-ti"]["tflops"]

    from nestor_ds.moe import MoEConfig, build_token_moe

    D, N = 512, 16384
    moe = build_token_moe(MoEConfig(num_experts=6, top_k=2, num_shared_experts=1), D).cuda()
    hidden = D * 3  # 2 routed + 1 shared expert of width D activated per token
    dense = torch.nn.Sequential(torch.nn.Linear(D, 2 * hidden, bias=False), torch.nn.Linear(hidden, D, bias=False)).cuda()
    xt = torch.randn(N, D, device="cuda", requires_grad=True)

    def moe_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            moe(xt).out_ND.float().sum().backward()

    def dense_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = dense[0](xt)
            a, b = h.chunk(2, dim=-1)
            dense[1](torch.nn.functional.silu(a) * b).float().sum().backward()

    out["moe_vs_dense"] = timed(dense_step) / timed(moe_step)
    return out


def train_entry(workdir: Path) -> dict:
    from nestor_ds.data.builder import BuildConfig, build
    from nestor_ds.data.layout_writers import write_dataset

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    shards = {}
    for i, (name, pde, layout) in enumerate((("ns", "ns", "fno-mat"), ("dr", "dr", "pdebench-groups"))):
        raw = write_dataset(pde, layout, workdir / f"{name}.h5", n=8, res=32, steps=16, seed=i)
        build(BuildConfig(inputs=[str(raw)], out=str(workdir / "shards" / name), name=name, test_fraction=0.25, progress=False))
        shards[name] = workdir / "shards" / name
    datasets = "[" + ",".join(f"{{name: {n}, path: '{p}'}}" for n, p in shards.items()) + "]"
    common = [f"data.datasets={datasets}", "data.resolution=32", "data.channels=2", "data.t_in=10",
              "train.max_steps=20", "train.eval_every=0", "train.ckpt_every=20", "tracking.enabled=false",
              f"train.output_dir={workdir / 'runs'}"]
    results = {}
    for label, ds, extra in (("zero2_bf16_deepspeed_moe", "zero2_bf16.json", ["model.preset=nestor-tiny", "model.moe.backend=deepspeed"]),
                             ("zero3_bf16_afno", "zero3_bf16.json", ["model.preset=afno-tiny"])):
        cmd = [sys.executable, str(ROOT / "nestor_ds" / "train.py"), "--ds_config", str(ROOT / "ds_configs" / ds),
               "--config", str(ROOT / "configs" / "pretrain_demo.yaml"), "--run-name", label]
        for s in common + extra:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
        metrics = workdir / "runs" / label / "metrics.jsonl"
        losses = [json.loads(l)["train/loss"] for l in metrics.read_text().splitlines()] if metrics.is_file() else []
        results[label] = {"exit": proc.returncode, "seconds": time.perf_counter() - t0, "first_loss": losses[:1],
                          "last_loss": losses[-1:], "steps": len(losses),
                          "stderr_tail": proc.stderr[-1500:] if proc.returncode else ""}
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="JSON report path")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--parts", default="equivalence,kernels,bench,train",
                   help="comma-separated subset of: equivalence, kernels, bench, train (default: all)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check")
        return 0
    report: dict = {"torch": torch.__version__, "cuda": torch.version.cuda}
    parts = set(args.parts.split(","))
    for name, fn in (("equivalence", check_equivalence), ("kernels", check_kernels),
                     ("bench", lambda: bench_models(args.batch, args.res))):
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
