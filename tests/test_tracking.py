"""Tracking: a real MLflow SQLite store in tmp_path, read back with MlflowClient."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from nestor_ds.tracking import (
    ExpertUsage,
    Tracker,
    TrackingConfig,
    expert_usage_heatmap,
    flatten,
    mutual_information_bits,
    prediction_panels,
    rollout_error_curve,
    token_expert_heatmap,
)

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its tables costs seconds); tests use own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _cfg(store: str, experiment: str, **kw) -> TrackingConfig:
    return TrackingConfig(tracking_uri=store, experiment=experiment, **kw)


def _runs(store: str, experiment: str) -> list:
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _download(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, str(dst)))


# ---------------------------------------------------------------- tracker
def test_run_records_params_metrics_tags_figures(store, tmp_path):
    cfg = _cfg(store, "roundtrip", system_metrics=True, system_metrics_interval_s=0.2)
    tracker = Tracker(cfg, rank=0, entry="finetune", run_name="ft-demo", parent_run_id="abc123pretrain")
    run_id = tracker.run_id
    assert run_id is not None
    tracker.log_params({"model": {"preset": "nestor-ti", "moe": {"top_k": 2}}, "note": "x" * 900})
    tracker.set_tags({"nestor.preset": "nestor-ti"})
    for step in range(3):
        tracker.log_metrics({"train/loss": torch.tensor(1.0 / (step + 1)), "perf/samples_per_s": np.float32(8.5)}, step)
    tracker.log_figure(rollout_error_curve({"dr_pdb": [0.01, 0.02, 0.04]}), "rollout")
    tracker.log_dict({"dr_pdb": {"l2re_1step": np.float64(0.0123)}}, "eval_report")
    time.sleep(0.7)  # let the system-metrics sampler publish at least once
    tracker.finish()
    assert tracker.run_id is None

    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "ft-demo"
    assert run.data.params["model.preset"] == "nestor-ti"
    assert run.data.params["model.moe.top_k"] == "2"
    assert len(run.data.params["note"]) == 500 and run.data.params["note"].endswith("...")
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == pytest.approx([1, 0.5, 1 / 3])
    assert run.data.metrics["perf/samples_per_s"] == pytest.approx(8.5)
    assert any(k.startswith("system/cpu") for k in run.data.metrics), sorted(run.data.metrics)
    tags = run.data.tags
    assert tags["nestor.entry"] == "finetune"
    assert tags["nestor.pretrain_run_id"] == "abc123pretrain"
    assert tags["nestor.preset"] == "nestor-ti"
    assert tags["nestor.version.torch"] == torch.__version__
    for key in ("nestor.version.deepspeed", "nestor.version.mlflow", "nestor.git.commit"):
        assert tags[key]

    png = _download(client, run_id, "figures/rollout.png", tmp_path)
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert matplotlib.image.imread(png).ndim == 3
    report = json.loads(_download(client, run_id, "eval_report.json", tmp_path).read_text())
    assert report["dr_pdb"]["l2re_1step"] == pytest.approx(0.0123)
    params = json.loads(_download(client, run_id, "params.json", tmp_path).read_text())
    assert len(params["note"]) == 900  # the artifact keeps the unclipped value


def test_metrics_of_close_calls_go_in_one_request(store):
    """Logging steps within metrics_every_s share one MLflow request; flush sends what is held, in step order."""
    tracker = Tracker(_cfg(store, "coalesce", system_metrics=False, metrics_every_s=3600), rank=0, entry="pretrain")
    for step in range(1, 31):
        tracker.log_metrics({"train/loss": 1.0 / step, "train/lr": 1e-3}, step=step)
    assert tracker.flush(30)
    assert tracker._outbox.sent == 2  # the first call at once, the 29 after it in one request
    history = MlflowClient(store).get_metric_history(tracker.run_id, "train/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 31))
    tracker.log_metrics({"train/loss": 0.01}, step=31)  # held, then sent by finish
    run_id = tracker.run_id
    tracker.finish()
    assert max(m.step for m in MlflowClient(store).get_metric_history(run_id, "train/loss")) == 31


def test_nonzero_rank_writes_nothing_and_one_run_per_training(store, tmp_path):
    unused = f"sqlite:///{tmp_path / 'never.db'}"
    other = Tracker(_cfg(unused, "ranks"), rank=1, entry="pretrain")
    other.log_params({"a": 1})
    other.log_metrics({"train/loss": 1.0}, 0)
    other.log_figure(rollout_error_curve({"a": [1.0]}), "x")
    other.finish()
    assert other.run_id is None
    assert not (tmp_path / "never.db").exists() and not (tmp_path / "mlruns").exists()

    trackers = [Tracker(_cfg(store, "ranks", system_metrics=False), rank=r, entry="pretrain") for r in range(2)]
    for r, t in enumerate(trackers):
        t.log_metrics({"train/loss": float(r)}, 0)
    run_ids = [t.run_id for t in trackers]
    for t in trackers:
        t.finish()
    runs = _runs(store, "ranks")
    assert len(runs) == 1 and run_ids == [runs[0].info.run_id, None]
    assert runs[0].data.metrics["train/loss"] == 0.0


def test_disabled_config_is_a_no_op(store):
    t = Tracker(_cfg(store, "disabled", enabled=False), rank=0, entry="pretrain")
    t.log_metrics({"train/loss": 1.0}, 0)
    t.finish()
    assert t.run_id is None and _runs(store, "disabled") == []


def test_unreachable_server_costs_one_warning(caplog):
    caplog.set_level(logging.WARNING, logger="nestor_ds.tracking")
    t = Tracker(TrackingConfig(tracking_uri="http://127.0.0.1:9"), rank=0, entry="pretrain")
    t.log_params({"a": 1})
    t.log_metrics({"train/loss": 1.0}, 0)
    t.log_figure(rollout_error_curve({"a": [1.0]}), "x")
    t.log_dict({"a": 1}, "r")
    t.finish()
    assert t.run_id is None  # gave up at the start: no retries later (a hang would hit the test's time limit)
    warnings = [r for r in caplog.records if r.name == "nestor_ds.tracking"]
    assert len(warnings) == 1 and "127.0.0.1:9" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


def test_rejected_write_is_dropped_and_tracking_goes_on(store, caplog):
    caplog.set_level(logging.WARNING, logger="nestor_ds.tracking")
    t = Tracker(_cfg(store, "later-error", system_metrics=False), rank=0, entry="pretrain")
    run_id = t.run_id
    MlflowClient(store).log_param(run_id, "lr", "0.1")  # someone else set it: MLflow params are immutable
    t.log_params({"lr": 0.5})  # conflicting value -> MLflow rejects this one request
    t.log_metrics({"train/loss": 1.0}, 0)  # ... and the run goes on
    assert t.run_id == run_id
    t.finish()
    rejected = [r.getMessage() for r in caplog.records if r.name == "nestor_ds.tracking"]
    assert len(rejected) == 1 and "rejected params" in rejected[0], rejected
    run = MlflowClient(store).get_run(run_id)
    assert run.data.params["lr"] == "0.1" and run.data.metrics["train/loss"] == 1.0
    assert run.info.status == "FINISHED"


def test_resume_continues_the_same_run(store):
    first = Tracker(_cfg(store, "resume", system_metrics=False), rank=0, entry="pretrain")
    run_id = first.run_id
    first.log_params({"optim": {"lr": 1e-3}})
    first.log_metrics({"train/loss": 2.0}, 10)
    first.finish("KILLED")
    again = Tracker(_cfg(store, "resume", system_metrics=False), rank=0, entry="pretrain", resume_run_id=run_id)
    assert again.run_id == run_id
    assert MlflowClient(store).get_run(run_id).info.status == "RUNNING"
    again.log_params({"optim": {"lr": 1e-3}, "train": {"resumed": True}})  # same value: fine
    again.log_metrics({"train/loss": 1.0}, 20)
    again.finish()
    assert len(_runs(store, "resume")) == 1
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.resumed"] == "True"
    assert [m.step for m in MlflowClient(store).get_metric_history(run_id, "train/loss")] == [10, 20]


def test_flatten_nested_dicts():
    assert flatten({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": {}}) == {"a.b.c": 1, "a.d": [1, 2], "e": {}}


# ---------------------------------------------------------------- expert statistics
def _specialised(datasets: int = 4) -> ExpertUsage:
    usage = ExpertUsage(num_datasets=datasets)
    ds = torch.arange(datasets).repeat(3)  # 3 samples per dataset
    usage.update(0, ds, ds[:, None], torch.full((datasets, 2), 6))  # k=1, dataset d -> expert d
    return usage


def test_mutual_information_perfect_specialisation_is_log2_datasets():
    usage = _specialised(4)
    assert usage.specialisation(0) == pytest.approx(2.0)
    np.testing.assert_array_equal(usage.counts_matrix(0), 3 * np.eye(4))
    m = usage.metrics()
    assert m["experts/block0/specialisation_mi"] == pytest.approx(2.0)
    assert m["experts/block0/image_entropy"] == pytest.approx(1.0)  # each expert gets a quarter
    assert m["experts/block0/image_max_share"] == pytest.approx(0.25)


def test_mutual_information_uniform_routing_is_zero():
    usage = ExpertUsage(num_datasets=3)
    ds = torch.tensor([0, 0, 1, 1, 2, 2])
    topk = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3], [0, 1], [2, 3]])  # k=2, every dataset alike
    usage.update(1, ds, topk, torch.ones(4, 3))
    assert usage.specialisation(1) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information_bits(np.ones((5, 7))) == pytest.approx(0.0, abs=1e-12)


def test_load_metrics_by_hand():
    usage = ExpertUsage(num_datasets=1)
    # image level: expert 0 gets 3 of 4 assignments, expert 1 gets 1, expert 2 none
    usage.update(
        0,
        torch.zeros(4, dtype=torch.long),
        torch.tensor([[0], [0], [0], [1]]),
        torch.tensor([[30, 10], [5, 5], [0, 0]]),
        dropped_tokens=2,
    )
    usage.update(
        0,
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, 1, dtype=torch.long),
        torch.tensor([[0, 0], [0, 0], [0, 0]]),
        dropped_tokens=1,
    )
    m = usage.metrics("experts")
    p = np.array([0.75, 0.25])
    assert m["experts/block0/image_entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(3))
    assert m["experts/block0/image_max_share"] == pytest.approx(0.75)
    assert m["experts/block0/image_min_share"] == 0.0
    assert m["experts/block0/expert0/token_entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(2))
    assert m["experts/block0/expert0/token_max_share"] == pytest.approx(0.75)
    assert m["experts/block0/expert1/token_entropy"] == pytest.approx(1.0)
    assert "experts/block0/expert2/token_entropy" not in m  # expert 2 got no samples
    assert m["experts/block0/dropped_tokens"] == 3.0
    usage.reduce()  # no process group: no-op
    assert usage.metrics("experts") == m
    with pytest.raises(ValueError, match="block 0"):
        usage.update(0, torch.zeros(2, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 2))


def test_busiest_rank_metrics_under_expert_parallelism_by_hand():
    one_sample = (torch.zeros(1, dtype=torch.long), torch.tensor([[0]]))
    # image expert 0's token MoE: experts 0, 1 (rank 0) get 5 + 5, experts 2, 3 (rank 1) 1 + 1 -> rank 0 holds 10 of
    # 12, i.e. 2 x 10/12 of the mean; re-ordered {0, 2} {1, 3}: 6 of 12 -> 1.0. Image expert 1's: 3, 1 | 1, 3 -> 1.0
    counts = torch.tensor([[5, 5, 1, 1], [3, 1, 1, 3]])
    usage = ExpertUsage(num_datasets=1, ep_size=2)
    usage.update(0, *one_sample, counts)
    m = usage.metrics("experts")
    assert m["experts/token_ep_busiest_rank"] == pytest.approx((2 * 10 + 2 * 4) / (12 + 8))  # weighted by assignments
    assert m["experts/token_ep_busiest_rank_placed"] == pytest.approx(1.0)
    without_ep = ExpertUsage(num_datasets=1)
    without_ep.update(0, *one_sample, counts)
    assert not any("token_ep_busiest" in k for k in without_ep.metrics("experts"))


def _reduce_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    usage = ExpertUsage(num_datasets=2)
    usage.update(0, torch.tensor([rank]), torch.tensor([[rank]]), torch.tensor([[rank + 1, 0], [0, 1]]))
    usage.reduce()
    if rank == 0:
        np.save(out_file, np.concatenate([usage.counts_matrix(0).ravel(), usage.token_counts(0).ravel()]))
    torch.distributed.destroy_process_group()


def test_reduce_sums_counts_across_ranks(tmp_path):
    out = tmp_path / "reduced.npy"
    # spawn, not fork: a forked child would inherit the process group that in-process engine tests of this session
    # started (re-importing this module costs ~10 s on 2 cores)
    torch.multiprocessing.start_processes(
        _reduce_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, start_method="spawn"
    )
    reduced = np.load(out, allow_pickle=False)
    np.testing.assert_array_equal(reduced[:4], [1, 0, 0, 1])  # dataset r -> expert r on rank r
    np.testing.assert_array_equal(reduced[4:], [3, 0, 0, 2])
    # summed counts of a perfectly specialised routing: 1 bit for 2 datasets
    assert mutual_information_bits(reduced[:4].reshape(2, 2)) == pytest.approx(1.0)


# ---------------------------------------------------------------- figures
def _png_ok(fig, path: Path) -> None:
    fig.savefig(path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert matplotlib.image.imread(path).shape[0] > 50


def test_figures_render_valid_pngs(tmp_path):
    rng = np.random.default_rng(0)
    true = rng.standard_normal((16, 12, 2))
    fig = prediction_panels(torch.tensor(true + 0.1), true, ["u", "v"], "dr_pdb step 1")
    assert len(fig.axes) == 2 * 3 * 2  # 6 panels + 6 colour bars
    _png_ok(fig, tmp_path / "pred.png")
    fig = expert_usage_heatmap(3 * np.eye(4), ["a", "b", "c", "d"], None, "block 0")
    assert "2.000 bits" in fig.axes[0].get_title()
    _png_ok(fig, tmp_path / "heat.png")
    _png_ok(token_expert_heatmap(torch.ones(6, 6)), tmp_path / "tok.png")
    fig = rollout_error_curve({"dr_pdb": [0.01, 0.02], "swe_pdb": [0.005, 0.007, 0.01]})
    assert fig.axes[0].get_yscale() == "log"
    _png_ok(fig, tmp_path / "roll.png")
    with pytest.raises(ValueError, match="pred"):
        prediction_panels(np.zeros((4, 4, 1)), np.zeros((4, 4, 2)), ["u"], "")


# ---------------------------------------------------------------- tools
def _two_runs(store: str, experiment: str) -> list[str]:
    ids = []
    for name, preset, l2re, sps in (("nestor", "nestor-ti", 0.031, 3.2), ("afno", "afno-ti", 0.048, 8.3)):
        t = Tracker(_cfg(store, experiment, system_metrics=False), rank=0, entry="pretrain", run_name=name)
        t.log_params({"preset": preset, "config": {"preset": preset}})  # as the engine logs it
        t.log_metrics({"train/loss": 0.1, "eval/dr_pdb/l2re_1step": l2re, "perf/samples_per_s": sps}, 100)
        if name == "nestor":  # lineage of a dataset whose manifest is not at hand: digest from path and weight
            from nestor_ds.tracking.datasets import describe

            t.log_inputs([describe({"name": "dr_pdb", "path": "/nowhere/dr_pdb", "weight": 1.0}, "training")])
        ids.append(t.run_id)
        t.finish()
    return ids


def test_mlflow_report_prints_runs_side_by_side(store, capsys):
    from nestor_ds.tracking import compare as mlflow_report

    ids = _two_runs(store, "report")
    assert mlflow_report.main(["--tracking-uri", store, "--experiment", "report", "--metrics", "train/lr"]) == 0
    out = capsys.readouterr().out
    for expected in [i[:12] for i in ids] + [
        "nestor",
        "afno",
        "nestor-ti",
        "afno-ti",
        "0.031",
        "0.048",
        "8.3",
        "eval/dr_pdb/l2re_1step",
        "train/lr",
    ]:
        assert expected in out, out
    assert mlflow_report.main(["--tracking-uri", store, "--experiment", "no-such"]) == 2
    assert "no-such" in capsys.readouterr().err
    # by run name (newest of that name) and by id, in the order given; the dataset block names the data used
    from nestor_ds.tracking.datasets import digest

    assert (
        mlflow_report.main(["--tracking-uri", store, "--experiment", "report", "--run", "afno", "--run", ids[0]]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[2:] == [ids[1][:12], ids[0][:12]]
    data_row = next(line for line in lines if line.startswith("data/dr_pdb"))
    assert data_row.split()[1:] == ["-", "train", digest(None, 1.0, "/nowhere/dr_pdb")[:8]]
    assert (
        mlflow_report.main(["--tracking-uri", store, "--experiment", "report", "--filter", "params.preset = 'afno-ti'"])
        == 0
    )
    out = capsys.readouterr().out
    assert ids[1][:12] in out and ids[0][:12] not in out
    assert mlflow_report.main(["--tracking-uri", store, "--experiment", "report", "--run", "no-such-run"]) == 2
    assert "no-such-run" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian chromium")
@pytest.mark.parametrize("view", ["run", "compare"])
def test_screenshot_of_a_run_page(store, tmp_path, view):
    run_ids = _two_runs(store, f"screenshot-{view}")
    out = tmp_path / "run.png"
    runs = [a for r in (run_ids if view == "compare" else run_ids[:1]) for a in ("--run", r)]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.screenshot_mlflow",
            *runs,
            "--out",
            str(out),
            "--tracking-uri",
            store,
            "--render-ms",
            "3000",
            "--browser-timeout",
            "180",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert ("compare-runs" in res.stdout) == (view == "compare")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert matplotlib.image.imread(out).shape[:2] == (1200, 1600)


def test_screenshot_ends_a_hung_browser_and_retries(tmp_path, capsys):
    """Headless Chromium can hang before or after writing its screenshot; a stand-in browser does both: the first
    run hangs with nothing written, the second writes the PNG and then hangs. The tool must end both and succeed."""
    from tools.screenshot_mlflow import screenshot

    png = tmp_path / "real.png"
    matplotlib.image.imsave(png, np.zeros((4, 6, 3), dtype=np.uint8))
    browser = tmp_path / "browser.sh"
    browser.write_text(
        "#!/bin/sh\n"
        f"if [ -e {tmp_path}/ran ]; then\n"
        '  for a in "$@"; do case "$a" in --screenshot=*) cp ' + str(png) + ' "${a#--screenshot=}";; esac; done\n'
        "fi\n"
        f"touch {tmp_path}/ran\n"
        "exec sleep 600\n"
    )
    browser.chmod(0o755)
    out = tmp_path / "shot.png"
    out.write_bytes(b"an older file")
    screenshot(str(browser), "http://127.0.0.1:9/", out, "6,4", render_ms=0, timeout_s=3, attempts=2)
    written = out.read_bytes()
    assert written == png.read_bytes()
    assert "attempt 1: no screenshot within 3 s" in capsys.readouterr().err
    # a browser that never writes fails with every attempt named, and leaves the earlier file alone
    (tmp_path / "ran").unlink()
    png.unlink()
    with pytest.raises(RuntimeError, match="attempt 1: .*attempt 2: "):
        screenshot(str(browser), "http://127.0.0.1:9/", out, "6,4", render_ms=0, timeout_s=2, attempts=2)
    assert out.read_bytes() == written
    assert not list(tmp_path.glob(".shot.png.part"))


def test_resume_with_unreachable_store_keeps_the_run_id(caplog):
    """Checkpoints written while the store is down at a resume must still name the run, or the next resume
    would open a new MLflow run."""
    caplog.set_level(logging.WARNING, logger="nestor_ds.tracking")
    t = Tracker(
        TrackingConfig(tracking_uri="http://127.0.0.1:9", system_metrics=False),
        rank=0,
        entry="pretrain",
        resume_run_id="0123456789abcdef0123456789abcdef",
    )
    assert t.run_id == "0123456789abcdef0123456789abcdef" and not t.active
    t.log_metrics({"train/loss": 1.0}, 5)  # no-op, no request
    t.finish()
    assert t.run_id == "0123456789abcdef0123456789abcdef"
    warnings = [r.getMessage() for r in caplog.records if r.name == "nestor_ds.tracking"]
    assert len(warnings) == 1 and "re-opens it" in warnings[0]


# ---------------------------------------------------------------- outage buffer, credentials, pipe: notice
# (removed in cb12ba8 with an unrelated change; docs/reliability.md cites them)
def test_buffer_left_by_an_earlier_process_is_sent_first_and_not_relogged(store, tmp_path):
    """A journal written during an outage by a process that then ended is delivered by the resumed run."""
    first = Tracker(_cfg(store, "leftover", system_metrics=False), rank=0, entry="pretrain")
    run_id = first.run_id
    first.log_metrics({"train/loss": 3.0}, 1)
    first.finish("KILLED")
    buffer = tmp_path / "mlflow_buffer"
    buffer.mkdir()
    now = int(time.time() * 1000)
    pending = [
        {"op": "metrics", "run": run_id, "rows": [["train/loss", 2.0, now, 2], ["train/loss", 1.5, now, 3]]},
        {"op": "tags", "run": run_id, "tags": {"nestor.note": "sent late"}},
    ]
    (buffer / "pending.jsonl").write_text("".join(json.dumps(e) + "\n" for e in pending) + '{"op": "metr')  # cut line
    again = Tracker(
        _cfg(store, "leftover", system_metrics=False),
        rank=0,
        entry="pretrain",
        resume_run_id=run_id,
        buffer_dir=buffer,
    )
    for step in (2, 3, 4):  # a resume from step 1 redoes 2 and 3: they are in the buffer already
        again.log_metrics({"train/loss": 10.0 + step}, step)
    again.finish()
    client = MlflowClient(store)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert history == [(1, 3.0), (2, 2.0), (3, 1.5), (4, 14.0)]
    run = client.get_run(run_id)
    assert run.data.tags["nestor.note"] == "sent late" and run.info.status == "FINISHED"
    assert not (buffer / "pending.jsonl").exists()


PRESIGNED = (
    "https://b.s3.amazonaws.com/ns/train-000000.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20261130%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261130T000000Z"
    "&X-Amz-Expires=3600&X-Amz-Security-Token=FQoGZXIvYXdzEXAMPLE&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=0123456789abcdef"
)


def test_credentials_are_masked_everywhere(store, tmp_path, caplog):
    """user:pass@, presigned-URL query tokens, Authorization/Bearer headers of pipe: commands and *SECRET* / *TOKEN*
    / *PASSWORD* assignments: masked in the config printout, warnings, MLflow params (and params.json) and tags.
    (A real run's every sink, nestor_config.json and exports included: tests/test_security.py.)"""
    from nestor_ds.config import RunConfig, format_config
    from nestor_ds.redact import mask_secrets, redact

    assert mask_secrets("http://alice:pw@host:5000/x") == "http://***@host:5000/x"
    assert mask_secrets("see https://tok@h and s3://b/k") == "see https://***@h and s3://b/k"
    assert redact({"a": ["http://u:p@h"], "b": 1}) == {"a": ["http://***@h"], "b": 1}
    assert mask_secrets(PRESIGNED) == (
        "https://b.s3.amazonaws.com/ns/train-000000.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
        "&X-Amz-Date=20261130T000000Z&X-Amz-Expires=3600&X-Amz-Security-Token=***&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=***"
    )
    assert mask_secrets("https://a.blob.core.windows.net/c/x.tar?sv=2022&sp=r&sig=AbC%3D") == (
        "https://a.blob.core.windows.net/c/x.tar?sv=2022&sp=r&sig=***"
    )
    assert mask_secrets("https://h/x.tar?token=t0k&access_token=a1&page=2") == (
        "https://h/x.tar?token=***&access_token=***&page=2"
    )
    assert mask_secrets("pipe:curl -s -H 'Authorization: Bearer abc123' https://h/x.tar") == (
        "pipe:curl -s -H 'Authorization: ***' https://h/x.tar"
    )
    assert mask_secrets('pipe:curl -H "X-Api-Key: k3y" https://h/x') == 'pipe:curl -H "X-Api-Key: ***" https://h/x'
    assert mask_secrets("wget --password=pw1 x; echo Bearer abc.def") == "wget --password=*** x; echo Bearer ***"
    assert (
        mask_secrets(
            "pipe:AWS_SECRET_ACCESS_KEY=s3cr3t AWS_SESSION_TOKEN='t o k' DB_PASSWORD=\"p w\" aws s3 cp s3://b/x -"
        )
        == "pipe:AWS_SECRET_ACCESS_KEY=*** AWS_SESSION_TOKEN=*** DB_PASSWORD=*** aws s3 cp s3://b/x -"
    )
    # names that merely contain "token" stay readable (loss weights, model sizes)
    assert (
        mask_secrets("--set loss.token_lb=0.01 tokens_per_sample=16") == "--set loss.token_lb=0.01 tokens_per_sample=16"
    )
    assert redact({"aws_secret_access_key": "s3cr3t", "token_lb": 0.01}) == {
        "aws_secret_access_key": "***",
        "token_lb": 0.01,
    }

    cfg = RunConfig()
    cfg.tracking.tracking_uri = "http://alice:hunter2@127.0.0.1:9"
    cfg.data.datasets = [
        {"name": "ds", "path": PRESIGNED, "manifest": "pipe:curl -H 'Authorization: Bearer b3arer' https://h/m.json"}
    ]
    printed = format_config(cfg)
    assert "http://***@127.0.0.1:9" in printed and "X-Amz-Signature=***" in printed and "Authorization: ***" in printed
    assert not any(s in printed for s in ("hunter2", "0123456789abcdef", "FQoGZXIv", "b3arer"))
    caplog.set_level(logging.WARNING, logger="nestor_ds.tracking")
    t = Tracker(TrackingConfig(tracking_uri="http://alice:hunter2@127.0.0.1:9"), rank=0, entry="pretrain")
    assert t.run_id is None  # unreachable: one warning, and it names the masked URI
    assert all("hunter2" not in r.getMessage() for r in caplog.records)
    assert any("http://***@127.0.0.1:9" in r.getMessage() for r in caplog.records)
    t = Tracker(_cfg(store, "masked", system_metrics=False), rank=0, entry="pretrain")
    t.log_params({"tracking": {"tracking_uri": "http://bob:pw9@h:1"}, "data": {"path": PRESIGNED}})
    t.set_tags(
        {"source": "https://bob:pw9@h/data", "cmd": "pipe:GITHUB_TOKEN=ghp_x1 curl -H 'Authorization: Bearer b3'"}
    )
    run_id = t.run_id
    t.finish()
    run = MlflowClient(store).get_run(run_id)
    assert run.data.params["tracking.tracking_uri"] == "http://***@h:1"
    assert run.data.params["data.path"] == mask_secrets(PRESIGNED) != PRESIGNED
    assert run.data.tags["source"] == "https://***@h/data"
    assert run.data.tags["cmd"] == "pipe:GITHUB_TOKEN=*** curl -H 'Authorization: ***'"
    params = json.loads(_download(MlflowClient(store), run_id, "params.json", tmp_path).read_text())
    assert "pw9" not in json.dumps(params) and "0123456789abcdef" not in json.dumps(params)


def test_pipe_url_names_its_command_once(tiny_shards, caplog):
    """A pipe: URL runs a shell command: one warning line per command and process, naming it (masked)."""
    from nestor_ds.shards.urls import read_manifest_at

    _, shards = tiny_shards
    caplog.set_level(logging.WARNING, logger="nestor_ds.data")
    manifest = shards["ns_tiny"] / "manifest.json"
    location = f"pipe:MY_TOKEN=t0k3n cat {manifest}"
    for _ in range(2):
        assert read_manifest_at(location)["name"] == "ns_tiny"
    notices = [r.getMessage() for r in caplog.records if "pipe: URL runs" in r.getMessage()]
    assert notices == [f"data: a pipe: URL runs this shell command: MY_TOKEN=*** cat {manifest}"]
