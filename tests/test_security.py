"""A model file from someone else runs no command and fetches nothing; credentials reach no log, MLflow parameter
or tag, saved config or export.

A crafted export holds a real tiny model whose saved run config names its training data as a `pipe:` command
(that would create a trap file) and as http URLs (served by a local listener that counts requests). The tools
that read a model's own training data, and a real fine-tune from that export, must open neither. The fine-tune's
own data is a `pipe:` dataset whose commands carry an AWS secret and a bearer header: the user's own config may
run commands, but their secrets must not reach any sink.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from train_fixtures import ds_config, launch, tiny_config

pytestmark = pytest.mark.timeout(900)
SECRETS = ("hunter2-aws", "b3arer-tok", "s1gnature")  # every value the fine-tune's own config hides


@pytest.fixture(scope="module")
def listener():
    """(base URL, request paths seen) of an HTTP server on 127.0.0.1 that answers 404 to everything."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.path)
            self.send_response(404)
            self.end_headers()

        def do_POST(self):  # noqa: N802 - an MLflow client creates runs with POST
            self.do_GET()

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def crafted_export(root: Path, shards: dict[str, Path], url: str, first: str = "pipe") -> tuple[Path, Path]:
    """(export, trap file): a real tiny model whose saved datasets are a `pipe:` command that creates the trap
    file (then serves real shards, so a run that executes it would go on unnoticed) and http URLs of `url`, and
    whose saved tracking URI is `url` too."""
    import torch

    from nestor_ds.checkpoint.export import save_safetensors
    from nestor_ds.config import load_config
    from nestor_ds.model import build_model

    trap = root / "PWNED"
    ns, dr = shards["ns_tiny"], shards["dr_tiny"]
    cfg = load_config(tiny_config(root, shards))
    saved = cfg.to_dict()
    pipe = {
        "name": "evil_pipe",
        "path": f"pipe:touch {trap}; cat {ns}/train-000000.tar",
        "manifest": f"pipe:touch {trap}; cat {ns}/manifest.json",
        "weight": 1.0,
        "rollout_steps": 3,
    }
    http = {"name": "evil_url", "path": f"{url}/dr/train-000000.tar", "weight": 1.0, "rollout_steps": 3}
    local_url_manifest = {"name": "dr_tiny", "path": str(dr), "manifest": f"{url}/dr/manifest.json"}
    saved["data"]["datasets"] = {
        "pipe": [pipe, http, local_url_manifest],
        "url": [http, pipe, local_url_manifest],
        "manifest": [local_url_manifest, pipe, http],
    }[first]
    saved["tracking"]["tracking_uri"] = url
    torch.manual_seed(0)
    out = save_safetensors(build_model(cfg.model).state_dict(), saved, root / f"crafted-{first}.safetensors")
    return out, trap


@pytest.mark.parametrize(
    "tool, first",
    [
        ("routing_profile", "pipe"),
        ("routing_profile", "url"),
        ("routing_profile", "manifest"),
        ("place_experts", "pipe"),
    ],
)
def test_tools_refuse_the_data_a_crafted_export_names(tiny_shards, tmp_path, listener, tool, first):
    """Without --data the tools read the model's saved datasets: a saved pipe: or URL is refused in one line
    naming --data, before anything runs or is fetched."""
    import importlib

    _, shards = tiny_shards
    url, seen = listener
    export, trap = crafted_export(tmp_path, shards, url, first)
    main = importlib.import_module(
        {"routing_profile": "nestor_ds.routing.profile", "place_experts": "nestor_ds.routing.place"}[tool]
    ).main
    extra = ["--ep", "2", "--out", str(tmp_path / "placed.safetensors")] if tool == "place_experts" else []
    with pytest.raises(SystemExit) as refused:
        main(["--checkpoint", str(export), "--steps", "2", "--ranks", "2", "--micro-batch", "2", *extra])
    message = str(refused.value.code)
    assert "\n" not in message and "pass --data" in message and f"saved in {export}" in message, message
    assert {"pipe": "evil_pipe", "url": "evil_url", "manifest": "dr_tiny"}[first] in message
    assert not trap.exists(), "a command from the export ran"
    assert seen == [], f"fetched from a URL the export named: {seen}"
    assert not (tmp_path / "placed.safetensors").exists()
    # the user's own --data is what the tools read instead
    assert main(["--checkpoint", str(export), "--data", str(shards["ns_tiny"]), str(shards["dr_tiny"]), "--steps",
                 "2", "--ranks", "2", "--micro-batch", "2", *extra]) == 0  # fmt: skip
    assert not trap.exists() and seen == []


def test_evaluating_a_crafted_export_contacts_no_server_it_names(tiny_shards, tmp_path, listener):
    """`python -m nestor_ds.evaluate` on someone else's export logs to this machine's store (flag, environment, else
    the local default), not to the tracking server the export names, and reads only the data given to it."""
    import os
    import subprocess
    import sys

    _, shards = tiny_shards
    url, seen = listener
    export, trap = crafted_export(tmp_path, shards, url)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    args = ["--checkpoint", str(export), "--data", str(shards["ns_tiny"]), "--max-trajectories", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "nestor_ds.evaluate", *args, "--out", "report.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert seen == [], f"contacted the server the export named: {seen}"
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "report.json").is_file()
    assert not trap.exists()


