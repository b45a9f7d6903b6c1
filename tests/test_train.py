"""The pre-training entry end to end: 2 CPU ranks over gloo, real shards, real DeepSpeed, real MLflow store."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch

from nestor_ds.procs import torchrun

from train_fixtures import ds_config, entry_args, launch, reference_mi_bits, tiny_config

TRAIN = "nestor_ds.train"  # run as a module (tests/conftest.py puts the repository on PYTHONPATH)
PROBE = "tests.scripts.probe_train"
pytestmark = pytest.mark.timeout(900)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _ok(proc) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


def test_zero2_ep2_trains_checkpoints_and_evaluates(pretrain_ep2):
    """The shared pre-training (tests/conftest.py): 20 steps of a tiny NESTOR, ZeRO-2, token experts expert-parallel
    over 2 ranks, evaluation and MLflow on."""
    proc = pretrain_ep2
    _ok(proc)
    run = pretrain_ep2.run_dir
    losses = _losses(run)
    assert len(losses) == 20 and all(map(lambda v: v == v and abs(v) < 1e3, losses))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    threads = max(1, (os.cpu_count() or 1) // 2)  # the default threads_per_rank: cores / ranks on this node
    assert f"world size 2, ep_size 2, {threads} thread(s) per rank" in proc.stderr, proc.stderr[-3000:]
    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step_00000010", "step_00000020"]
    last = run / "checkpoints" / "step_00000020"
    for f in (
        "mp_rank_00_model_states.pt",
        "nestor_config.json",
        "COMPLETE",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ):
        assert (last / f).is_file(), f
    expert_files = sorted(last.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    # nestor-tiny: 2 blocks x 4 image experts, each with a token MoE of 4 experts -> 8 MoE layers x 4 experts
    assert len(expert_files) == 8 * 4
    saved = json.loads((last / "nestor_config.json").read_text())
    assert saved["world_size"] == 2 and saved["ep_size"] == 2
    assert "ep_size 2" in proc.stderr and "world size 2" in proc.stderr


def test_one_mlflow_run_with_params_metrics_and_figures(pretrain_ep2):
    from mlflow.tracking import MlflowClient

    _ok(pretrain_ep2)
    client = MlflowClient(pretrain_ep2.uri)
    exp = client.get_experiment_by_name("nestor-ds")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "one MLflow run per training, never one per rank"
    run = runs[0]
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    for key in (
        "config.model.width",
        "config.optim.lr",
        "ds_config.zero_optimization.stage",
        "world_size",
        "ep_size",
        "preset",
        "total_params",
        "active_params",
        "flops_per_sample",
    ):
        assert key in params, key
    assert params["world_size"] == "2" and params["ep_size"] == "2"
    assert params["ds_config.zero_optimization.stage"] == "2"
    assert tags["nestor.entry"] == "pretrain" and "nestor.version.torch" in tags and "nestor.version.deepspeed" in tags
    for key in (
        "train/loss",
        "train/rel_l2",
        "train/image_lb",
        "train/token_lb",
        "train/lr",
        "train/grad_norm",
        "perf/samples_per_s",
        "perf/tokens_per_s",
        "perf/step_time_s",
        "perf/tflops",
        "eval/ns_tiny/l2re_1step",
        "eval/dr_tiny/l2re_1step",
        "eval/ns_tiny/l2re_rollout",
        "experts/block0/image_entropy",
        "experts/block0/specialisation_mi",
    ):
        assert key in metrics, key
    # ep 2: how much more than the mean the busiest rank's token experts got, now and after the best re-ordering
    # (both are >= 1 and <= ep by construction; what can fail: the re-ordering never makes the busiest rank busier)
    assert metrics["experts/token_ep_busiest_rank_placed"] <= metrics["experts/token_ep_busiest_rank"]
    history = client.get_metric_history(run.info.run_id, "eval/dr_tiny/l2re_1step")
    assert sorted(m.step for m in history) == [10, 20]
    art = Path(run.info.artifact_uri.replace("file://", ""))
    pngs = sorted(art.rglob("*.png"))
    names = " ".join(p.name for p in pngs)
    for part in ("ns_tiny_step", "dr_tiny_step", "rollout_error", "block0_image_experts", "block0_token_experts"):
        assert part in names, (part, names)
    for png in pngs:
        head = png.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", head[16:24])
        assert width > 50 and height > 50


def _usage_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "expert_usage.jsonl").read_text().splitlines()]


def test_resume_reproduces_the_uninterrupted_run(tiny_shards, tmp_path):
    """Losses of a run stopped at step 3 and resumed equal the uninterrupted run's; so do the expert-usage rows
    (train.usage_every: 3, recorded without evaluating), which also count only the steps since the previous row."""
    root, shards = tiny_shards
    cfg = tiny_config(
        tmp_path,
        shards,
        model={"moe": {"backend": "local"}},
        train={"max_steps": 8, "ckpt_every": 100, "input_noise": 5e-4, "usage_every": 3},
        tracking={"enabled": False},
    )
    ds = str(ds_config(tmp_path))
    full = launch([TRAIN, "--ds_config", ds, "--config", str(cfg), "--run-name", "full"], ranks=2, cwd=tmp_path)
    _ok(full)
    usage = _usage_rows(tmp_path / "runs" / "full")
    assert [r["step"] for r in usage] == [3, 6, 8]  # every 3 steps and the end of the run
    totals = [sum(map(sum, r["blocks"]["0"]["dataset_expert"])) for r in usage]  # image assignments per row
    assert totals[0] == totals[1] > 0 and totals[2] * 3 == totals[0] * 2, totals  # 3, 3 and 2 steps
    for r in usage:  # each row's mutual information is that of its own counts; no budget keys without a budget
        block = r["blocks"]["1"]
        assert block["mi_bits"] == pytest.approx(reference_mi_bits(block["dataset_expert"]), abs=1e-9)
        assert "budget/seconds" not in r
    first = launch(
        [TRAIN, "--ds_config", ds, "--config", str(cfg), "--run-name", "cut", "--set", "train.stop_at=3"],
        ranks=2,
        cwd=tmp_path,
    )
    _ok(first)
    assert "stopped cleanly at step 3" in first.stderr
    second = launch(
        [TRAIN, "--ds_config", ds, "--config", str(cfg), "--run-name", "cut", "--resume", "auto"], ranks=2, cwd=tmp_path
    )
    _ok(second)
    assert "resumed from" in second.stderr
    a, b = _losses(tmp_path / "runs" / "full"), _losses(tmp_path / "runs" / "cut")
    assert len(a) == len(b) == 8
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-6 * abs(x), (a, b)
    resumed = _usage_rows(tmp_path / "runs" / "cut")
    assert [r["blocks"] for r in resumed] == [r["blocks"] for r in usage]  # same routing, each step counted once


def test_two_ranks_equal_one_rank_and_export_matches_engine(tiny_shards, tmp_path):
    """Same global batch: loss at step 1 to 1e-5, parameters after 3 steps to 1e-4; then the 2-rank (ep 2)
    checkpoint exported to one safetensors file gives the engine model's outputs."""
    from nestor_ds import load_pretrained
    from nestor_ds.checkpoint.export import export_checkpoint
    from nestor_ds.checkpoint.load import load_local_state

    root, shards = tiny_shards
    cfg = tiny_config(
        tmp_path,
        shards,
        model={"moe": {"backend": "local"}},
        loss={"image_lb_weight": 0.0, "token_lb_weight": 0.0},
        train={"max_steps": 3, "ckpt_every": 3},
        tracking={"enabled": False},
    )
    ds = str(ds_config(tmp_path))
    out = {}
    for ranks in (1, 2):
        proc = launch(
            [
                PROBE,
                "--config",
                str(cfg),
                "--ds_config",
                ds,
                "--global-batch",
                "4",
                "--out",
                f"probe{ranks}",
                "--run-name",
                f"r{ranks}",
                *(["--set", "model.moe.ep_size=2"] if ranks == 2 else []),  # auto is 1 on one node
            ],
            ranks=ranks,
            cwd=tmp_path,
        )
        _ok(proc)
        out[ranks] = json.loads((tmp_path / f"probe{ranks}" / "losses.json").read_text())
    assert abs(out[1][0] - out[2][0]) <= 1e-5 * abs(out[1][0]), out
    one, _, _ = load_local_state(tmp_path / "runs" / "r1" / "checkpoints")
    two, cfg2, _ = load_local_state(tmp_path / "runs" / "r2" / "checkpoints")
    assert cfg2["ep_size"] == 2 and set(one) == set(two)
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst <= 1e-4, worst

    exported = export_checkpoint(tmp_path / "runs" / "r2" / "checkpoints", tmp_path / "model.safetensors")
    probe = torch.load(tmp_path / "probe2" / "probe.pt", weights_only=True)
    model = load_pretrained(exported)
    with torch.no_grad():
        pred = model(probe["x"], probe["channel_mask"]).pred
    assert torch.allclose(pred, probe["pred"], rtol=0, atol=1e-6), (pred - probe["pred"]).abs().max()


