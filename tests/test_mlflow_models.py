"""Dataset lineage, logged / registered pyfunc models and `mlflow models serve`, on real runs and stores.

One module fixture pre-trains a tiny NESTOR (1 rank, 4 steps) that registers its model, and fine-tunes it
(2 steps, another registered name). The tests read the SQLite store back with MLflow's own client, load the
registered models with `mlflow.pyfunc.load_model` and serve one with `mlflow models serve`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from mlflow_procs import MLFLOW, free_port, start, stop, wait_http
from train_fixtures import ds_config, launch, tiny_config

pytestmark = pytest.mark.timeout(900)
PRETRAIN_NAME, FINETUNE_NAME = "nestor-tiny-test", "nestor-tiny-test-ft"


@dataclass
class Trained:
    work: Path
    uri: str
    shards: dict[str, Path]
    pretrain: object  # mlflow Run
    finetune: object


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-5000:]}"


def _run(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name("nestor-ds")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == name]
    assert len(runs) == 1, name
    return runs[0]


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory) -> Trained:
    _, shards = tiny_shards
    work = tmp_path_factory.mktemp("models")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    ds = ds_config(work, stage=2)
    cfg = tiny_config(
        work,
        shards,
        tracking={"tracking_uri": uri, "log_model": True, "register_model": PRETRAIN_NAME},
        train={"max_steps": 4, "ckpt_every": 4},
    )
    _ok(launch(["nestor_ds.train", "--ds_config", str(ds), "--config", str(cfg), "--run-name", "pre"], 1, cwd=work))
    ft = yaml.safe_load(
        tiny_config(
            work,
            {"ns_tiny": shards["ns_tiny"]},
            data={"channels": 1},
            tracking={"tracking_uri": uri, "log_model": True, "register_model": FINETUNE_NAME},
            train={"max_steps": 2, "ckpt_every": 2},
        ).read_text()
    )
    ft["model"] = {"moe": {"backend": "local"}}  # architecture from the checkpoint
    (work / "ft.yaml").write_text(yaml.safe_dump(ft))
    _ok(
        launch(
            [
                "nestor_ds.finetune",
                "--ds_config",
                str(ds),
                "--config",
                str(work / "ft.yaml"),
                "--pretrained",
                str(work / "runs" / "pre" / "checkpoints"),
                "--run-name",
                "ft",
            ],
            1,
            cwd=work,
        )
    )
    client = MlflowClient(uri)
    return Trained(work, uri, shards, _run(client, "pre"), _run(client, "ft"))


def _inputs(run) -> dict[tuple[str, str], object]:
    return {
        (d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"]): d.dataset
        for d in run.inputs.dataset_inputs
    }


def test_runs_log_their_datasets_with_manifest_digests(trained):
    from nestor_ds.data import DatasetSpec
    from nestor_ds.tracking.datasets import describe

    pre = _inputs(trained.pretrain)
    assert set(pre) == {("ns_tiny", "training"), ("dr_tiny", "training")}
    ns = pre[("ns_tiny", "training")]
    profile = json.loads(ns.profile)
    assert profile["weight"] == 1.0 and profile["sources"] == ["ns_tiny.h5"] and profile["trajectories"]["train"] > 0
    assert json.loads(ns.source)["uri"] == str(trained.shards["ns_tiny"].resolve())
    spec = DatasetSpec(name="ns_tiny", path=str(trained.shards["ns_tiny"]))
    assert describe(spec, "training")["digest"] == ns.digest  # same bytes, same weight: same digest
    assert (
        describe(DatasetSpec(name="ns_tiny", path=str(trained.shards["ns_tiny"]), weight=2.0), "training")["digest"]
        != ns.digest
    )
    assert pre[("dr_tiny", "training")].digest != ns.digest
    # the fine-tune shows its own data and its parent's, with the parent's digests; ns_tiny is in both (same
    # shards, same weight: one MLflow dataset, so one input carrying both contexts)
    ft = _inputs(trained.finetune)
    assert set(ft) == {("ns_tiny", "training+pretraining"), ("dr_tiny", "pretraining")}
    assert ft[("dr_tiny", "pretraining")].digest == pre[("dr_tiny", "training")].digest


def test_models_are_logged_and_registered_with_eval_tags(trained):
    client = MlflowClient(trained.uri)
    for run, name in ((trained.pretrain, PRETRAIN_NAME), (trained.finetune, FINETUNE_NAME)):
        assert run.info.status == "FINISHED"
        assert run.outputs.model_outputs, f"{name}: no logged model on the run"
        version = client.get_model_version(name, "1")
        assert version.run_id == run.info.run_id
        eval_keys = [k for k in run.data.metrics if k.startswith("eval/") and k.endswith("l2re_1step")]
        assert eval_keys
        for key in eval_keys:
            assert float(version.tags[key]) == pytest.approx(run.data.metrics[key], rel=1e-5)
    import mlflow

    mlflow.set_tracking_uri(trained.uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{PRETRAIN_NAME}/1", dst_path=str(trained.work / "m")))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc.get("model_code_path"), pyfunc  # models from code: no pickled python_model
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("*.pickle"))
    assert (local / "artifacts" / "model.safetensors").is_file()
    reqs = (local / "requirements.txt").read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in reqs
    sig = mlmodel["signature"]
    assert "channel_mask" in sig["inputs"] and "steps" in sig["params"]


def _example(seed: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((2, 16, 16, 4, channels)).astype(np.float32)
    return x, np.ones((2, channels), np.float32)


@pytest.mark.parametrize("name, weights", [(PRETRAIN_NAME, "pre"), (FINETUNE_NAME, "ft")])
def test_registered_pyfunc_predicts_the_rollout(trained, name, weights):
    import mlflow

    from nestor_ds.checkpoint.load import load_pretrained

    mlflow.set_tracking_uri(trained.uri)
    model = load_pretrained(trained.work / "runs" / weights / "model.safetensors")
    x, mask = _example(0, model.cfg.in_channels)
    want = model.rollout(torch.from_numpy(x), 3, torch.from_numpy(mask)).detach().numpy()
    got = mlflow.pyfunc.load_model(f"models:/{name}/1").predict({"x": x, "channel_mask": mask}, params={"steps": 3})
    assert got.shape == want.shape == (2, 16, 16, 3, model.cfg.in_channels)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


SERVE_WITHOUT_CHECKOUT = """
import json, sys
# the package may be installed in this environment (`pip install -e .` of requirements.txt): take its finder away, as
# on a machine that has only MLflow and the model
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "") + repr(f)]
import numpy as np
import mlflow.pyfunc
try:
    import nestor_ds
    sys.exit(f"nestor_ds importable before loading the model: {nestor_ds.__file__}")
