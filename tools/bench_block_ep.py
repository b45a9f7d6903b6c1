"""NESTOR under expert parallelism, side by side on 2 gloo ranks: one token exchange per block vs the token MoEs of
the image experts called one at a time (each padded to the group's largest sample count).

    python -m tools.bench_block_ep --json                  # launches 2 ranks itself (torch.distributed.run)
    python -m tools.bench_block_ep --preset nestor-ti --micro-batch 4 --rounds 3

The whole model's forward + backward (training mode, dropless, ep_size 2) on a random batch per rank; rounds
alternate the two paths in one process (`ImageMoE.one_exchange`), so a machine whose speed drifts slows both alike.
A step is the slower rank's time; each round reports the median of `--steps` timed steps after 2 untimed ones.
Reported: per-round medians, `speedup` = per-call / one exchange (median over rounds), and the collectives per step
of each path (forward: calls of all_to_all_single, its functional form and all_reduce; the backward makes
the row exchanges again).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from tools.two_ranks import emit, launch

SMALL = {  # the equal-compute study's nestor-64 (configs/study_cpu32.yaml)
    "width": 64, "patch_size": 4, "depth": 2, "num_heads": 4, "image_experts": 6, "image_top_k": 2, "head_dim": 32,
    "resolution": 32, "t_in": 10, "in_channels": 4, "out_channels": 4, "shared_afno_layers": 2, "afno_modes": 4,
    "afno_num_blocks": 4,
}  # fmt: skip


def _count_collectives() -> dict[str, int]:
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    counter = {"calls": 0}
    for module, name in ((dist, "all_to_all_single"), (dist, "all_reduce"), (funcol, "all_to_all_single_autograd")):
        original = getattr(module, name)

        def counted(*args, _original=original, **kwargs):
            counter["calls"] += 1
            return _original(*args, **kwargs)

        setattr(module, name, counted)
    return counter


def worker(args: argparse.Namespace) -> None:
    import dataclasses

    import deepspeed
    import torch
    import torch.distributed as dist

    from nestor_ds.model import build_model, get_preset
    from nestor_ds.model.image_moe import ImageMoE
    from nestor_ds.model.parallelize import apply_expert_parallel

    torch.set_num_threads(args.threads)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    counter = _count_collectives()
    cfg = get_preset(args.preset, {} if args.preset != "nestor-tiny" else SMALL)
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, ep_size=2))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    apply_expert_parallel(model, dist.group.WORLD)
    blocks = [m for m in model.modules() if isinstance(m, ImageMoE)]
    gen = torch.Generator().manual_seed(100 + rank)  # different samples per rank: different image routing
    x = torch.randn(args.micro_batch, cfg.resolution, cfg.resolution, cfg.t_in, cfg.in_channels, generator=gen)
    medians: dict[str, list[float]] = {"per_call": [], "one_exchange": []}
    collectives: dict[str, int] = {}
    for _ in range(args.rounds):
        for path in medians:
            for b in blocks:
                b.one_exchange = path == "one_exchange"
            times = []
            for i in range(args.steps + 2):
                dist.barrier()
                counter["calls"] = 0
                t0 = time.perf_counter()
                out = model(x)
                (out.pred.square().mean() + sum(out.aux_losses.values())).backward()
                elapsed = torch.tensor([time.perf_counter() - t0])
                collectives[path] = counter["calls"]
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if i >= 2:
                    times.append(float(elapsed))
            medians[path].append(statistics.median(times))
    if rank == 0:
        speedups = [a / b for a, b in zip(medians["per_call"], medians["one_exchange"], strict=True)]
        result = {
            "preset": args.preset,
            "micro_batch": args.micro_batch,
            "threads_per_rank": args.threads,
            "step_s": medians,
            "speedup": statistics.median(speedups),
            "speedup_per_round": speedups,
            "forward_collectives_per_step": collectives,
        }
        emit(result)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ap.add_argument("--preset", default="nestor-tiny", help="model preset (default: the study's nestor-64)")
    ap.add_argument("--micro-batch", type=int, default=16, help="samples per rank (default 16)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds (default 4)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per path and round (default 8)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    args = ap.parse_args()
    if min(args.micro_batch, args.rounds, args.steps, args.threads) < 1:
        ap.error("--micro-batch, --rounds, --steps and --threads must be >= 1")
    if "RANK" in os.environ:
        worker(args)
        return
    result = launch("tools.bench_block_ep", sys.argv[1:], args.threads)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    ms = {k: ", ".join(f"{v * 1000:.0f}" for v in vs) for k, vs in result["step_s"].items()}
    print(f"per-call step ms: {ms['per_call']}; one exchange: {ms['one_exchange']}")
    calls = result["forward_collectives_per_step"]
    print(f"speedup (median over rounds) {result['speedup']:.2f}; forward collectives per step {calls}")


if __name__ == "__main__":
    main()