def test_bf16_config_with_gradient_accumulation(tiny_shards, tmp_path):
    """The GPU configs' bf16 path runs here too: inputs follow the weights' dtype, the loss stays fp32."""
    root, shards = tiny_shards
    cfg = tiny_config(
        tmp_path,
        shards,
        model={"moe": {"backend": "local"}},
        train={"max_steps": 3, "ckpt_every": 3, "eval_every": 0},
        tracking={"enabled": False},
    )
    ds = ds_config(tmp_path, stage=2, micro=2, accum=2, suffix="_bf16")
    proc = launch([TRAIN, "--ds_config", str(ds), "--config", str(cfg), "--run-name", "bf16"], ranks=1, cwd=tmp_path)
    _ok(proc)
    losses = _losses(tmp_path / "runs" / "bf16")
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["perf/samples_per_s"] > 0 and "train/grad_norm" in rows[-1]


def test_zero3_refuses_expert_parallelism_with_a_message(tiny_shards, tmp_path):
    root, shards = tiny_shards
    cfg = tiny_config(tmp_path, shards, model={"moe": {"backend": "local", "ep_size": 2}}, tracking={"enabled": False})
    proc = launch(
        [TRAIN, "--ds_config", str(ds_config(tmp_path, stage=3)), "--config", str(cfg)], ranks=1, cwd=tmp_path
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.moe.ep_size=2: ZeRO stage 3") and "zero2.json" in last


@pytest.mark.parametrize(
    "model",
    [
        {"preset": "afno-tiny", "width": 16, "patch_size": 4, "afno_modes": 2, "norm_groups": 4, "head_dim": 8},
        {"moe": {"backend": "local"}},  # NESTOR: image experts called in lockstep, as ZeRO-3 gathers per module call
    ],
    ids=["afno", "nestor-local"],
)
def test_zero3_trains_exports_and_survives_unreachable_tracking(tiny_shards, tmp_path, model):
    from nestor_ds import load_pretrained
    from nestor_ds.checkpoint.export import export_checkpoint

    root, shards = tiny_shards
    cfg = tiny_config(
        tmp_path,
        shards,
        model=model,
        train={"max_steps": 3, "ckpt_every": 3},
        tracking={"tracking_uri": "http://127.0.0.1:9", "enabled": True},
    )
    proc = launch(
        [TRAIN, "--ds_config", str(ds_config(tmp_path, stage=3)), "--config", str(cfg), "--run-name", "z3"],
        ranks=2,
        cwd=tmp_path,
    )
    _ok(proc)
    assert "MLflow tracking disabled" in proc.stderr
    assert len(_losses(tmp_path / "runs" / "z3")) == 3
    tag = tmp_path / "runs" / "z3" / "checkpoints" / "step_00000003"
    assert (tag / "COMPLETE").is_file() and (tag / "consolidated_model_states.pt").is_file()
    out = export_checkpoint(tag.parent, tmp_path / "z3.safetensors")  # ZeRO-3 partitions, gathered at save time
    restored = load_pretrained(out)
    # the engine's own weights, rebuilt independently of our gathered copy: DeepSpeed's zero_to_fp32 joins every
    # rank's fp32 partitions (fp32 run: the masters are the weights); the export must hold each one exactly
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from nestor_ds.checkpoint.convert import deepspeed_to_local_state, to_model_layout

    ds_only = tmp_path / "ds_only" / tag.name  # DeepSpeed's files only: zero_to_fp32 takes any *_model_states.pt
    ds_only.mkdir(parents=True)
    for f in tag.glob("*_states.pt"):
        if f.name != "consolidated_model_states.pt":
            (ds_only / f.name).symlink_to(f)
    engine = get_fp32_state_dict_from_zero_checkpoint(str(ds_only.parent), tag=tag.name)
    expected = to_model_layout(restored, deepspeed_to_local_state(engine))
    exported = restored.state_dict()
    params = dict(restored.named_parameters())
    assert set(params) <= set(expected), sorted(set(params) - set(expected))
    for name in params:
        torch.testing.assert_close(exported[name], expected[name], rtol=0, atol=0, msg=name)


def test_bad_configs_fail_at_start_with_one_line(tiny_shards, tmp_path, monkeypatch, capsys):
    root, shards = tiny_shards
    cfg = tiny_config(tmp_path, shards, tracking={"enabled": False})
    ds = str(ds_config(tmp_path))
    # errors in the YAML are found before any process group exists: the entry's own CLI, called in this process
    from nestor_ds.cli import run_cli
    from nestor_ds.train import main

    cases = [
        (["--set", "model.widht=3"], "unknown key 'model.widht'"),
        (["--set", "train.max_steps=abc"], "train.max_steps must be an integer"),
        (["--set", "model.t_in=7"], "model.t_in = 7 disagrees with data.t_in = 4"),
    ]
    for extra, message in cases:
        monkeypatch.setattr(sys, "argv", ["train", "--ds_config", ds, "--config", str(cfg), *extra])
        with pytest.raises(SystemExit) as exit_:
            run_cli(main)
        assert exit_.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error:") and message in last, last
    # errors found against the launch (world size, DeepSpeed JSON): a real launch
    for extra, message in [
        (["--ds_config", ds, "--set", "model.moe.backend=local", "--set", "model.moe.ep_size=3"], "must divide both"),
        (["--ds_config", str(tmp_path / "nope.json")], "nope.json: file not found"),
    ]:
        proc = launch([TRAIN, "--config", str(cfg), *extra], ranks=1, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and message in last, last


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(tiny_shards, tmp_path):
    """Cluster preemption with the default ``log_every`` (10): SIGTERM to rank 1 only, between logging steps. Both
    ranks must agree and save within 2 steps of the step at which the signal arrived (not at the next logging
    step: launchers SIGKILL 30 s after SIGTERM), stop cleanly, and a resume must continue from that checkpoint."""
    import os
    import re
    import signal
    import subprocess
    import time

    root, shards = tiny_shards
    cfg = tiny_config(
        tmp_path,
        shards,
        model={"moe": {"backend": "local"}},
        train={"max_steps": 100000, "ckpt_every": 100000, "log_every": 10},
        tracking={"enabled": False},
    )
    ds = str(ds_config(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = torchrun(2, "-m", TRAIN, "--ds_config", ds, "--config", str(cfg), "--run-name", "pre")
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )

    def rank_pid(rank: int) -> int | None:
        """The live process of this job's ``rank`` (its environment says RANK=<rank>)."""
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and str(cfg) in (d / "cmdline").read_bytes().decode(errors="replace"):
                    if f"RANK={rank}" in (d / "environ").read_bytes().decode(errors="replace").split("\0"):
                        return int(d.name)
            except OSError:
                continue
        return None

    run = tmp_path / "runs" / "pre"
    metrics = run / "metrics.jsonl"
    try:
        deadline = time.time() + 300  # a bound against hanging, not a timing assertion
        while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 10):
            time.sleep(0.2)
        assert len(metrics.read_text().splitlines()) >= 10  # step 10 logged: the next logging step is 20
        os.kill(rank_pid(1), signal.SIGTERM)  # one rank: rank 0 must learn it from the agreement
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    requested = [int(n) for n in re.findall(r"received SIGTERM: preemption requested at step (\d+)", err)]
    assert len(requested) == 1, err[-3000:]  # rank 1 only
    tags = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert len(tags) == 1 and (tags[0] / "COMPLETE").is_file(), err[-3000:]
    stopped_at = int(tags[0].name.split("_")[1])
    # posted after the step that was running (N+1), read after the next: never later, whatever log_every is
    assert requested[0] + 1 <= stopped_at <= requested[0] + 2, (requested, stopped_at)
    assert json.loads((tags[0] / "COMPLETE").read_text())["step"] == stopped_at
    assert f"preempted: stopped cleanly at step {stopped_at}" in err
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, stopped_at + 1))
    resume = ["--run-name", "pre", "--resume", "auto", "--set", f"train.max_steps={stopped_at + 3}"]
    again = launch(entry_args(TRAIN, ds, str(cfg), *resume), ranks=2, cwd=tmp_path)
    _ok(again)
    assert f"resumed from {tags[0]} (step {stopped_at})" in again.stderr + again.stdout
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, stopped_at + 4))


class _Payload:
    """Stands for an arbitrary pickled object in a tampered checkpoint."""


def test_resume_refuses_a_checkpoint_with_pickled_objects(tiny_shards, tmp_path):
    root, shards = tiny_shards
    cfg = tiny_config(tmp_path, shards, train={"max_steps": 2, "ckpt_every": 2}, tracking={"enabled": False})
    ds = str(ds_config(tmp_path))
    first = launch([TRAIN, "--ds_config", ds, "--config", str(cfg), "--run-name", "t"], ranks=1, cwd=tmp_path)
    _ok(first)
    tag = tmp_path / "runs" / "t" / "checkpoints" / "step_00000002"
    optim = next(tag.glob("*optim_states.pt"))
    state = torch.load(optim, weights_only=False)
    state["payload"] = _Payload()
    torch.save(state, optim)
    again = launch(
        entry_args(TRAIN, ds, str(cfg), "--run-name", "t", "--resume", "auto", "--set", "train.max_steps=4"),
        ranks=1,
        cwd=tmp_path,
    )
    assert again.returncode == 2
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and optim.name in last and "refused to load" in last, last
