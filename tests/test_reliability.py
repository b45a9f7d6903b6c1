"""Faults a user meets on a shared cluster (issue 11): rollback and resume, broken or partial checkpoints, a full
disk, launcher preemption. Real training runs (tiny NESTOR, DeepSpeed on CPU), real files, real signals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nestor_ds.procs import free_port, torchrun

from train_fixtures import ds_config, launch, tiny_config

TRAIN = "nestor_ds.train"  # run as a module (tests/conftest.py puts the repository on PYTHONPATH)
pytestmark = pytest.mark.timeout(900)


def _ok(proc) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(tmp: Path, cfg: Path, name: str, *extra: str, ranks: int = 1):
    return launch(
        [TRAIN, "--ds_config", str(ds_config(tmp)), "--config", str(cfg), "--run-name", name, *extra],
        ranks=ranks,
        cwd=tmp,
    )


@pytest.fixture
def small_cfg(tiny_shards, tmp_path):
    root, shards = tiny_shards
    return tiny_config(
        tmp_path, shards, train={"max_steps": 6, "ckpt_every": 2, "keep_last": 2}, tracking={"enabled": False}
    )


def test_rollback_then_auto_follows_the_new_branch(small_cfg, tmp_path):
    """Roll back to step 4 with a new lr, get preempted at 5, requeue with --resume auto: continue from 5 (the
    newest save), not from the abandoned step 6, which is moved aside (kept); step 4 survives pruning."""
    ck = tmp_path / "runs" / "r" / "checkpoints"
    _ok(_train(tmp_path, small_cfg, "r"))
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000004", "step_00000006"]
    back = _train(
        tmp_path,
        small_cfg,
        "r",
        "--resume",
        str(ck / "step_00000004"),
        "--set",
        "optim.lr=1e-3",
        "--set",
        "train.stop_at=5",
    )
    _ok(back)
    assert "step_00000006 belongs to an abandoned branch" in back.stderr
    assert (ck / "set_aside" / "step_00000006.abandoned" / "COMPLETE").is_file()
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000004", "step_00000005"]
    again = _train(tmp_path, small_cfg, "r", "--resume", "auto", "--set", "optim.lr=1e-3")
    _ok(again)
    assert f"resumed from {ck / 'step_00000005'} (step 5)" in again.stderr, again.stderr[-3000:]
    rows = _rows(tmp_path / "runs" / "r")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[3]["train/lr"] > 1e-3 >= rows[4]["train/lr"] and rows[5]["train/lr"] <= 1e-3  # 5 and 6: the new branch


def test_broken_newest_tag_falls_back_to_the_previous_one(tiny_shards, tmp_path):
    """A truncated file in the newest tag: warn naming it, resume from the previous complete tag, and the
    redone steps equal the first run's (metrics.jsonl cut only after the successful load)."""
    root, shards = tiny_shards
    cfg = tiny_config(tmp_path, shards, train={"max_steps": 6, "ckpt_every": 3}, tracking={"enabled": False})
    run = tmp_path / "runs" / "b"
    ck = run / "checkpoints"
    _ok(_train(tmp_path, cfg, "b"))
    first = _rows(run)
    bad = ck / "step_00000006" / "mp_rank_00_model_states.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    again = _train(tmp_path, cfg, "b", "--resume", "auto")
    _ok(again)
    assert (
        "checkpoint step_00000006 cannot be loaded" in again.stderr and "falling back to step_00000003" in again.stderr
    )
    assert f"resumed from {ck / 'step_00000003'} (step 3)" in again.stderr
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(first, rows):
        assert a["train/loss"] == b["train/loss"], (a, b)
    assert (ck / "set_aside" / "step_00000006.abandoned").is_dir()


def test_missing_file_in_every_tag_fails_with_the_names(tiny_shards, tmp_path):
    root, shards = tiny_shards
    cfg = tiny_config(tmp_path, shards, train={"max_steps": 2, "ckpt_every": 1}, tracking={"enabled": False})
    ck = tmp_path / "runs" / "m" / "checkpoints"
    _ok(_train(tmp_path, cfg, "m"))
    for tag in ck.glob("step_*"):
        next(tag.glob("*optim_states.pt")).unlink()
    again = _train(tmp_path, cfg, "m", "--resume", "auto", "--set", "train.max_steps=3")
    assert again.returncode == 2
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "no loadable checkpoint" in last and "step_00000002, step_00000001" in last, (
        last
    )
    assert "optim_states.pt is missing" in again.stderr
    assert len(_rows(tmp_path / "runs" / "m")) == 2, "metrics.jsonl untouched when no load succeeded"


