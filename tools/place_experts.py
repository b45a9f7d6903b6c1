"""Re-order a trained NESTOR's token experts so that each rank of an expert-parallel group carries an equal load.

    python -m tools.place_experts --checkpoint runs/x/model.safetensors --ep 2 --out runs/x/model-ep2.safetensors
    python -m tools.place_experts --checkpoint runs/x/checkpoints --ep 2 --out placed.safetensors --json

Under expert parallelism (moe.ep_size P) rank p holds token experts [p*E/P, (p+1)*E/P) of every token MoE, and
every exchange waits for the rank whose experts received the most rows; a trained router is not uniform, so the
rank that holds two popular experts sets the pace (docs/scaling.md, "What a trained model's routing costs").
This tool runs the model on its own training stream (as tools/routing_profile.py does), sums each token MoE's
assignments per expert, and re-orders that MoE's experts (router rows and weights together,
`nestor_ds.moe.placement`) so that the P groups carry loads as equal as a split can make them. The re-ordered model
computes the same function: the tool checks it on a recorded batch (outputs to 1e-5, token counts permuted) before
writing anything. The result is an ordinary export: fine-tune, evaluate or continue from it at ep_size P.

Printed: busiest rank over the group's mean per token-MoE call and the token-expert rows ratio ep 1 / ep P
(per call, and with one exchange per block as dropless training runs it), before and after, measured on steps the
order was NOT chosen from (the order is fitted on the first half of the recorded steps; the written model's order
on all of them).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from tools.routing_profile import Calls, add_recording_arguments, record, replay, stream_config


def image_moes(model: Any) -> list[Any]:
    """The model's image MoEs in block order (the order of ModelOutput.routing)."""
    from nestor_ds.model.image_moe import ImageMoE

    return [m for m in model.modules() if isinstance(m, ImageMoE)]


def orders_for(token_SRBET: np.ndarray, ep: int) -> list[list[list[int]]]:
    """orders[b][e]: the balanced order of the token experts of block b's image expert e, from summed counts."""
    from nestor_ds.moe.placement import balanced_order

    load_BET = token_SRBET.sum(axis=(0, 1)).astype(np.float64)
    return [[balanced_order(load_T.tolist(), ep) for load_T in load_ET] for load_ET in load_BET]


def permuted(calls: Calls, orders: list[list[list[int]]]) -> Calls:
    """The counts the re-ordered model records: token expert i of (b, e) is old expert orders[b][e][i]."""
    token = calls.token_SRBET.copy()
    for b, orders_b in enumerate(orders):
        for e, order in enumerate(orders_b):
            token[:, :, b, e, :] = calls.token_SRBET[:, :, b, e, order]
    return Calls(calls.image_SRBE, token)


def _summary(row: dict[str, Any]) -> dict[str, float]:
    return {
        "rank_imbalance": row["rank_imbalance"],
        "expert_rows_ratio": row["expert_rows_ratio"],
        "expert_rows_ratio_one_exchange": row["one_exchange_per_block"]["expert_rows_ratio"],
    }


