"""Product step vs bare-loop step, side by side in one process: what the engine, stream and logging cost per step.

    python -m tools.bench_loop --config run.yaml --json               # ZeRO-0, one process (as the study trains)
    python -m tools.bench_loop --config run.yaml --rounds 6 --steps 40

The product side is the trainer itself (`nestor_ds.engine.trainer.Trainer`: the shard stream, the DeepSpeed engine,
`optimizer_step`, and the logging step every `train.log_every` steps); the bare side is `tools/bare_loop.py`'s
`BareTrainer` (the same model, loss, optimizer, schedule and clipping over in-memory windows). Rounds alternate
product and bare blocks of `--steps` steps, so a machine whose speed drifts (a shared host) slows both alike; the
ratio is the median over rounds. Tracking is off unless `--tracking` (then the product also logs every logging step
to a fresh SQLite store, as a study trial does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench_loop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="run YAML (e.g. a study trial's config)")
    p.add_argument("--ds_config", default="ds_configs/zero0.json", help="DeepSpeed JSON (one process)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (the ratio is their median)")
    p.add_argument("--steps", type=int, default=30, help="steps per block")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps of each side first")
    p.add_argument(
        "--tracking",
        action="store_true",
        help="keep MLflow tracking on (a fresh SQLite store in a temp dir; system metrics off), as the config says",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from nestor_ds.config import load_config
    from nestor_ds.engine.trainer import start_training
    from tools.bare_loop import BareTrainer, micro_and_clip

    out = tempfile.mkdtemp(prefix="bench_loop-")
    tracking = (
        [f"tracking.tracking_uri=sqlite:///{out}/mlflow.db", "tracking.system_metrics=false"]
        if args.tracking
        else ["tracking.enabled=false"]
    )
    overrides = [*args.set, *tracking, f"train.output_dir={out}", "train.time_budget_s=null"]
    cfg = load_config(args.config, [*overrides, "train.max_steps=1000000"])
    trainer, client = start_training(cfg, args.ds_config, run_name="bench")  # without --tracking: logs nothing
    trainer.start_loop(client)
    every = max(1, cfg.train.log_every)

    def product_step() -> None:
        trainer.train_step()
        if trainer.step % every == 0:
            trainer.log_interval()
            trainer.interval_start = time.perf_counter()

    micro, clip = micro_and_clip(args.ds_config)
    if micro != trainer.micro * trainer.accum:
        raise ValueError(f"{args.ds_config}: bare micro-batch {micro} != product {trainer.micro * trainer.accum}")
    bare = BareTrainer(load_config(args.config, overrides), micro, clip)

    def bare_step() -> None:
        bare.step(None)

    for _ in range(args.warmup):
        product_step()
        bare_step()
    rounds = []
    for r in range(args.rounds):
        pair = {}
        for name, fn in (("product", product_step), ("bare", bare_step))[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            pair[name] = (time.perf_counter() - t0) / args.steps
        rounds.append(pair)
    trainer.tracker.finish()
    shutil.rmtree(out, ignore_errors=True)
    ratios = [p["product"] / p["bare"] for p in rounds]
    result = {
        "config": args.config,
        "ds_config": args.ds_config,
        "samples_per_step": micro,
        "threads": cfg.train.threads_per_rank,
        "tracking": args.tracking,
        "product_ms_per_step": [round(p["product"] * 1e3, 2) for p in rounds],
        "bare_ms_per_step": [round(p["bare"] * 1e3, 2) for p in rounds],
        "product_over_bare": round(statistics.median(ratios), 3),
        "product_over_bare_spread": [round(min(ratios), 3), round(max(ratios), 3)],
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