def test_auto_without_a_checkpoint_says_it_starts_fresh(small_cfg, tmp_path):
    proc = _train(tmp_path, small_cfg, "typo", "--resume", "auto", "--set", "train.max_steps=1")
    _ok(proc)
    assert "--resume auto: no complete checkpoint under" in proc.stderr and "starting fresh" in proc.stderr


def test_partial_tag_is_set_aside_at_the_next_start(small_cfg, tmp_path):
    """A save killed half-way leaves a tag without COMPLETE; the next start moves it aside, once, with a line."""
    ck = tmp_path / "runs" / "p" / "checkpoints"
    _ok(_train(tmp_path, small_cfg, "p", "--set", "train.stop_at=2"))
    partial = ck / "step_00000004"
    shutil.copytree(ck / "step_00000002", partial)
    (partial / "COMPLETE").unlink()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 cut")
    again = _train(tmp_path, small_cfg, "p", "--resume", "auto")
    _ok(again)
    assert "step_00000004 has no COMPLETE marker" in again.stderr
    assert (ck / "set_aside" / "step_00000004.partial" / "mp_rank_00_model_states.pt").read_bytes() == b"PK\x03\x04 cut"
    assert (ck / "step_00000004" / "COMPLETE").is_file()  # saved afresh by the resumed run
    assert [r["step"] for r in _rows(tmp_path / "runs" / "p")] == [1, 2, 3, 4, 5, 6]


