"""Small real training data and configs for the engine, fine-tune and tracking tests.

Real PDE solutions from ``nestor_ds.synth.layouts`` in their public layouts, built into real shards by
the real builder: the tests exercise exactly what users run, only smaller.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DATASETS = {  # name: (pde, layout, trajectories, frames)
    "ns_tiny": ("ns", "fno-mat", 6, 14),
    "dr_tiny": ("dr", "pdebench-groups", 6, 14),
}


def build_tiny_shards(root: Path, names: tuple[str, ...] = ("ns_tiny", "dr_tiny"), res: int = 16) -> dict[str, Path]:
    """Generate and shard each dataset once under ``root`` (reused when already there)."""
    from nestor_ds.shards.build import BuildConfig, build
    from nestor_ds.synth.layouts import write_dataset

    out = {}
    for i, name in enumerate(names):
        pde, layout, n, steps = DATASETS[name]
        shard_dir = root / "shards" / name
        if not (shard_dir / "manifest.json").is_file():
            raw = write_dataset(pde, layout, root / "raw" / f"{name}.h5", n=n, res=res, steps=steps, seed=i)
            build(BuildConfig(inputs=[str(raw)], out=str(shard_dir), name=name, test_fraction=0.34, progress=False))
        out[name] = shard_dir
    return out


def tiny_config(root: Path, shards: dict[str, Path], **sections: Any) -> Path:
    """A YAML run config for a tiny NESTOR on the tiny shards; ``sections`` deep-override it."""
    cfg: dict[str, Any] = {
        "data": {
            "datasets": [{"name": n, "path": str(p), "weight": 1.0, "rollout_steps": 3} for n, p in shards.items()],
            "t_in": 4,
            "t_ar": 1,
            "resolution": 16,
            "channels": 2,
            "windows_per_trajectory": 2,
            "shuffle_buffer": 8,
            "steps_per_epoch": 10,
        },
        "model": {
            "preset": "nestor-tiny",
            "width": 16,
            "num_heads": 2,
            "patch_size": 4,
            "afno_modes": 2,
            "norm_groups": 4,
            "head_dim": 8,
            "moe": {"backend": "local"},
        },
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {
            "max_steps": 6,
            "log_every": 1,
            "eval_every": 0,
            "ckpt_every": 3,
            "eval_max_trajectories": 2,
            "eval_rollout_steps": 2,
            "eval_batch_size": 2,
            "output_dir": str(root / "runs"),
            "input_noise": 0.0,
            # one intra-op thread: the default (cores / ranks per node) gives a one-rank run 2 OpenMP threads, which
            # spin-wait for each other whenever the other test worker holds a core (measured 4-10x the CPU of one
            # thread under load, docs/testing.md); the default itself is run by the shared pre-training (conftest.py)
            "threads_per_rank": 1,
        },
        # log_model and figures off: exporting + logging the model and drawing the figures cost every run seconds;
        # test_mlflow_models.py turns the model on, the shared pre-training (conftest.py) the figures
        "tracking": {
            "enabled": True,
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "system_metrics": False,
            "log_model": False,
            "figure_every_eval": False,
        },
    }
    for key, value in sections.items():
        cfg[key] = _merge(cfg.get(key, {}), value)
    db = root / "mlflow.db"
    if cfg["tracking"].get("enabled", True) and cfg["tracking"].get("tracking_uri") == f"sqlite:///{db}":
        empty_mlflow_store(db)
    path = root / f"config_{abs(hash(json.dumps(cfg, sort_keys=True, default=str))) % 10**8}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def empty_mlflow_store(db: Path) -> None:
    """Put an empty MLflow sqlite store (schema made, no runs) at ``db`` unless one is there: MLflow builds its
    tables on first use of a new file, about 2 s of CPU in every run's tracker; the tests copy one built once per
    MLflow version (under .cache/, locked: xdist workers share it)."""
    if db.exists():
        return
    import shutil

    import mlflow
    from filelock import FileLock

    template = REPO / ".cache" / f"mlflow-empty-{mlflow.__version__}.db"
    template.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{template}.lock"):
        if not template.exists():
            from mlflow.tracking import MlflowClient

            tmp = template.with_name(f".{template.name}.{os.getpid()}")
            MlflowClient(f"sqlite:///{tmp}").search_experiments()  # creates and migrates the tables
            os.replace(tmp, template)
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, db)


def _merge(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {**a, **{k: _merge(a.get(k), v) for k, v in b.items()}}
    return b


def ds_config(root: Path, stage: int = 2, micro: int = 2, accum: int = 1, suffix: str = "", **extra: Any) -> Path:
    """One of the shipped ds_configs (``zero<stage><suffix>.json``) with a test-sized micro-batch."""
    base = json.loads((REPO / "ds_configs" / f"zero{stage}{suffix}.json").read_text())
    base.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum, **extra)
    path = root / f"ds_zero{stage}{suffix}_m{micro}_a{accum}.json"
    path.write_text(json.dumps(base))
    return path


def entry_args(module: str, ds_config: str | Path, config: str | Path, *extra: str) -> list[str]:
    """``[module, --ds_config, --config, *extra]``: what `launch` runs."""
    return [module, "--ds_config", str(ds_config), "--config", str(config), *extra]


def launch(
    args: list[str], ranks: int, cwd: Path, timeout: int = 880, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the entry module ``args[0]`` (e.g. ``nestor_ds.train``) on ``ranks`` CPU ranks: one rank in this process
    (`run_entry`), several forked from a warm process with torchrun's environment (tests/fork_ranks.py). Tests of
    what only real processes have (a launcher, signals, a dying interpreter) build their own command lines
    (`nestor_ds.procs.torchrun`, the DeepSpeed launcher: tests/test_multinode.py, test_restart.py,
    test_reliability.py)."""
    if ranks == 1:
        return run_entry(args, cwd, env=env)
    from fork_ranks import fork_ranks

    return fork_ranks("module", args[0], list(args[1:]), ranks, cwd, rank_env(env), timeout)