@pytest.fixture(scope="module")
def finetuned(tiny_shards, tmp_path_factory, listener):
    """A real 1-rank fine-tune (2 steps, model logged) from the crafted export, on a user's own pipe: dataset whose
    commands carry secrets. Returns (work dir, export, trap, completed process, MLflow URI, fine-tune's own paths)."""
    _, shards = tiny_shards
    url, _ = listener
    work = tmp_path_factory.mktemp("security")
    export, trap = crafted_export(work, shards, url)
    ns = shards["ns_tiny"]
    own = {
        "train": f"pipe:AWS_SECRET_ACCESS_KEY=hunter2-aws cat {ns}/train-000000.tar",
        "test": f"pipe:AWS_SECRET_ACCESS_KEY=hunter2-aws cat {ns}/test-000000.tar",
    }
    manifest = f"pipe:cat {ns}/manifest.json # curl -H 'Authorization: Bearer b3arer-tok' https://h/m?X-Amz-Signature=s1gnature"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = yaml.safe_load(
        tiny_config(
            work,
            {},
            data={"channels": 1},
            tracking={"tracking_uri": uri, "log_model": True},
            train={"max_steps": 2, "ckpt_every": 2},
        ).read_text()
    )
    cfg["data"]["datasets"] = [{"name": "ns_own", "path": own, "manifest": manifest, "rollout_steps": 3}]
    cfg["model"] = {"moe": {"backend": "local"}}  # the architecture comes from the export
    (work / "ft.yaml").write_text(yaml.safe_dump(cfg))
    args = ["nestor_ds.finetune", "--ds_config", str(ds_config(work)), "--config", str(work / "ft.yaml")]
    proc = launch([*args, "--pretrained", str(export), "--run-name", "ft"], 1, cwd=work)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return work, export, trap, proc, uri, own


def _run(uri: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("nestor-ds").experiment_id])
    return client, run


def test_fine_tuning_from_a_crafted_export_runs_and_fetches_nothing(finetuned, listener):
    """The parent's saved pipe: command and URLs are recorded as text in the lineage, never run or fetched; the
    parent's local shard directory (with a URL manifest) is recorded as text too."""
    work, export, trap, proc, uri, _ = finetuned
    assert not trap.exists(), "a command from the export ran"
    assert listener[1] == [], f"fetched from a URL the export named: {listener[1]}"
    _, run = _run(uri)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    saved = json.loads(Path(export).with_suffix(".json").read_text())["data"]["datasets"]
    for entry in saved:
        d = inputs[entry["name"]]
        assert {t.key: t.value for t in d.tags}["mlflow.data.context"] == "pretraining"
        local = not entry["path"].startswith(("pipe:", "http://"))
        assert json.loads(d.dataset.source) == ({"uri": entry["path"]} if local else {"url": entry["path"]})
        profile = json.loads(d.dataset.profile)
        assert profile["manifest"].startswith(f"not opened: named by {export}"), profile
    own = inputs["ns_own"]
    assert json.loads(own.dataset.profile)["trajectories"] == {"train": 4, "test": 2}  # the user's pipe: ran


def test_credentials_never_reach_logs_params_configs_or_exports(finetuned, tmp_path):
    """The fine-tune's own data commands carry an AWS secret, a bearer header and a presigned signature: the config
    printout, the one-line pipe: notice, MLflow params, tags, dataset inputs and artifacts (params.json, the model's
    run_config.json), nestor_config.json beside the checkpoint, and the export (metadata and .json) show ***."""
    work, _, _, proc, uri, own = finetuned
    logs = proc.stdout + proc.stderr
    notices = [line for line in logs.splitlines() if "a pipe: URL runs this shell command" in line]
    assert any(line.endswith(f"AWS_SECRET_ACCESS_KEY=*** cat {own['train'].split(' cat ')[1]}") for line in notices)
    assert "resolved configuration" in logs and "Authorization: ***" in logs
    client, run = _run(uri)
    sinks = {
        "logs": logs,
        "params": json.dumps(run.data.params),
        "tags": json.dumps(run.data.tags),
        "inputs": json.dumps([(d.dataset.source, d.dataset.profile) for d in run.inputs.dataset_inputs]),
    }
    for artifact in ("params.json",):
        sinks[artifact] = Path(client.download_artifacts(run.info.run_id, artifact, str(tmp_path))).read_text()
    ckpts = sorted((work / "runs" / "ft" / "checkpoints").glob("*/nestor_config.json"))
    assert ckpts
    sinks.update({str(p): p.read_text() for p in ckpts})
    export = work / "runs" / "ft" / "model.safetensors"
    sinks["export"] = export.read_bytes().decode("latin-1")  # safetensors metadata is a JSON header
    sinks["export.json"] = export.with_suffix(".json").read_text()
    import mlflow

    mlflow.set_tracking_uri(uri)
    assert "model not logged" not in logs and run.outputs.model_outputs, logs[-3000:]
    model_id = run.outputs.model_outputs[0].model_id
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / "model")))
    sinks["model run_config.json"] = (local / "artifacts" / "run_config.json").read_text()
    assert "AWS_SECRET_ACCESS_KEY=***" in sinks["params"] and "X-Amz-Signature=***" in sinks["export.json"]
    for where, text in sinks.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret} reached {where}"
