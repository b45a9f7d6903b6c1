"""Argument parsing and error reporting shared by the entries (``train.py``, ``finetune.py``).

Entries run as modules (``python -m nestor_ds.train``, ``deepspeed --module nestor_ds.train``, ``torchrun -m
nestor_ds.train``) from the repository root, or from anywhere once the project is installed (``pip install .`` or
``pip install -e .``), which also puts the console commands of pyproject.toml on the PATH (``nestor-train``,
``nestor-finetune``, ...: each entry's own ``cli`` function, ``run_cli`` around its ``main``). This module imports no
entry, so the entries can import it without a cycle. Relative paths, the default ``--config`` included, are read
from the working directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NoReturn

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
    p.add_argument(
        "--config",
        default=default_config,
        help=f"YAML run configuration (default: {default_config}, from the working directory)",
    )
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


def restart_resume(
    resume: str | None, cfg: Any, entry: str, run_name: str | None, env: Mapping[str, str] | None = None
) -> str | None:
    """The ``--resume`` value for this attempt: ``auto`` when torchrun's elastic agent restarted the workers and this
    run already has a complete checkpoint, else ``resume`` unchanged.

    Why: under ``torchrun --max-restarts N`` a failed worker makes the agent restart every worker with the *same*
    command line, so a run started without ``--resume`` would refuse its own checkpoints (or, with ``--resume PATH``,
    roll back to PATH and set aside everything saved since). torchrun tells the new attempt apart by
    ``TORCHELASTIC_RESTART_COUNT > 0``: the attempt then continues from this run's newest complete checkpoint, exactly
    as ``--resume auto`` with the same ``--run-name`` does. Without a checkpoint of its own yet (killed before the
    first save), it starts as the first attempt did (from PATH, or fresh). Every rank decides from the shared file
    system before the process group exists; the previous attempt's workers are all stopped by then, so all ranks
    see the same tags. One line on rank 0 says why. ``cfg`` is the run's ``RunConfig``; ``run_name`` as passed to
    ``run_training`` (None: the trainer's default ``<entry>-<preset or arch>``).
    """
    import os
    from pathlib import Path

    env = os.environ if env is None else env
    try:
        restarts = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        restarts = 0
    if restarts <= 0:
        return resume
    from nestor_ds.checkpoint.save_resume import complete_tags
    from nestor_ds.log import get_logger

    name = cfg.run_name(entry, run_name)
    root = Path(cfg.train.output_dir) / name / "checkpoints"
    tags = complete_tags(root)
    main = env.get("RANK", "0") == "0"
    log = get_logger("nestor_ds.cli")
    if not tags:
        if main:
            log.info(
                "torchrun restart %d (TORCHELASTIC_RESTART_COUNT): no complete checkpoint of run %s under %s yet: "
                "starting as the first attempt did (%s)",
                restarts,
                name,
                root,
                f"--resume {resume}" if resume else "from step 0",
            )
        return resume
    if main:
        log.info(
            "torchrun restart %d (TORCHELASTIC_RESTART_COUNT): resuming run %s from its newest complete checkpoint "
            "under %s (as --resume auto%s)",
            restarts,
            name,
            root,
            "" if resume in (None, "auto") else f"; --resume {resume} was for the first attempt",
        )
    return "auto"


def run_cli(main: Callable[[], int]) -> None:
    """Run an entry: the user's mistakes become one line on stderr and exit status 2, our bugs keep their traceback.

    One line: `UserError` (config, data, paths, DeepSpeed JSON, checkpoints, library versions; `ConfigError` and
    `CheckpointError` are UserErrors), the shard format's `DataFormatError`, a missing file, a full disk. Any other
    exception, a plain ValueError included, is a bug in our code: it propagates with its traceback (exit status 1).
    """
    started_here = not _process_group_up()  # end only a process group this entry started (not a caller's)
    try:
        code = _exit_code(main)
    finally:  # a bug's exception leaves from here, with its traceback
        world = _end_process_group() if started_here else 0
    if world > 1:
        exit_after_teardown(code)
    sys.exit(code)


def _exit_code(main: Callable[[], int]) -> int | str | None:
    """``main``'s exit status; a user's mistake printed as one line (status 2); a bug re-raised."""
    try:
        return main()
    except SystemExit as e:
        return e.code
    except Exception as e:
        line = user_error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        return 2


def user_error_line(e: BaseException) -> str | None:
    """The line to show for the user's mistake (see `run_cli`), or None when ``e`` is a bug of ours."""
    import errno

    from nestor_ds.errors import UserError
    from nestor_ds.shards.schema import DataFormatError

    if isinstance(e, (UserError, DataFormatError, FileNotFoundError)):
        return str(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk is the user's to fix
        return e.strerror
    return None


@contextmanager
def exit_on_user_error(prog: str) -> Iterator[None]:
    """For an entry whose ``main(argv)`` tests call directly: the user's mistake (as `run_cli` tells them apart) ends
    it with ``SystemExit("<prog>: error: <line>")`` (exit status 1), a bug keeps its traceback."""
    try:
        yield
    except Exception as e:
        line = user_error_line(e)
        if line is None:
            raise
        raise SystemExit(f"{prog}: error: {line}") from None


def _process_group_up() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _end_process_group() -> int:
    """Destroy the process group before the interpreter exits (left to exit-time destruction, gloo's worker threads
    can abort the process); returns the world size it had (0: none was up)."""
    import torch.distributed as dist

    if not _process_group_up():
        return 0
    world = dist.get_world_size()
    dist.destroy_process_group()
    return world


def exit_after_teardown(code: int | str | None) -> NoReturn:
    """End a rank of a multi-rank run: run the exit handlers (MLflow's, the heartbeat's), flush, and leave without
    the interpreter's C++ teardown.

    Why: a rank that had finished everything (checkpoints written, process group destroyed) still died now and then
    in exit-time destruction of torch.distributed's native objects ("terminate called without an active
    exception", SIGABRT: seen on node 1 of a 2-node torchrun run). The launcher then reports the node failed:
    torchrun's agent restarts or fails the job, and the other nodes wait at its exit barrier (5 minutes). Nothing
    of ours is left to run at that point, so skipping the native teardown loses nothing."""
    import atexit
    import logging

    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # what the interpreter would run first on exit; os._exit runs none
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to write anyway
            pass
    os._exit(0 if code is None else code)
