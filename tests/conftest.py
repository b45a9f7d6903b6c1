"""Shared fixtures: tiny real PDE shards built once per test session."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from train_fixtures import LAUNCHER_VARS

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
# entries and tools run as modules (`python -m nestor_ds.train`) from the tests' temporary directories
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """(root, {name: shard dir}) of two tiny datasets with different channel counts (1 and 2)."""
    from train_fixtures import build_tiny_shards

    root = tmp_path_factory.mktemp("tiny_data")
    return root, build_tiny_shards(root)


@dataclass(frozen=True)
class SharedRun:
    """A finished training run made once per session (tests/shared_runs.py): read it, copy before changing it."""

    work: Path  # its working directory: runs/<name>/ (checkpoints, metrics.jsonl), mlflow.db, the configs
    name: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def run_dir(self) -> Path:
        return self.work / "runs" / self.name

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.work / 'mlflow.db'}"


@pytest.fixture(scope="session")
def pretrain_ep2(tiny_shards, tmp_path_factory: pytest.TempPathFactory) -> SharedRun:
    """The shared 2-rank pre-training: tiny NESTOR on both tiny datasets, ZeRO-2, token experts expert-parallel
    (ep_size 2), 20 steps with evaluation and checkpoints at 10 and 20, MLflow on. Read by test_train.py (the run,
    its checkpoints and MLflow run) and test_finetune.py (the checkpoint it fine-tunes)."""
    from shared_runs import built_once
    from train_fixtures import ds_config, launch, tiny_config

    _, shards = tiny_shards

    def build(work: Path) -> None:
        cfg = tiny_config(
            work,
            shards,
            model={"moe": {"backend": "local", "ep_size": 2}},
            # threads_per_rank: the product's default (cores / ranks per node), which tiny_config replaces by 1
            train={"max_steps": 20, "eval_every": 10, "ckpt_every": 10, "log_every": 5, "threads_per_rank": None},
            optim={"lr": 3e-3, "warmup_steps": 3},
            tracking={"figure_every_eval": True},
        )
        args = ["nestor_ds.train", "--ds_config", str(ds_config(work)), "--config", str(cfg), "--run-name", "pre"]
        proc = launch(args, ranks=2, cwd=work)
        (work / "proc.json").write_text(json.dumps([proc.returncode, proc.stdout, proc.stderr]))

    work = built_once(tmp_path_factory, "pretrain_ep2", build)
    code, out, err = json.loads((work / "proc.json").read_text())
    return SharedRun(work, "pre", code, out, err)


# the launcher variables as the session started (normally none): what every test body starts and ends with
_SESSION_LAUNCH_ENV = {k: os.environ.get(k) for k in LAUNCHER_VARS}


def _reset_launch_env() -> None:
    for k, v in _SESSION_LAUNCH_ENV.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _no_launcher_env_leaks():
    """Code that builds a DeepSpeed engine in the pytest process (a world of one) sets the launcher variables; they
    must not reach a test body or outlive it: a subprocess or spawned worker would inherit MASTER_PORT, whose port
    this process still holds, and RANK/WORLD_SIZE/LOCAL_WORLD_SIZE of a world it is not part of (a launcher's own
    LOCAL_SIZE would then be overridden). Reset before the body too, since module and session fixtures (set up before
    this one) may have run such code. The process group itself stays up: DeepSpeed keeps its groups in module
    state for the rest of the session."""
    _reset_launch_env()
    yield
    _reset_launch_env()


# The files that take longest, first: under .ci/run's `pytest -n 2 --dist loadfile --no-loadscope-reorder` each file
# runs whole on one worker, in this order, so a long file started last would leave the other worker idle at the end.
# Order only, never a time limit.
LONG_FILES_FIRST = (
    "test_zero_matrix.py",
    "test_multinode.py",
    "test_restart.py",
    "test_reliability.py",
    "test_elastic_resume.py",
    "test_study.py",
    "test_train.py",
    "test_finetune.py",
    "test_moe_ep.py",
    "test_mlflow_models.py",
    "test_bf16_master.py",
    "test_tracking_outage.py",
    "test_s3.py",
    "test_export.py",
    "test_packaging.py",
    "test_budget.py",
    "test_bench_block_ep.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order is kept