def rank_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launched rank: this process's without launcher variables, the repository importable, the
    shared extension cache, one thread, unbuffered output; ``extra`` on top."""
    return {
        **outside_env(),
        "PYTHONPATH": str(REPO),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    }


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def outside_env() -> dict[str, str]:
    """This process's environment without a launcher's variables: what a command typed in a shell would inherit. (A
    test process that built a world of one in process has RANK, MASTER_PORT, ... set; a child that inherited them
    would join that world, or bind its port.)"""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}


def run_entry(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m args[0] args[1:]`` on one rank, in this process: what ``launch(args, 1, cwd)`` returns (exit status,
    stdout, stderr with our log lines and the one-line errors), without paying for a new interpreter.

    For single-rank runs where nothing process-level is under test (signals, launchers, exit-time teardown keep
    real processes). The entry runs through ``nestor_ds.cli.run_cli`` as on the command line; ``env`` is set and
    ``cwd`` entered for the call only, signal handlers and torch's thread count are restored afterwards. The test
    session's process group (a world of one, DeepSpeed keeps its groups in module state) is started first so that
    run_cli leaves it up for the next run."""
    import contextlib
    import importlib
    import io
    import logging
    import signal
    import traceback

    import torch

    from nestor_ds.cli import run_cli

    # the environment as it was, before the session's group sets RANK, MASTER_PORT, ... (restored at the end: a
    # later subprocess must not inherit the launcher variables of this process's world of one)
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    _session_process_group()
    module = importlib.import_module(args[0])
    out, err = io.StringIO(), io.StringIO()
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    saved_threads = torch.get_num_threads()
    handlers = [h for h in logging.getLogger("nestor_ds").handlers if isinstance(h, logging.StreamHandler)]
    streams = [h.setStream(err) for h in handlers]
    code: int = 0
    try:
        os.environ.update(env or {})
        os.chdir(cwd)
        sys.argv = [f"{args[0]}.py", *args[1:]]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_cli(module.main)
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=err)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - a bug's traceback, as the interpreter would print it
                traceback.print_exc(file=err)
                code = 1
    finally:
        for h, s in zip(handlers, streams, strict=True):
            h.setStream(s)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        for s, h in saved_signals.items():
            signal.signal(s, h)
        torch.set_num_threads(saved_threads)
    return subprocess.CompletedProcess([sys.executable, "-m", *args], code, out.getvalue(), err.getvalue())


def _session_process_group() -> None:
    """The world of one that in-process runs share for the whole session (started once, never ended)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        from nestor_ds.engine.distributed import init_distributed

        init_distributed()


def run_two_rank_script(script: str | Path, cwd: Path, *args: str, timeout: int = 880) -> subprocess.CompletedProcess:
    """``<script> [args]`` on 2 ranks as ``torchrun --nproc_per_node 2 <script> [args]`` would run it (a test file
    that is its own worker), forked from the warm process of tests/fork_ranks.py, in `rank_env`."""
    from fork_ranks import fork_ranks

    return fork_ranks("path", str(script), list(args), 2, cwd, rank_env(), timeout)


def marked_json(stdout: str, marker: str) -> Any:
    """The JSON after `marker` on the last stdout line that starts with it (None when no line does)."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(marker)]
    return json.loads(lines[-1][len(marker) :]) if lines else None


def reference_mi_bits(counts: list[list[float]]) -> float:
    """I(dataset; expert) in bits of a dataset x expert count table, written out from the definition (independent of
    nestor_ds.tracking.mutual_information_bits, which the tests check against it)."""
    import math

    total = sum(map(sum, counts))
    if total <= 0:
        return 0.0
    rows = [sum(r) / total for r in counts]
    cols = [sum(r[j] for r in counts) / total for j in range(len(counts[0]))]
    return sum(
        (c / total) * math.log2((c / total) / (rows[i] * cols[j]))
        for i, r in enumerate(counts)
        for j, c in enumerate(r)
        if c > 0
    )
