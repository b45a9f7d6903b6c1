"""What expert parallelism would cost on a trained NESTOR's own routing (no GPU, no process group needed).

    python -m tools.routing_profile --checkpoint runs/x/model.safetensors --json
    python -m tools.routing_profile --checkpoint runs/x/checkpoints --micro-batch 32 --ranks 6 --ep 2 3 6

Under expert parallelism (moe.ep_size P, docs/scaling.md) two things depend on how the model routes, which a
synthetic benchmark input can only guess:
  - every token-MoE call of the group waits for the rank whose experts received the most rows;
  - every rank calls each image expert with the group's largest sample count for it, the rest as padding
    (the image expert's attention and norms run on padding; the token MoE skips it).
This tool runs the model in evaluation mode (dropless routing: the counts training records) on the micro-batches
that `--ranks` data-parallel ranks would draw from the run's training stream (`TrainStream(rank=p,
world_size=ranks)`), reads each block's image and token counts (`ModelOutput.routing`), and replays them for
expert-parallel groups of P consecutive ranks. Per P:

  expert_rows_ratio   token-expert rows on the slowest rank, ep 1 over ep P, per step: the cap routing alone puts on
                      tools/bench_moe_ep.py's `ratio_vs_local_ep1` (1.0 = perfectly balanced, exchange not counted)
  body_rows_ratio     the same for the image experts' attention/norm rows (padding included under ep P)
  rank_imbalance      rows received by the busiest rank of a call over the group's mean, pooled over calls (>= 1);
                      `tools.bench_moe_ep --profile` builds a 2-rank input with this imbalance and padding fraction
  padding_fraction    share of the token-MoE rows that are padding
The quantities above are for token MoEs called one at a time (static token routing's path, and ZeRO-3's);
`one_exchange_per_block` gives the first two for what dropless training and evaluation run: every rank runs all image
experts of a block on its own samples, then one token exchange serves all their token MoEs, so a block waits once.
`uniform_router` gives the same for a router that picks experts uniformly at random with the same batch: the part of
the imbalance that sampling alone causes (what a perfect load-balancing loss would leave).

Step times are modelled as rows: ep 1 syncs once per step (gradients), so a step costs the largest rank's sum over
calls; ep P syncs at every call, so a step costs the sum over calls of the busiest rank's rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Calls:
    """Routing counts of `steps` steps on `ranks` ranks: image_SRBE [steps, ranks, blocks, E_img] samples per image
    expert, token_SRBET [.., E_img, E_tok] token assignments per token expert inside each image expert."""

    image_SRBE: np.ndarray
    token_SRBET: np.ndarray


def replay(calls: Calls, ep: int) -> dict[str, float]:
    """The module docstring's quantities for expert-parallel groups of `ep` consecutive ranks."""
    S, R, B, E_img = calls.image_SRBE.shape
    E_tok = calls.token_SRBET.shape[-1]
    if R % ep or E_tok % ep:
        raise ValueError(f"ep {ep} must divide the ranks ({R}) and the token experts ({E_tok})")
    G = R // ep
    image_SGPC = calls.image_SRBE.reshape(S, G, ep, B * E_img).astype(np.float64)  # C = calls per step
    token_SGPCT = calls.token_SRBET.reshape(S, G, ep, B * E_img, E_tok).astype(np.float64)
    # rows the experts of group rank q receive: every source p's assignments to q's experts
    received_SGCQ = token_SGPCT.sum(axis=2).reshape(S, G, B * E_img, ep, E_tok // ep).sum(axis=-1)
    sent_SGPC = token_SGPCT.sum(axis=-1)  # what each rank computes itself at ep 1
    size_SGC = image_SGPC.max(axis=2)  # samples every rank of the group calls the image expert with

    expert_ep1 = sent_SGPC.sum(axis=-1).reshape(S, R).max(axis=1)
    expert_epP = received_SGCQ.max(axis=-1).sum(axis=-1).max(axis=1)
    body_ep1 = image_SGPC.sum(axis=-1).reshape(S, R).max(axis=1)
    body_epP = size_SGC.sum(axis=-1).max(axis=1)
    busiest, mean = received_SGCQ.max(axis=-1).sum(), received_SGCQ.mean(axis=-1).sum()
    # one exchange per block for all its image experts: each rank runs all its image-expert bodies first
    received_SGBQ = received_SGCQ.reshape(S, G, B, E_img, ep).sum(axis=3)
    pooled_expert_epP = received_SGBQ.max(axis=-1).sum(axis=-1).max(axis=1)
    pooled_body_epP = image_SGPC.reshape(S, G, ep, B, E_img).sum(axis=-1).max(axis=2).sum(axis=-1).max(axis=1)
    padded = (size_SGC[:, :, None, :] - image_SGPC).sum()
    return {
        "expert_rows_ratio": float(expert_ep1.sum() / max(expert_epP.sum(), 1.0)),
        "body_rows_ratio": float(body_ep1.sum() / max(body_epP.sum(), 1.0)),
        "rank_imbalance": float(busiest / mean) if mean > 0 else 1.0,
        "padding_fraction": float(padded / max(size_SGC.sum() * ep, 1.0)),
        "one_exchange_per_block": {
            "expert_rows_ratio": float(expert_ep1.sum() / max(pooled_expert_epP.sum(), 1.0)),
            "body_rows_ratio": float(body_ep1.sum() / max(pooled_body_epP.sum(), 1.0)),
        },
    }


def uniform_calls(
    shape: tuple[int, ...], micro_batch: int, tokens: int, image_k: int, token_k: int, seed: int
) -> Calls:
    """Counts of a router that picks its top-k experts uniformly at random (image and token level), for the same
    steps, ranks, blocks, micro-batch and tokens per sample as a recording of `shape` [S, R, B, E_img, E_tok]: the
    imbalance that sampling alone causes, which no load-balancing loss removes at this batch size."""
    S, R, B, E_img, E_tok = shape
    rng = np.random.default_rng(seed)

    def topk_counts(n: int, experts: int, k: int) -> np.ndarray:
        picks = np.argpartition(rng.random((n, experts)), k - 1, axis=1)[:, :k]  # k distinct experts per row
        return np.bincount(picks.ravel(), minlength=experts)

    image = np.zeros((S, R, B, E_img), dtype=np.int64)
    token = np.zeros((S, R, B, E_img, E_tok), dtype=np.int64)
    for idx in np.ndindex(S, R, B):
        image[idx] = topk_counts(micro_batch, E_img, image_k)
        for e in range(E_img):
            token[idx + (e,)] = topk_counts(int(image[idx + (e,)]) * tokens, E_tok, token_k)
    return Calls(image, token)


def record(model: Any, data_cfg: Any, micro_batch: int, ranks: int, steps: int, seed: int) -> Calls:
    """Run `model` on `steps` micro-batches of each of `ranks` training streams; collect the routing counts."""
    import torch

    from nestor_ds.data.stream import TrainStream

    streams = [TrainStream(data_cfg, micro_batch, rank=p, world_size=ranks, seed=seed).batches() for p in range(ranks)]
    image, token = [], []
    with torch.no_grad():
        for step in range(steps):
            per_rank_image, per_rank_token = [], []
            for stream in streams:
                batch = next(stream)
                out = model(batch["x"], batch["channel_mask"])
                if not out.routing:
                    raise ValueError("the model has no image MoE (an AFNO baseline?): nothing to profile")
                per_rank_image.append(torch.stack([r.image_counts for r in out.routing]).numpy())
                per_rank_token.append(torch.stack([r.token_counts for r in out.routing]).numpy())
            image.append(per_rank_image)
            token.append(per_rank_token)
            print(f"recording routing: step {step + 1}/{steps}", file=sys.stderr, flush=True)
    return Calls(np.asarray(image), np.asarray(token))


def stream_config(model: Any, checkpoint: str | Path, data_dirs: list[str] | None) -> Any:
    """The DataConfig of `model`'s training stream, read in this process: `data_dirs` (the user's own command line),
    else the datasets saved in the checkpoint's run config.

    Saved datasets are SavedDatasetSpecs: a checkpoint or export may be someone else's file, so a saved `pipe:`
    command or URL is refused with one line naming --data when the stream opens it, and only local shard
    directories that exist here are read (`nestor_ds.data.config.check_saved`)."""
    from nestor_ds.data import DataConfig, DatasetSpec
    from nestor_ds.data.config import saved_dataset_specs

    settings = {k: v for k, v in (model.run_config.get("data") or {}).items() if k != "datasets"}
    if data_dirs:
        datasets = [DatasetSpec(name=Path(d).name, path=d) for d in data_dirs]
    else:
        datasets = saved_dataset_specs(model.run_config, str(checkpoint))
    if not datasets:
        raise ValueError(f"{checkpoint}: its run config names no training data; pass --data SHARD_DIR ...")
    data_cfg = DataConfig.from_dict({**settings, "num_workers": 0})  # in this process: no loader workers
    data_cfg.datasets = datasets
    cfg = model.cfg
    data_cfg.t_in, data_cfg.resolution, data_cfg.channels = cfg.t_in, cfg.resolution, cfg.in_channels
    return data_cfg


def profile(args: argparse.Namespace) -> dict[str, Any]:
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


def add_recording_arguments(p: argparse.ArgumentParser, ranks_default: str) -> None:
    """The options of a tool that runs a model on its training stream (`record`): model, data, batches, --json."""
    p.add_argument("--checkpoint", required=True, help="exported .safetensors, a checkpoint root or a tag directory")
    p.add_argument(
        "--data",
        nargs="+",
        default=None,
        metavar="SHARD_DIR",
        help="default: the run's training data, if saved as local shard directories (a saved URL or pipe: is refused)",
    )
    p.add_argument("--micro-batch", type=int, default=32, help="samples per rank and step (default 32)")
    p.add_argument(
        "--ranks", type=int, default=None, help=f"data-parallel ranks to draw batches for (default {ranks_default})"
    )
    p.add_argument("--steps", type=int, default=32, help="steps to record (default 32)")
    p.add_argument("--seed", type=int, default=0, help="the training stream's seed (default 0)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.routing_profile",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
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
    args = parse_args(argv)
    try:
        result = profile(args)
    except (ValueError, OSError) as err:  # bad checkpoint, data or sizes: one line
        sys.exit(f"routing_profile: {err}")
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
    raise SystemExit(main())
