"""GPU check of the token MoE: local grouped_mm vs the padded batched kernel vs MegaBlocks on the same weights.

On CUDA: checks that the backends agree (outputs, lb loss, counts) and prints forward+backward
timings; with no CUDA it says so and exits 0. MegaBlocks is compared only when `import megablocks`
works (pip install -r requirements-gpu.txt --no-build-isolation).

    python -m tools.gpu_check_moe [--tokens 16384 --dim 512 --experts 6 --top-k 2 --iters 20 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nestor_ds.moe import MoEConfig, build_token_moe, grouped_mm_supported


def time_fwd_bwd(moe, x, valid, iters: int) -> float:
    """Median milliseconds of forward + backward (outputs and both aux losses)."""
    times = []
    for i in range(iters + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = moe(x, valid)
        (out.out_ND.float().square().mean() + out.lb_loss + out.z_loss).backward()
        torch.cuda.synchronize()
        if i >= 3:  # warm-up
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--experts", type=int, default=6)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check_moe: no CUDA device, skipped")
        return 0
    dev = torch.device("cuda")
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "tokens": args.tokens,
        "dim": args.dim,
        "experts": args.experts,
        "top_k": args.top_k,
    }
    cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k)
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        torch.manual_seed(0)
        moe = build_token_moe(cfg, args.dim).to(dev, dtype)
        x = torch.randn(args.tokens, args.dim, device=dev, dtype=dtype)
        valid = torch.rand(args.tokens, device=dev) > 0.1
        grouped_ok = grouped_mm_supported(dev, dtype, args.dim, moe.hidden)
        report[f"{name}_grouped_mm_supported"] = grouped_ok
        moe.kernel = "padded"
        ref = moe(x, valid)
        report[f"{name}_padded_ms"] = time_fwd_bwd(moe, x, valid, args.iters)
        if grouped_ok:
            moe.kernel = "grouped"
            out = moe(x, valid)
            report[f"{name}_grouped_vs_padded_max_err"] = (out.out_ND - ref.out_ND).abs().max().item()
            report[f"{name}_grouped_ms"] = time_fwd_bwd(moe, x, valid, args.iters)
        try:
            mb = build_token_moe(MoEConfig(backend="megablocks", num_experts=args.experts, top_k=args.top_k), args.dim)
        except RuntimeError as err:
            report["megablocks"] = str(err).splitlines()[0][:200]
            continue
        if dtype != torch.bfloat16:
            continue  # the dMoE was built in bf16
        mb.load_local_state({k: v.to(torch.bfloat16) for k, v in moe.state_dict().items()})
        mb_out = mb(x, valid)
        report["megablocks_vs_local_bf16_max_err"] = (mb_out.out_ND.float() - ref.out_ND.float()).abs().max().item()
        report["megablocks_counts_equal"] = mb_out.tokens_per_expert_E.tolist() == ref.tokens_per_expert_E.tolist()
        report["megablocks_bf16_ms"] = time_fwd_bwd(mb, x, valid, args.iters)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
