"""Automatic restart under torchrun's elastic agent (docs/multinode.md, "Automatic restart").

A job started once, without ``--resume``, with ``--max-restarts 2`` and the c10d rendezvous on 127.0.0.1: one worker
is killed after the first checkpoint, the agent restarts both, and the restarted attempt (TORCHELASTIC_RESTART_COUNT
= 1) finds its own run's checkpoint by itself (``nestor_ds.cli.restart_resume``, what train.py and finetune.py
call). It must end like an uninterrupted run of the same ranks: the same losses and weights, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nestor_ds.procs import free_port, kill_tree, torchrun

from train_fixtures import REPO, build_tiny_shards, ds_config, run_entry, tiny_config

PROBE = str(REPO / "tests" / "scripts" / "restart_probe.py")
STEPS = 4  # checkpoints at 2 and 4; the kill lands in step 3
RUN_TIMEOUT = 600  # a loaded 2-core CI machine is slow; a hang still fails


def _cfg(output_dir: Path):
    """A default RunConfig of preset nestor-tiny writing under `output_dir`."""
    from nestor_ds.config import RunConfig

    cfg = RunConfig()
    cfg.preset, cfg.train.output_dir = "nestor-tiny", str(output_dir)
    return cfg


def _complete_tag(root: Path, step: int) -> None:
    tag = root / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text(json.dumps({"step": step, "seq": 1, "files": {}}))


def test_restart_resume_picks_auto_only_on_a_restart_with_a_checkpoint(tmp_path: Path) -> None:
    """First attempt: --resume as given. Restart without a checkpoint of this run yet: as given (a rollback path
    is kept, a fresh run stays fresh). Restart with one: auto, even over --resume PATH (which would roll the run
    back to PATH and set aside everything saved since)."""
    from nestor_ds.cli import restart_resume

    cfg = _cfg(tmp_path)
    first, again = {"RANK": "0"}, {"RANK": "0", "TORCHELASTIC_RESTART_COUNT": "1"}
    assert restart_resume(None, cfg, "pretrain", "r", first) is None
    assert restart_resume(None, cfg, "pretrain", "r", again) is None
    assert restart_resume("/old/step_00000002", cfg, "pretrain", "r", again) == "/old/step_00000002"
    _complete_tag(tmp_path / "r" / "checkpoints", 2)
    assert restart_resume(None, cfg, "pretrain", "r", first) is None
    assert restart_resume(None, cfg, "pretrain", "r", again) == "auto"
    assert restart_resume("/old/step_00000002", cfg, "pretrain", "r", again) == "auto"
    assert restart_resume(None, cfg, "pretrain", None, again) is None  # default name pretrain-nestor-tiny: no tags
    _complete_tag(tmp_path / "pretrain-nestor-tiny" / "checkpoints", 2)
    assert restart_resume(None, cfg, "pretrain", None, again) == "auto"


def test_train_entry_resumes_on_a_restart(tiny_shards, tmp_path: Path) -> None:
    """The real ``python -m nestor_ds.train``: a run stopped at step 2, then the same command line (no --resume) in
    an attempt that torchrun would mark as restarted: it resumes from its own checkpoint instead of refusing it."""
    _, shards = tiny_shards
    cfg = tiny_config(tmp_path, shards, train={"max_steps": 4, "ckpt_every": 2}, tracking={"enabled": False})
    args = ["nestor_ds.train", "--ds_config", str(ds_config(tmp_path)), "--config", str(cfg), "--run-name", "r"]
    first = run_entry([*args, "--set", "train.stop_at=2"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_entry(args, cwd=tmp_path, env={"TORCHELASTIC_RESTART_COUNT": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "torchrun restart 1 (TORCHELASTIC_RESTART_COUNT): resuming run r" in again.stderr
    rows = (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("restart")
    cfg = tiny_config(
        root,
        build_tiny_shards(root),
        train={"max_steps": STEPS, "ckpt_every": 2, "collective_timeout_s": 25, "threads_per_rank": 1},
        tracking={"enabled": False},  # not under test here; MLflow start-up would double the test's time
    )
    return {"root": root, "cfg": cfg, "ds": ds_config(root, stage=2, micro=1)}


def _start(work: dict, name: str, launcher: list[str], env: dict[str, str]) -> subprocess.Popen:
    """The probe under `launcher`, in its own session, logging to <root>/<name>.log."""
    args = ["--config", str(work["cfg"]), "--ds_config", str(work["ds"]), "--global-batch", "4"]
    args += ["--out", str(work["root"] / "out" / name), "--run-name", name]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        **env,
    }
    log = open(work["root"] / f"{name}.log", "w")
    return subprocess.Popen(
        [*launcher, PROBE, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _finish(work: dict, name: str, proc: subprocess.Popen, timeout: float) -> dict:
    """Wait (asserted exit 0), then this attempt's losses and the final tag's weights (model and expert files)."""
    try:
        proc.wait(timeout=timeout)
    finally:
        kill_tree(proc.pid, signal.SIGKILL)
    log = (work["root"] / f"{name}.log").read_text()
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{log[-5000:]}"
    tag = work["root"] / "runs" / name / "checkpoints" / f"step_{STEPS:08d}"
    tensors = {}
    for f in sorted(tag.glob("*.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)
        module = state.get("module", state)
        tensors.update({f"{f.name}:{k}": v for k, v in module.items() if isinstance(v, torch.Tensor)})  # weights
    # every step's loss, from the run's own log (a resume truncates it to the checkpoint): losses.json holds the last
    # attempt's steps only, and an attempt can end in a restart after its last save (docs/multinode.md)
    rows = (work["root"] / "runs" / name / "metrics.jsonl").read_text().splitlines()
    losses = {json.loads(r)["step"]: json.loads(r)["train/loss"] for r in rows}
    return {"losses": losses, "tensors": tensors, "log": log}


def test_killed_worker_is_restarted_by_torchrun_and_resumes_by_itself(work: dict) -> None:
    """SIGKILL of rank 1 while step 3 runs, right after the step-2 checkpoint: torchrun's agent (--max-restarts 2,
    c10d rendezvous) restarts both workers with the same command line (no --resume), the restarted attempt says why it
    resumes and loads step_00000002, and the job exits 0 with the uninterrupted run's losses (metrics.jsonl) and final
    weights, bit for bit. The reference runs beside it (the slowed steps sleep: 2 cores carry both)."""
    port = free_port()
    elastic = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    elastic += ["--max-restarts", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    pids = work["root"] / "pids"
    env = {"NODE_PROBE_SLOW": "2:3", "RESTART_PROBE_PIDS": str(pids)}
    job = _start(work, "restarted", elastic, env)
    ref = _start(work, "reference", torchrun(2), {})
    ckpts = work["root"] / "runs" / "restarted" / "checkpoints"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (ckpts / "step_00000002" / "COMPLETE").is_file():
        assert time.monotonic() < deadline and job.poll() is None, "no step-2 checkpoint"
        time.sleep(0.2)
    time.sleep(1.0)  # step 3 has started on both ranks (each of its batches sleeps 3 s)
    os.kill(int((pids / "attempt0.rank1.pid").read_text()), signal.SIGKILL)

    restarted = _finish(work, "restarted", job, RUN_TIMEOUT)
    reference = _finish(work, "reference", ref, RUN_TIMEOUT)
    assert (pids / "attempt1.rank1.pid").is_file(), "torchrun did not restart the workers"
    lines = [ln for ln in restarted["log"].splitlines() if "torchrun restart 1" in ln]
    assert lines and "resuming run restarted" in lines[0], restarted["log"][-4000:]
    assert any("resumed from" in ln and "step_00000002" in ln for ln in restarted["log"].splitlines())
    assert list(reference["losses"]) == list(range(1, STEPS + 1))
    assert restarted["losses"] == reference["losses"]
    assert restarted["tensors"].keys() == reference["tensors"].keys() and reference["tensors"]
    for k, v in reference["tensors"].items():
        assert torch.equal(v, restarted["tensors"][k]), k


def test_job_that_loses_a_node_for_good_continues_on_fewer_nodes(tmp_path: Path) -> None:
    """Two agents ``--nnodes 1:2 --nproc_per_node 1 --max-restarts 2`` (c10d on 127.0.0.1, last_call_timeout 5 s);
    the non-host agent's whole tree is SIGKILLed after the step-2 checkpoint and never comes back. The surviving
    agent restarts its worker on world size 1, which resumes by itself through the elastic resume (ZeRO-2 re-sharded,
    ep 2 -> 1) and finishes with what a run of 2 ranks to step 2 and 1 rank after it gives: the 2 -> 1 bar of
    test_elastic_resume.py (losses to 1e-5 relative, prediction to 1e-4), final weights to 1e-4.
    The run itself is tools/soak_restart.py --mode fewer-nodes (documented there and in docs/multinode.md)."""
    from tools.soak_restart import fewer_nodes

    r = fewer_nodes(tmp_path, timeout_s=RUN_TIMEOUT)
    log = (tmp_path / "node0.log").read_text()[-5000:]
    assert r["world_before"] == 2 and r["world_after"] == 1, (r, log)
    assert r["restart_line"] and r["resharded"] and r["elastic_resume_line"], log
    assert r["metrics"]["steps_equal"] and r["metrics"]["rows"] == [STEPS, STEPS], r
    assert r["loss_max_rel_diff"] <= 1e-5 and r["prediction_max_abs_diff"] <= 1e-4, r
    assert not r["final_tag"]["missing_or_extra"] and r["final_tag"]["max_abs_diff"] <= 1e-4, r["final_tag"]
    assert r["passed"], r
