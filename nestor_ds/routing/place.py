"""Re-order a trained NESTOR's token experts so that each rank of an expert-parallel group carries an equal load.

    python -m nestor_ds.routing.place --checkpoint runs/x/model.safetensors --ep 2 --out runs/x/model-ep2.safetensors
    python -m nestor_ds.routing.place --checkpoint runs/x/checkpoints --ep 2 --order-out runs/x/expert_order.json
    python -m nestor_ds.train ... --run-name x --resume auto --set train.expert_order=runs/x/expert_order.json

Under expert parallelism (moe.ep_size P) rank p holds token experts [p*E/P, (p+1)*E/P) of every token MoE, and
every exchange waits for the rank whose experts received the most rows; a trained router is not uniform, so the
rank that holds two popular experts sets the pace (docs/scaling.md, "What a trained model's routing costs").
This command runs the model on its own training stream (as `python -m nestor_ds.routing.profile` does), sums each
token MoE's assignments per expert, and re-orders that MoE's experts (router rows and weights together,
`nestor_ds.moe.placement`) so that the P groups carry loads as equal as a split can make them. The re-ordered model
computes the same function: the command checks it on a recorded batch (outputs to 1e-5, token counts permuted) before
writing anything. `--out` writes an ordinary export (fine-tune or evaluate it at ep_size P); `--order-out` writes the
order, with the step of the checkpoint it came from, for the run to continue from that checkpoint re-ordered, Adam's
moments and the data stream included (`train.expert_order`, docs/scaling.md "Placing the experts").

Printed: busiest rank over the group's mean per token-MoE call and the token-expert rows ratio ep 1 / ep P
(per call, and with one exchange per block as dropless training runs it), before and after, measured on steps the
order was NOT chosen from (the order is fitted on the first half of the recorded steps; the written model's order
on all of them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from nestor_ds.cli import exit_on_user_error, run_cli
from nestor_ds.errors import UserError
from nestor_ds.routing.record import add_recording_arguments, record, stream_config
from nestor_ds.routing.replay import Calls, replay

PROG = "python -m nestor_ds.routing.place"


def token_moe_prefixes(model: Any) -> list[list[str]]:
    """prefixes[b][e]: the state-dict prefix of block b's image expert e's token MoE (the order of
    ModelOutput.routing and of its token_counts rows)."""
    from nestor_ds.model.image_moe import ImageMoE

    return [
        [f"{name}.experts.{e}.moe." for e in range(len(m.experts))]
        for name, m in model.named_modules()
        if isinstance(m, ImageMoE)
    ]


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


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a DeepSpeed tag (`step_00001200`), None for an export."""
    from nestor_ds.checkpoint.layout import resolve_checkpoint
    from nestor_ds.checkpoint.save_resume import tag_step

    step = tag_step(resolve_checkpoint(path))
    return step if step >= 0 else None


def _summary(row: dict[str, Any]) -> dict[str, float]:
    return {
        "rank_imbalance": row["rank_imbalance"],
        "expert_rows_ratio": row["expert_rows_ratio"],
        "expert_rows_ratio_one_exchange": row["one_exchange_per_block"]["expert_rows_ratio"],
    }