def place(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from nestor_ds.checkpoint.export import save_safetensors
    from nestor_ds.checkpoint.load import inference_model_config, load_local_state, load_state_strict
    from nestor_ds.data.stream import TrainStream
    from nestor_ds.model import build_model
    from nestor_ds.moe.placement import place_token_experts

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    state, run_cfg, source = load_local_state(args.checkpoint)
    model = build_model(inference_model_config(run_cfg)).eval()
    load_state_strict(model, state, source)
    model.run_config = run_cfg
    moes = image_moes(model)
    if not moes:
        raise ValueError(f"{args.checkpoint}: the model has no token experts (an AFNO baseline?): nothing to place")
    E_tok = moes[0].experts[0].moe.num_experts
    if E_tok % args.ep:
        raise ValueError(f"--ep {args.ep} must divide the model's {E_tok} token experts")
    data_cfg = stream_config(model, args.checkpoint, args.data)
    calls = record(model, data_cfg, args.micro_batch, args.ranks, args.steps, args.seed)

    half = args.steps // 2
    fitted = permuted(
        Calls(calls.image_SRBE[half:], calls.token_SRBET[half:]), orders_for(calls.token_SRBET[:half], args.ep)
    )
    held_out = Calls(calls.image_SRBE[half:], calls.token_SRBET[half:])
    before, after = _summary(replay(held_out, args.ep)), _summary(replay(fitted, args.ep))

    orders = orders_for(calls.token_SRBET, args.ep)
    batch = next(TrainStream(data_cfg, args.micro_batch, rank=0, world_size=args.ranks, seed=args.seed).batches())
    with torch.no_grad():
        reference = model(batch["x"], batch["channel_mask"])
        for image_moe, orders_b in zip(moes, orders, strict=True):
            for expert, order in zip(image_moe.experts, orders_b, strict=True):
                place_token_experts(expert.moe, order)
        check = model(batch["x"], batch["channel_mask"])
    if not torch.allclose(check.pred, reference.pred, rtol=1e-5, atol=1e-5):
        raise ValueError("the re-ordered model's outputs differ from the original's: nothing written")  # a bug
    for r_ref, r_new, orders_b in zip(reference.routing, check.routing, orders, strict=True):
        expected = torch.stack([r_ref.token_counts[e, order] for e, order in enumerate(orders_b)])
        if not torch.equal(r_new.token_counts, expected):
            raise ValueError("the re-ordered model's token counts are not the permuted originals: nothing written")

    placed = {k: v.to(state[k].dtype) for k, v in model.state_dict().items()}  # an export's dtype stays
    moved = sum(order != sorted(order) for orders_b in orders for order in orders_b)
    out = save_safetensors(
        placed, run_cfg, args.out, source=f"{source}, token experts placed for ep_size {args.ep} by tools.place_experts"
    )
    return {
        "checkpoint": str(args.checkpoint),
        "out": str(out),
        "ep": args.ep,
        "micro_batch": args.micro_batch,
        "ranks": args.ranks,
        "steps": args.steps,
        "token_moes": sum(len(o) for o in orders),
        "token_moes_reordered": int(moved),
        "held_out_before": before,
        "held_out_after": after,
        "orders": orders,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.place_experts",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_recording_arguments(p, ranks_default="--ep")
    p.add_argument("--ep", type=int, required=True, help="the expert-parallel size to place the experts for (>= 2)")
    p.add_argument("--out", required=True, help="the re-ordered model's .safetensors (written only if it checks out)")
    args = p.parse_args(argv)
    args.ranks = args.ranks or args.ep
    if args.ep < 2:
        p.error("--ep must be >= 2: with one rank per group there is nothing to balance")
    if min(args.micro_batch, args.ranks, args.threads) < 1 or args.steps < 2:
        p.error("--micro-batch, --ranks and --threads must be >= 1, --steps >= 2")
    if args.ranks % args.ep:
        p.error(f"--ep {args.ep} must divide --ranks {args.ranks}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = place(args)
    except (ValueError, OSError) as err:  # bad checkpoint, data or sizes: one line
        sys.exit(f"place_experts: {err}")
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    b, a = result["held_out_before"], result["held_out_after"]
    print(
        f"{result['out']}: {result['token_moes_reordered']} of {result['token_moes']} token MoEs re-ordered for ep "
        f"{result['ep']}\n"
        f"  held-out steps, before -> after: busiest rank / mean per call {b['rank_imbalance']:.3f} -> "
        f"{a['rank_imbalance']:.3f}; token-expert rows ep1/epP per call {b['expert_rows_ratio']:.3f} -> "
        f"{a['expert_rows_ratio']:.3f}, one exchange per block {b['expert_rows_ratio_one_exchange']:.3f} -> "
        f"{a['expert_rows_ratio_one_exchange']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
