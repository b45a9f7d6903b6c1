"""What expert parallelism would cost on a trained NESTOR's own routing (no GPU, no process group needed).

    python -m nestor_ds.routing.profile --checkpoint runs/x/model.safetensors --json
    python -m nestor_ds.routing.profile --checkpoint runs/x/checkpoints --micro-batch 32 --ranks 6 --ep 2 3 6

Under expert parallelism (moe.ep_size P, docs/scaling.md) two things depend on how the model routes, which a
synthetic benchmark input can only guess:
  - every token-MoE call of the group waits for the rank whose experts received the most rows;
  - every rank calls each image expert with the group's largest sample count for it, the rest as padding
    (the image expert's attention and norms run on padding; the token MoE skips it).
This command runs the model in evaluation mode (dropless routing: the counts training records) on the micro-batches
that `--ranks` data-parallel ranks would draw from the run's training stream (`TrainStream(rank=p,
world_size=ranks)`), reads each block's image and token counts (`ModelOutput.routing`), and replays them for
expert-parallel groups of P consecutive ranks (quantities below).
The quantities are for token MoEs called one at a time (static token routing's path, and ZeRO-3's);
`one_exchange_per_block` gives the first two for what dropless training and evaluation run: every rank runs all image
experts of a block on its own samples, then one token exchange serves all their token MoEs, so a block waits once.
`uniform_router` gives the same for a router that picks experts uniformly at random with the same batch: the part of
the imbalance that sampling alone causes (what a perfect load-balancing loss would leave).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from nestor_ds.cli import exit_on_user_error, run_cli
from nestor_ds.routing.record import add_recording_arguments, record, stream_config
from nestor_ds.routing.replay import QUANTITIES, replay, uniform_calls

PROG = "python -m nestor_ds.routing.profile"


def profile(args: argparse.Namespace) -> dict[str, Any]:
    """Record the model's routing on its training stream; the replay for each --ep, and for a uniform router."""
    import torch

    from nestor_ds.checkpoint.load import load_pretrained

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_pretrained(args.checkpoint)
    cfg = model.cfg
    calls = record(
        model, stream_config(model, args.checkpoint, args.data), args.micro_batch, args.ranks, args.steps, args.seed
    )
    token = calls.token_SRBET.astype(np.float64)
    uniform = uniform_calls(token.shape, args.micro_batch, cfg.grid**2, cfg.image_top_k, cfg.moe.top_k, args.seed)
    return {
        "checkpoint": str(args.checkpoint),
        "micro_batch": args.micro_batch,
        "ranks": args.ranks,
        "steps": args.steps,
        "tokens_per_sample": cfg.grid**2,
        "image_experts": cfg.image_experts,
        "image_top_k": cfg.image_top_k,
        "token_experts": int(token.shape[-1]),
        "token_top_k": cfg.moe.top_k,
        "token_assignments": int(token.sum()),
        "max_token_expert_share": float((token.sum(axis=(0, 1, 2, 3)) / token.sum()).max()),
        "ep": {str(p): replay(calls, p) for p in args.ep},
        "uniform_router": {str(p): replay(uniform, p) for p in args.ep},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{__doc__}\n{QUANTITIES}",
    )
    add_recording_arguments(p, ranks_default="2")
    p.add_argument("--ep", type=int, nargs="+", default=[2], help="expert-parallel sizes to replay (default 2)")
    p.add_argument("--out", default=None, help="also write the JSON here (input of tools.bench_moe_ep --profile)")
    args = p.parse_args(argv)
    args.ranks = args.ranks or 2
    if min(args.micro_batch, args.ranks, args.steps, args.threads, *args.ep) < 1:
        p.error("--micro-batch, --ranks, --ep, --steps and --threads must be >= 1")
    bad = [e for e in args.ep if args.ranks % e]
    if bad:
        p.error(f"--ep {bad} must divide --ranks {args.ranks}")
    return args


def main(argv: list[str] | None = None) -> int:
    """The command; a bad checkpoint, data or size ends it with one line (SystemExit), a bug with its traceback."""
    args = parse_args(argv)
    with exit_on_user_error(PROG):
        result = profile(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(
        f"{args.checkpoint}: {result['steps']} steps x {result['ranks']} ranks x {result['micro_batch']} samples, "
        f"largest token-expert share {result['max_token_expert_share']:.3f}"
    )
    for p, row in result["ep"].items():
        for name, r in (("model", row), ("uniform router", result["uniform_router"][p])):
            print(
                f"  ep {p} {name:>14}: expert rows ep1/epP {r['expert_rows_ratio']:.3f}, image-expert body rows "
                f"{r['body_rows_ratio']:.3f}, busiest rank / mean {r['rank_imbalance']:.3f}, "
                f"padding {r['padding_fraction']:.3f}; one exchange per block: expert rows "
                f"{r['one_exchange_per_block']['expert_rows_ratio']:.3f}, body rows "
                f"{r['one_exchange_per_block']['body_rows_ratio']:.3f}"
            )
    return 0


if __name__ == "__main__":
    run_cli(main)