except ImportError:
    pass
model = mlflow.pyfunc.load_model(sys.argv[1])
example = np.load(sys.argv[2])
out = model.predict({"x": example["x"], "channel_mask": example["mask"]}, params={"steps": 2})
np.save(sys.argv[3], out)
import nestor_ds
print(json.dumps({"nestor_ds": nestor_ds.__file__}))
"""


def test_pyfunc_model_serves_without_our_code_checked_out(trained, tmp_path):
    """The logged model carries its code: a fresh interpreter with no PYTHONPATH (``-I``: no environment, no
    working directory on sys.path), run outside the repository, loads and predicts with the nestor_ds package
    copied into the model's own code directory."""
    import mlflow

    from nestor_ds.checkpoint.load import load_pretrained

    mlflow.set_tracking_uri(trained.uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{PRETRAIN_NAME}/1", dst_path=str(tmp_path / "m")))
    model = load_pretrained(trained.work / "runs" / "pre" / "model.safetensors")
    x, mask = _example(2, model.cfg.in_channels)
    want = model.rollout(torch.from_numpy(x), 2, torch.from_numpy(mask)).detach().numpy()
    np.savez(tmp_path / "example.npz", x=x, mask=mask)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    res = subprocess.run(
        [sys.executable, "-I", "-c", SERVE_WITHOUT_CHECKOUT, str(local), "example.npz", "out.npy"],
        cwd=tmp_path,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    served_from = Path(json.loads(res.stdout.strip().splitlines()[-1])["nestor_ds"]).resolve()
    assert served_from.is_relative_to(local.resolve() / "code"), served_from
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, atol=1e-6, rtol=0)


def test_mlflow_models_serve_answers_with_the_rollout(trained):
    from nestor_ds.checkpoint.load import load_pretrained

    model = load_pretrained(trained.work / "runs" / "pre" / "model.safetensors")
    x, mask = _example(1, model.cfg.in_channels)
    want = model.rollout(torch.from_numpy(x), 2, torch.from_numpy(mask)).detach().numpy()
    port = free_port()
    log = trained.work / "serve.log"
    proc = start(
        [
            MLFLOW,
            "models",
            "serve",
            "-m",
            f"models:/{PRETRAIN_NAME}/1",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        log,
        env={"MLFLOW_TRACKING_URI": trained.uri},
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, 300, log)
        body = json.dumps({"inputs": {"x": x.tolist(), "channel_mask": mask.tolist()}, "params": {"steps": 2}})
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            got = np.asarray(json.loads(r.read())["predictions"], dtype=np.float32)
    finally:
        stop(proc)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_export_register_attaches_to_the_training_run(trained):
    out = trained.work / "cli.safetensors"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "nestor_ds.tracking.register",
            "--checkpoint",
            str(trained.work / "runs" / "pre" / "checkpoints"),
            "--out",
            str(out),
            "--no-progress",
            "--name",
            "nestor-cli",
            "--tracking-uri",
            trained.uri,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "registered models:/nestor-cli/1" in res.stdout
    version = MlflowClient(trained.uri).get_model_version("nestor-cli", "1")
    assert version.run_id == trained.pretrain.info.run_id
    assert any(k.startswith("eval/") for k in version.tags)
