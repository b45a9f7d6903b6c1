"""Argument parsing and error reporting shared by the entries (``train.py``, ``finetune.py``).

Entries run as modules from the repository root (``python -m nestor_ds.train``, ``deepspeed --module
nestor_ds.train``, ``torchrun -m nestor_ds.train``), so ``import nestor_ds`` needs no path patching.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

DEFAULT_CONFIG = "configs/pretrain_demo.yaml"


def base_parser(description: str, default_config: str = DEFAULT_CONFIG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--ds_config",
        "--ds-config",
        dest="ds_config",
        required=True,
        help="DeepSpeed JSON (ZeRO stage, precision, micro-batch, accumulation), e.g. ds_configs/zero2.json",
    )
    p.add_argument("--config", default=default_config, help=f"YAML run configuration (default: {default_config})")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.max_steps=50 --set model.moe.ep_size=2 (repeatable)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="continue a run: 'auto' = newest complete checkpoint of this run name, or a checkpoint path",
    )
    p.add_argument(
        "--run-name",
        "--run_name",
        dest="run_name",
        default=None,
        help="run directory name under train.output_dir and the MLflow run name",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers
    return p


def run_cli(main: Callable[[], int]) -> None:
    """Turn expected failures (bad config, missing files) into one clear line and exit status 2."""
    import errno

    from nestor_ds.config import ConfigError

    try:
        sys.exit(main())
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as e:  # a full disk is the user's to fix: one line (the checkpoint code names the path)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {e.strerror}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """Destroy the process group before the interpreter exits: left to exit-time destruction, gloo's worker threads
    can abort the process ("terminate called without an active exception", seen in a 2-rank CI run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
