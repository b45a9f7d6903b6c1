"""Pre-train NESTOR (or the AFNO baseline) with DeepSpeed.

    deepspeed --num_gpus 2 --module nestor_ds.train --ds_config ds_configs/zero2.json \\
        [--config configs/pretrain_demo.yaml]
    torchrun --nproc_per_node 2 -m nestor_ds.train --ds_config ds_configs/zero2.json
    python -m nestor_ds.train --ds_config ds_configs/zero2.json          # one process

The loop lives in ``nestor_ds.engine`` (shared with ``finetune.py``); this file only parses arguments.
"""

from __future__ import annotations

from nestor_ds.cli import base_parser, restart_resume, run_cli


def main() -> int:
    args = base_parser(__doc__).parse_args()
    from nestor_ds.config import load_config
    from nestor_ds.engine import run_training

    cfg = load_config(args.config, args.overrides)
    resume = restart_resume(args.resume, cfg, "pretrain", args.run_name)  # torchrun --max-restarts: continue
    result = run_training(cfg, args.ds_config, entry="pretrain", run_name=args.run_name, resume=resume)
    return 0 if result.steps > 0 else 1


def cli() -> None:
    """``nestor-train``: the console command of ``python -m nestor_ds.train`` (same arguments, same errors)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