def place(args: argparse.Namespace) -> dict[str, Any]:
    """Record the routing, choose the orders, check the re-ordered model computes the same function, write."""
    import torch

    from nestor_ds.checkpoint.export import save_safetensors
    from nestor_ds.checkpoint.load import inference_model_config, load_local_state, load_state_strict
    from nestor_ds.data.stream import TrainStream
    from nestor_ds.model import build_model
    from nestor_ds.moe.placement import ExpertOrder, reorder_local_state, write_expert_order

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    state, run_cfg, source = load_local_state(args.checkpoint)

    def model_with(weights: dict[str, torch.Tensor]) -> Any:
        model = build_model(inference_model_config(run_cfg)).eval()
        load_state_strict(model, weights, source)
        model.run_config = run_cfg
        return model

    model = model_with(state)
    prefixes = token_moe_prefixes(model)
    if not prefixes:
        raise UserError(f"{args.checkpoint}: the model has no token experts (an AFNO baseline?): nothing to place")
    E_tok = state[prefixes[0][0] + "router.gate.weight"].shape[0]
    if E_tok % args.ep:
        raise UserError(f"--ep {args.ep} must divide the model's {E_tok} token experts")
    data_cfg = stream_config(model, args.checkpoint, args.data)
    calls = record(model, data_cfg, args.micro_batch, args.ranks, args.steps, args.seed)

    half = args.steps // 2
    held_out = Calls(calls.image_SRBE[half:], calls.token_SRBET[half:])
    held_out_placed = permuted(held_out, orders_for(calls.token_SRBET[:half], args.ep))  # orders from the first half
    before, after = _summary(replay(held_out, args.ep)), _summary(replay(held_out_placed, args.ep))

    nested = orders_for(calls.token_SRBET, args.ep)
    orders = {p: o for ps, os in zip(prefixes, nested, strict=True) for p, o in zip(ps, os, strict=True)}
    placed = reorder_local_state(state, orders)
    # the same function: outputs on a batch of the stream, and token counts that are the originals permuted
    batch = next(TrainStream(data_cfg, args.micro_batch, rank=0, world_size=args.ranks, seed=args.seed).batches())
    with torch.no_grad():
        reference = model(batch["x"], batch["channel_mask"])
        check = model_with(placed)(batch["x"], batch["channel_mask"])
    if not torch.allclose(check.pred, reference.pred, rtol=1e-5, atol=1e-5):
        raise ValueError("the re-ordered model's outputs differ from the original's: nothing written")  # a bug
    for r_ref, r_new, orders_b in zip(reference.routing, check.routing, nested, strict=True):
        expected = torch.stack([r_ref.token_counts[e, order] for e, order in enumerate(orders_b)])
        if not torch.equal(r_new.token_counts, expected):
            raise ValueError("the re-ordered model's token counts are not the permuted originals: nothing written")

    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "ep": args.ep}
    if args.out:
        how = f"{source}, token experts placed for ep_size {args.ep} by nestor_ds.routing.place"
        result["out"] = str(save_safetensors(placed, run_cfg, args.out, source=how))
    if args.order_out:
        order = ExpertOrder(args.ep, checkpoint_step(args.checkpoint), orders)
        result["order_out"] = str(write_expert_order(args.order_out, order))
        result["checkpoint_step"] = order.checkpoint_step
    result.update(
        micro_batch=args.micro_batch,
        ranks=args.ranks,
        steps=args.steps,
        token_moes=len(orders),
        token_moes_reordered=sum(o != sorted(o) for o in orders.values()),
        held_out_before=before,
        held_out_after=after,
        orders=orders,
    )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nestor_ds.routing.place",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_recording_arguments(p, ranks_default="--ep")
    p.add_argument("--ep", type=int, required=True, help="the expert-parallel size to place the experts for (>= 2)")
    p.add_argument("--out", default=None, help="write the re-ordered model here (.safetensors; only if it checks out)")
    p.add_argument(
        "--order-out",
        default=None,
        help="write the expert order here (JSON) for a resume with --set train.expert_order=FILE (Adam state kept)",
    )
    args = p.parse_args(argv)
    args.ranks = args.ranks or args.ep
    if not (args.out or args.order_out):
        p.error(
            "nothing to write: give --out (a re-ordered export) and/or --order-out (an expert order to resume with)"
        )
    if args.ep < 2:
        p.error("--ep must be >= 2: with one rank per group there is nothing to balance")
    if min(args.micro_batch, args.ranks, args.threads) < 1 or args.steps < 2:
        p.error("--micro-batch, --ranks and --threads must be >= 1, --steps >= 2")
    if args.ranks % args.ep:
        p.error(f"--ep {args.ep} must divide --ranks {args.ranks}")
    return args


def main(argv: list[str] | None = None) -> int:
    """The command; a bad checkpoint, data or size ends it with one line (SystemExit), a bug with its traceback."""
    args = parse_args(argv)
    with exit_on_user_error(PROG):
        result = place(args)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    b, a = result["held_out_before"], result["held_out_after"]
    written = " and ".join(result[k] for k in ("out", "order_out") if k in result)
    print(
        f"{written}: {result['token_moes_reordered']} of {result['token_moes']} token MoEs re-ordered for ep "
        f"{result['ep']}\n"
        f"  held-out steps, before -> after: busiest rank / mean per call {b['rank_imbalance']:.3f} -> "
        f"{a['rank_imbalance']:.3f}; token-expert rows ep1/epP per call {b['expert_rows_ratio']:.3f} -> "
        f"{a['expert_rows_ratio']:.3f}, one exchange per block {b['expert_rows_ratio_one_exchange']:.3f} -> "
        f"{a['expert_rows_ratio_one_exchange']:.3f}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