def _can_mount_tmpfs() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    not _can_mount_tmpfs(), reason="needs an unprivileged mount namespace (unshare -Urm) for a small tmpfs"
)
def test_disk_full_during_a_save_names_the_path_and_resume_recovers(small_cfg, tmp_path):
    """A real full disk: the run directory on a tmpfs (in a private mount namespace) shrunk to just above what
    it holds, so the step-4 save hits ENOSPC. The error names the path; after space is freed, --resume auto
    sets the partial tag aside and continues from step 2."""
    runs = tmp_path / "runs"
    runs.mkdir()
    ds = ds_config(tmp_path)
    train = f"{sys.executable} -m {TRAIN} --ds_config {ds} --config {small_cfg} --run-name d"
    script = f"""
set -u
mount -t tmpfs -o size=64m tmpfs {runs}
{train} --set train.stop_at=2 > {tmp_path}/1.out 2>&1; echo $? > {tmp_path}/1.rc
used=$(du -sk {runs} | cut -f1)
mount -o remount,size=$((used + 96))k {runs}
{train} --resume auto > {tmp_path}/2.out 2>&1; echo $? > {tmp_path}/2.rc
mount -o remount,size=64m {runs}
{train} --resume auto > {tmp_path}/3.out 2>&1; echo $? > {tmp_path}/3.rc
cp {runs}/d/metrics.jsonl {tmp_path}/metrics.jsonl
ls {runs}/d/checkpoints/set_aside > {tmp_path}/aside.txt
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=tmp_path, env=env, timeout=600, check=True)
    out = {i: (tmp_path / f"{i}.out").read_text() for i in (1, 2, 3)}
    rc = {i: int((tmp_path / f"{i}.rc").read_text()) for i in (1, 2, 3)}
    assert rc[1] == 0, out[1][-3000:]
    assert rc[2] != 0 and "no space left on" in out[2] and str(runs / "d" / "checkpoints") in out[2], out[2][-3000:]
    assert "basic_ios" not in out[2].strip().splitlines()[-1]
    assert rc[3] == 0, out[3][-3000:]
    assert "has no COMPLETE marker" in out[3] and "resumed from" in out[3] and "(step 2)" in out[3]
    assert "step_00000004.partial" in (tmp_path / "aside.txt").read_text()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_one_rank_that_cannot_write_its_files_leaves_the_set_intact(small_cfg, tmp_path):
    """2 ranks; rank 1 alone cannot write past a file-size limit (RLIMIT_FSIZE, its writes fail with EFBIG as on a
    node whose disk filled) at the step-4 save, after its step-2 files fit. The job ends, step 4 is never marked
    COMPLETE, rank 0's files of it are not taken for a checkpoint, and --resume auto on healthy ranks sets the partial
    tag aside and continues from step 2 to the end."""
    ds = ds_config(tmp_path)
    ck = tmp_path / "runs" / "f" / "checkpoints"
    base = ["--ds_config", str(ds), "--config", str(small_cfg), "--run-name", "f"]
    _ok(launch([TRAIN, *base, "--set", "train.stop_at=2", "--set", "model.moe.ep_size=2"], ranks=2, cwd=tmp_path))
    rank1 = [p for p in (ck / "step_00000002").iterdir() if "rank_1" in p.name or "rank_01" in p.name]
    assert rank1, sorted(p.name for p in (ck / "step_00000002").iterdir())
    limit_kb = max(p.stat().st_size for p in rank1) // 1024 // 2  # below the largest file rank 1 writes
    wrapper = tmp_path / "rank.sh"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$RANK" = 1 ]; then trap "" XFSZ; ulimit -f {limit_kb}; fi\n'
        f'exec {sys.executable} -m {TRAIN} "$@"\n'
    )
    wrapper.chmod(0o755)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # the limit bites only on files rank 1 (re)writes past it: its step-4 optimizer partition
    args = [*base, "--resume", "auto", "--set", "train.stop_at=4", "--set", "model.moe.ep_size=2"]
    args += ["--set", "train.collective_timeout_s=30"]
    cmd = torchrun(2, "--no-python", str(wrapper), *args)
    failed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0, failed.stderr[-3000:]
    # rank 1 names the write that failed; rank 0 names the lost peer and the newest complete checkpoint
    assert "while saving step_00000004" in failed.stderr, failed.stderr[-3000:]
    assert "lost peer rank 1" in failed.stderr and "newest complete checkpoint: step_00000002" in failed.stderr
    assert not (ck / "step_00000004" / "COMPLETE").exists()
    assert (ck / "step_00000002" / "COMPLETE").exists()
    resumed = launch([TRAIN, *base, "--resume", "auto", "--set", "model.moe.ep_size=2"], ranks=2, cwd=tmp_path)
    _ok(resumed)
    assert "resumed from" in resumed.stderr and "(step 2)" in resumed.stderr, resumed.stderr[-3000:]
    assert [r["step"] for r in _rows(tmp_path / "runs" / "f")] == [1, 2, 3, 4, 5, 6]
    assert (ck / "step_00000006" / "COMPLETE").exists()


def _pids_running(needle: str) -> list[int]:
    """Live rank processes of this test: their command line runs the nestor_ds.train module (not via a launcher
    module or the `deepspeed` runner script) with ``needle`` (the test's config path) among the arguments."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                args = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            head = [a for a in args[1:] if not a.startswith("-")][:1]  # the script python runs
            if needle in args and head == [TRAIN] and state not in ("Z", "X"):
                pids.append(int(d.name))
    return pids


def _wait_for(cond, limit_s: float) -> bool:
    """Poll ``cond`` up to ``limit_s`` (a bound against hanging, not a timing assertion)."""
    import time

    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.5)
    return cond()


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_sigterm_to_the_launcher_checkpoints_and_ends_the_run_killed(tiny_shards, tmp_path, launcher):
    """SIGTERM to the launcher's own PID only (what `timeout` and many schedulers send). deepspeed's runner dies
    at once and forwards nothing; the ranks must notice, save at the next step boundary, exit, and the MLflow run
    must end KILLED. torchrun forwards SIGTERM; the ranks stop the same way. With the default log_every (10) and
    the signal after step 10, the ranks save within 2 steps of the step at which a rank saw the request (the
    deepspeed watcher polls once a second), not at logging step 20."""
    import re
    import signal
    import time

    from mlflow.tracking import MlflowClient

    root, shards = tiny_shards
    cfg = tiny_config(tmp_path, shards, train={"max_steps": 100000, "ckpt_every": 100000, "log_every": 10})
    if launcher == "deepspeed":
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port())]
    else:
        cmd = torchrun(2)
    cmd += [
        "--module" if launcher == "deepspeed" else "-m",
        TRAIN,
        "--ds_config",
        str(ds_config(tmp_path)),
        "--config",
        str(cfg),
        "--run-name",
        "pre",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "launcher.log"
    metrics = tmp_path / "runs" / "pre" / "metrics.jsonl"
    with open(log_path, "w") as log_fh:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log_fh, stderr=subprocess.STDOUT)
    ranks: list[int] = []
    try:
        assert _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 10, 300)
        ranks = _pids_running(str(cfg))
        assert len(ranks) == 2, ranks
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        assert _wait_for(lambda: not _pids_running(str(cfg)), 180), "ranks still running after the launcher died"
    finally:
        for pid in _pids_running(str(cfg)):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        time.sleep(0)
    out = log_path.read_text()
    tags = [p for p in (tmp_path / "runs" / "pre" / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file()]
    assert len(tags) == 1, out[-4000:]
    stopped_at = int(tags[0].name.split("_")[1])
    assert f"preempted: stopped cleanly at step {stopped_at}" in out
    requested = [int(n) for n in re.findall(r": preemption requested at step (\d+);", out)]
    assert requested and min(requested) + 1 <= stopped_at <= min(requested) + 2, (requested, stopped_at)
    # no traceback from the ranks; torchrun's own agent re-raises the signal as SignalException with a traceback
    # of its process (torch/distributed/elastic/agent/server/api.py), which no rank can prevent
    assert out.count("Traceback") == out.count("SignalException: Process"), out[-4000:]
    assert "[rank0]" not in out and "[rank1]" not in out, out[-4000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("nestor-ds").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]


# ----------------------------------------------------------------------------- data errors during training (§4)


def _copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _stream(shard_dir: Path, **data):
    from nestor_ds.data import DataConfig, DatasetSpec, TrainStream

    cfg = DataConfig(
        datasets=[DatasetSpec(name="ns", path=str(shard_dir))],
        t_in=4,
        t_ar=1,
        resolution=16,
        channels=2,
        windows_per_trajectory=2,
        shuffle_buffer=4,
        steps_per_epoch=6,
        **data,
    )
    return TrainStream(cfg, micro_batch=2, rank=0, world_size=1, seed=3)


def _poison(shard_dir: Path, value: float, fix_digest: bool) -> tuple[str, str]:
    """Write ``value`` into the first float of every trajectory's fields of train shard 0; with ``fix_digest``
    the manifest is updated to the new sha256 (data that was bad when built by another tool), else it is a
    corruption after the build. Returns (shard path, first sample key)."""
    import numpy as np

    from nestor_ds.shards import schema
    from nestor_ds.shards.schema import parse_npy_header as _parse_npy_header
    from nestor_ds.shards.tar import iter_shard_samples

    manifest = json.loads((shard_dir / "manifest.json").read_text())
    shard = shard_dir / manifest["splits"]["train"]["shards"][0]["file"]
    fd = os.open(shard, os.O_RDWR)
    try:
        samples = list(iter_shard_samples(fd, str(shard)))
        for key, members in samples:
            off, size = members["fields.npy"]
            head = np.frombuffer(os.pread(fd, min(size, 256), off), dtype=np.uint8)
            _, _, start = _parse_npy_header(head, key)
            os.pwrite(fd, np.float32(value).tobytes(), off + start)
    finally:
        os.close(fd)
    if fix_digest:
        manifest["splits"]["train"]["shards"][0]["sha256"] = schema.sha256_file(shard)
        (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    return str(shard), samples[0][0]


def test_a_changed_byte_in_a_shard_is_refused_before_use(tiny_shards, tmp_path):
    from nestor_ds.shards.schema import DataFormatError

    root, shards = tiny_shards
    d = _copy_shards(shards["ns_tiny"], tmp_path / "ns")
    shard, _ = _poison(d, 3.4e28, fix_digest=False)
    with pytest.raises(DataFormatError, match="manifest says") as err:
        next(iter(_stream(d).batches(0)))
    assert shard in str(err.value) and "sha256" in str(err.value)


def test_a_nan_in_a_batch_names_dataset_shard_and_key(tiny_shards, tmp_path):
    from nestor_ds.shards.schema import DataFormatError

    root, shards = tiny_shards
    d = _copy_shards(shards["ns_tiny"], tmp_path / "ns")
    shard, _ = _poison(d, float("nan"), fix_digest=True)
    with pytest.raises(DataFormatError) as err:
        for _ in zip(range(6), _stream(d).batches(0)):
            pass
    text = str(err.value)
    assert "dataset ns:" in text and f"shard {shard} sample ns_tiny_train_" in text and "NaN/Inf" in text, text
    assert "on_bad_sample: skip" in text


def test_skip_bad_samples_is_logged_counted_and_the_same_after_resume(tiny_shards, tmp_path, caplog):
    import torch

    root, shards = tiny_shards
    d = _copy_shards(shards["ns_tiny"], tmp_path / "ns")
    _poison(d, float("inf"), fix_digest=True)
    full = [b for _, b in zip(range(8), _stream(d, on_bad_sample="skip").batches(0))]
    skipped = sum(int(b["skipped"].sum()) for b in full)
    assert skipped > 0 and "skipped (data.on_bad_sample: skip)" in caplog.text
    for b in full:
        assert torch.isfinite(b["x"]).all() and torch.isfinite(b["y"]).all()
        assert not b["channel_mask"][b["skipped"]].any()  # out of the loss
    resumed = [b for _, b in zip(range(3), _stream(d, on_bad_sample="skip").batches(5))]
    for a, b in zip(full[5:], resumed):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_skipped_samples_reach_the_metrics(tiny_shards, tmp_path):
    root, shards = tiny_shards
    d = _copy_shards(shards["ns_tiny"], tmp_path / "ns")
    _poison(d, float("nan"), fix_digest=True)
    cfg = tiny_config(
        tmp_path,
        {"ns_tiny": d},
        data={"on_bad_sample": "skip"},
        train={"max_steps": 4, "ckpt_every": 4},
        tracking={"enabled": False},
    )
    proc = _train(tmp_path, cfg, "skip")
    _ok(proc)
    rows = _rows(tmp_path / "runs" / "skip")
    assert sum(r["train/skipped_samples"] for r in rows) > 0 and all(r["train/loss"] == r["train/loss"] for r in rows)
