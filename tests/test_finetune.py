"""Fine-tuning and the evaluation CLI end to end: real shards, real DeepSpeed checkpoints, real MLflow stores.

Every test reuses the session's shared pre-training (tests/conftest.py ``pretrain_ep2``: a tiny NESTOR on 2 CPU
ranks, DeepSpeed MoE ep_size 2, ZeRO-2, both tiny datasets with 2 channels). The fine-tunes then change what a
checkpoint must survive: world size and ep_size (2/2 -> 1/1 local backend), channel count (2 -> 1), and the source
format (DeepSpeed checkpoint root vs. the safetensors export).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from train_fixtures import REPO, ds_config, launch, tiny_config

TRAIN = "nestor_ds.train"  # run as a module (tests/conftest.py puts the repository on PYTHONPATH)
FINETUNE = "nestor_ds.finetune"
EXPORT = "nestor_ds.checkpoint"
pytestmark = pytest.mark.timeout(1200)

LOADED_RE = re.compile(
    r"pre-trained weights: (\d+) tensors loaded, (\d+) re-initialised \(shape changed\), "
    r"(\d+) freshly initialised \(not selected\), (\d+) unused"
)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _run_by_name(uri: str, name: str):
    client = _client(uri)
    exp = client.get_experiment_by_name("nestor-ds")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == name]
    assert len(runs) == 1, f"expected one MLflow run named {name!r}, found {len(runs)}"
    return runs[0]


def _artifacts(run) -> Path:
    return Path(run.info.artifact_uri.replace("file://", ""))


@dataclass
class Pretrained:
    work: Path
    shards: dict[str, Path]
    ckpt_root: Path
    uri: str  # the MLflow store of the pre-training
    ft_uri: str  # the fine-tunes' store (tiny_config's in `work`)
    run_id: str  # the pre-training's MLflow run
    ds: Path  # ZeRO-2 DeepSpeed JSON, micro-batch 2


def finetune_config(p: Pretrained, name: str, backend: str, train: dict) -> Path:
    """A fine-tune YAML on ns_tiny (1 channel); the model section only picks the MoE backend, so the
    architecture comes from the checkpoint. The authors' fine-tune aux-loss weights, no input noise."""
    path = tiny_config(
        p.work,
        {"ns_tiny": p.shards["ns_tiny"]},
        data={"channels": 1},
        loss={"image_lb_weight": 1e-2, "token_lb_weight": 5e-3},
        train={"input_noise": 0.0, "log_every": 5, **train},
    )
    cfg = yaml.safe_load(path.read_text())
    cfg["model"] = {"moe": {"backend": backend}}
    out = p.work / f"finetune_{name}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.fixture(scope="module")
def pretrained(tiny_shards, pretrain_ep2, tmp_path_factory) -> Pretrained:
    """The session's shared pre-training (tests/conftest.py: both tiny datasets, 2 channels, DeepSpeed MoE ep_size 2
    over 2 ranks, ZeRO-2, 20 steps, MLflow on), read only; the fine-tunes work and log in this module's directory."""
    _, shards = tiny_shards
    _ok(pretrain_ep2)
    work = tmp_path_factory.mktemp("finetune")
    run = _run_by_name(pretrain_ep2.uri, "pre")
    return Pretrained(
        work=work,
        shards=shards,
        ckpt_root=pretrain_ep2.run_dir / "checkpoints",
        uri=pretrain_ep2.uri,
        ft_uri=f"sqlite:///{work / 'mlflow.db'}",
        run_id=run.info.run_id,
        ds=ds_config(work),
    )


def _finetune(p: Pretrained, cfg: Path, source: Path, name: str, *extra: str, ranks: int):
    """`python -m nestor_ds.finetune` from `source` (checkpoint root or export) as run `name`."""
    args = ["--ds_config", str(p.ds), "--config", str(cfg), "--pretrained", str(source), "--run-name", name, *extra]
    return launch([FINETUNE, *args], ranks=ranks, cwd=p.work)


@pytest.fixture(scope="module")
def ft_local(pretrained):
    """Fine-tune from the DeepSpeed checkpoint root in ONE plain process (local MoE backend, ep_size 1) on the
    1-channel dataset: another world size, ep_size and channel count than the pre-training."""
    p = pretrained
    cfg = finetune_config(p, "local", "local", train={"max_steps": 40, "ckpt_every": 40})
    return _finetune(p, cfg, p.ckpt_root, "ft-local", ranks=1)


@pytest.fixture(scope="module")
def exported(pretrained) -> Path:
    out = pretrained.work / "pre.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", EXPORT, "--checkpoint", str(pretrained.ckpt_root), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=pretrained.work,
    )
    _ok(proc)
    assert out.is_file() and out.with_suffix(".json").is_file()
    return out


@pytest.fixture(scope="module")
def ft_export(pretrained, exported):
    """Fine-tune from the safetensors export on 2 ranks, expert-parallel token MoE ep_size 2, loading only the blocks
    and freezing routers + embedding; checkpoints at steps 10 and 20 to compare the frozen tensors."""
    p = pretrained
    cfg = finetune_config(p, "export", "local", train={"max_steps": 20, "ckpt_every": 10, "keep_last": 3})
    proc = _finetune(
        p,
        cfg,
        exported,
        "ft-export",
        "--set",
        "model.moe.ep_size=2",
        "--load",
        "blocks",
        "--freeze",
        "routers,embedding",
        ranks=2,
    )
    return proc


# --------------------------------------------------------------------------- pre-training fixture


def test_pretraining_checkpoint_is_expert_parallel(pretrained):
    tag = pretrained.ckpt_root / "step_00000020"
    saved = json.loads((tag / "nestor_config.json").read_text())
    assert saved["ep_size"] == 2 and saved["world_size"] == 2 and saved["model"]["in_channels"] == 2
    assert saved["mlflow_run_id"] == pretrained.run_id
    assert len(list(tag.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 8 * 4  # 8 token MoEs x 4 experts


# --------------------------------------------------------------------------- DeepSpeed checkpoint -> 1 process


def test_finetune_from_deepspeed_checkpoint_on_one_process(pretrained, ft_local):
    _ok(ft_local)
    err = ft_local.stderr
    assert "finetune: world size 1, ep_size 1" in err
    assert f"fine-tuning from {pretrained.ckpt_root / 'step_00000020'}" in err
    m = LOADED_RE.search(err)
    assert m, err[-4000:]
    loaded, reinit, not_selected, unused = map(int, m.groups())
    # load=all: everything fits except the tensors that follow the channel count (2 -> 1)
    assert loaded > 100 and reinit > 0 and not_selected == 0 and unused == 0
    line = next(ln for ln in err.splitlines() if ln.strip().startswith("re-initialised:"))
    assert "encoder.patch_embed" in line and "head.net" in line and "blocks." not in line, line
    assert "fine-tuning: mean one-step L2RE" in err
    run_dir = pretrained.work / "runs" / "ft-local"
    steps = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
    saved = json.loads((run_dir / "checkpoints" / "step_00000040" / "nestor_config.json").read_text())
    assert saved["model"]["in_channels"] == 1 and saved["ep_size"] == 1 and saved["model"]["moe"]["backend"] == "local"


def test_finetune_lowers_l2re_and_links_the_pretraining_run(pretrained, ft_local):
    _ok(ft_local)
    run = _run_by_name(pretrained.ft_uri, "ft-local")
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["nestor.entry"] == "finetune"
    assert tags["nestor.pretrain_run_id"] == pretrained.run_id
    before, after = metrics["eval_before/ns_tiny/l2re_1step"], metrics["eval/ns_tiny/l2re_1step"]
    assert math.isfinite(before) and math.isfinite(after)
    assert after < 0.9 * before, (before, after)
    # the eval JSON artifacts hold the same numbers
    art = _artifacts(run)
    first = json.loads((art / "eval_before_step00000000.json").read_text())
    last = json.loads((art / "eval_step00000040.json").read_text())
    assert first["datasets"]["ns_tiny"]["l2re_1step"] == pytest.approx(before, rel=1e-9)
    assert last["datasets"]["ns_tiny"]["l2re_1step"] == pytest.approx(after, rel=1e-9)
    assert run.data.params["config.loss.image_lb_weight"] == "0.01"
    assert run.data.params["config.loss.token_lb_weight"] == "0.005"
    assert run.data.params["config.train.input_noise"] == "0.0"


# --------------------------------------------------------------------------- export -> 2 ranks, ep_size 2, freeze


def test_finetune_from_export_on_two_ranks_ep2(pretrained, exported, ft_export):
    _ok(ft_export)
    err = ft_export.stderr
    assert "finetune: world size 2, ep_size 2" in err
    assert f"fine-tuning from {exported}" in err
    assert len(LOADED_RE.findall(err)) == 1, "the transfer report comes from rank 0 only"
    loaded, reinit, not_selected, unused = map(int, LOADED_RE.search(err).groups())
    assert loaded > 100 and reinit == 0 and not_selected > 0 and unused == 0
    line = next(ln for ln in err.splitlines() if ln.strip().startswith("not selected:"))
    assert "encoder." in line and "head." in line and "blocks." not in line, line
    assert re.search(r"frozen: \d+ tensors \(routers, embedding\)", err), err[-3000:]
    assert err.count("fine-tuning: mean one-step L2RE") == 1
    tag = pretrained.work / "runs" / "ft-export" / "checkpoints" / "step_00000020"
    saved = json.loads((tag / "nestor_config.json").read_text())
    assert saved["ep_size"] == 2 and saved["world_size"] == 2 and saved["model"]["moe"]["backend"] == "local"
    run = _run_by_name(pretrained.ft_uri, "ft-export")
    assert run.data.tags["nestor.entry"] == "finetune"
    assert run.data.tags["nestor.pretrain_run_id"] == pretrained.run_id  # carried in the export's metadata


def test_frozen_parts_do_not_move(pretrained, exported, ft_export):
    """Routers (loaded) stay equal to the pre-trained export; the embedding (not loaded: fresh init) is frozen
    too, so it is equal at steps 10 and 20; the trainable parts move."""
    _ok(ft_export)
    from safetensors.torch import load_file

    from nestor_ds.checkpoint.export import export_checkpoint

    ckpts = pretrained.work / "runs" / "ft-export" / "checkpoints"
    pre = load_file(str(exported))
    s10 = load_file(str(export_checkpoint(ckpts / "step_00000010", pretrained.work / "ft10.safetensors")))
    s20 = load_file(str(export_checkpoint(ckpts / "step_00000020", pretrained.work / "ft20.safetensors")))
    assert set(s10) == set(s20) == set(pre)

    routers = [n for n in s20 if ".router." in n]  # image routers and token-MoE gates
    embedding = [n for n in s20 if n.startswith("encoder.")]
    assert len(routers) == 2 * 2 + 2 * 4 and embedding  # 2 blocks x (weight, bias) + 8 token gates
    n_frozen = int(re.search(r"frozen: (\d+) tensors", ft_export.stderr).group(1))
    assert n_frozen == len(routers) + len(embedding)
    for n in routers:
        assert (s20[n] == pre[n]).all(), f"frozen router {n} changed from the pre-trained value"
    for n in embedding:
        assert (s20[n] == s10[n]).all(), f"frozen embedding {n} changed between steps 10 and 20"
    assert not (s20["encoder.pos_embed.pos"] == pre["encoder.pos_embed.pos"]).all(), "embedding must not be loaded"
    moved = [n for n in s20 if n not in routers and n not in embedding and not (s20[n] == s10[n]).all()]
    assert any(n.startswith("head.") for n in moved) and any(".shared." in n for n in moved), moved


def test_freeze_parts_match_only_their_parameters(exported):
    """Each --freeze part names exactly its parameters; `shared_afno` is the block-level AFNO expert, not the
    token MoE's shared SwiGLU expert."""
    from nestor_ds.checkpoint.convert import inference_model_config
    from nestor_ds.checkpoint.safe_load import read_safetensors
    from nestor_ds.engine.transfer import freeze
    from nestor_ds.model import build_model

    _, run_cfg = read_safetensors(exported)

    def frozen(part: str) -> tuple[set[str], set[str]]:
        model = build_model(inference_model_config(run_cfg))
        names = set(freeze(model, [part]))
        assert names == {n for n, q in model.named_parameters() if not q.requires_grad}
        return names, {n for n, _ in model.named_parameters()}

    shared, every = frozen("shared_afno")
    assert shared == {n for n in every if re.match(r"blocks\.\d+\.moe\.shared\.\d+\.", n)} and shared
    routers, _ = frozen("routers")
    assert routers == {f"blocks.{b}.moe.router.{w}" for b in (0, 1) for w in ("weight", "bias")} | {
        f"blocks.{b}.moe.experts.{e}.moe.router.gate.weight" for b in (0, 1) for e in range(4)
    }
    embedding, _ = frozen("embedding")
    assert embedding == {n for n in every if n.startswith("encoder.")}
    experts, _ = frozen("experts")
    assert experts == {n for n in every if ".experts." in n} and not experts & shared


# --------------------------------------------------------------------------- evaluation CLI with MLflow


def test_evaluate_cli_reports_and_logs_to_mlflow(pretrained, exported, tmp_path):
    uri = f"sqlite:///{tmp_path / 'eval.db'}"
    out = tmp_path / "r.json"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    data = [str(pretrained.shards["dr_tiny"]), str(pretrained.shards["ns_tiny"])]
    # --windows first: one-step and rollout then score the same windows, so the curve's first step is the one-step
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nestor_ds.evaluate",
            "--checkpoint",
            str(exported),
            "--data",
            *data,
            "--rollout-steps",
            "2",
            "--windows",
            "first",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    _ok(proc)
    report = json.loads(out.read_text())
    bands = report["settings"]["spectrum_bands"]
    assert len(bands) >= 2
    for name, n_channels in (("dr_tiny", 2), ("ns_tiny", 1)):
        r = report["datasets"][name]
        assert r["rollout_steps"] == 2 and len(r["l2re_curve"]) == 2 and len(r["channels"]) == n_channels
        for key in ("l2re_1step", "l2re_rollout"):
            assert 0 < r[key] < 100
            assert set(r[f"{key}_per_channel"]) == set(r["channels"])
        assert r["l2re_curve"][0] == pytest.approx(r["l2re_1step"], rel=1e-6)  # step 1 of the rollout is the one-step
        assert set(r["l2re_curve_per_channel"]) == set(r["channels"])
        for key in ("spectrum_err_1step", "spectrum_err_rollout"):
            assert list(r[key]) == bands and all(math.isfinite(v) and v >= 0 for v in r[key].values())
        assert name in proc.stdout

    client = _client(uri)
    runs = client.search_runs([client.get_experiment_by_name("nestor-ds").experiment_id])
    assert len(runs) == 1, "the evaluation logs to $MLFLOW_TRACKING_URI, not to the training run's store"
    run = runs[0]
    assert run.data.tags["nestor.entry"] == "evaluate"
    assert run.data.tags["nestor.checkpoint_run_id"] == pretrained.run_id
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for name in ("dr_tiny", "ns_tiny"):
        assert m[f"eval/{name}/l2re_1step"] == pytest.approx(report["datasets"][name]["l2re_1step"])
        assert m[f"eval/{name}/l2re_rollout"] == pytest.approx(report["datasets"][name]["l2re_rollout"])
        for band in bands:
            assert f"eval/{name}/spectrum_err_rollout_{band}" in m
        curve = client.get_metric_history(run.info.run_id, f"eval/{name}/l2re_step")
        assert [h.step for h in sorted(curve, key=lambda h: h.step)] == [1, 2]
    assert m["eval/mean/l2re_1step"] == pytest.approx(report["mean"]["l2re_1step"])
    art = _artifacts(run)
    png = art / "figures" / "rollout_error_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((art / "eval_report.json").read_text())["datasets"].keys() == report["datasets"].keys()
    train_store = _client(pretrained.uri)  # the evaluation did not log into the training run's store
    train_runs = train_store.search_runs([train_store.get_experiment_by_name("nestor-ds").experiment_id])
    assert not [r for r in train_runs if r.data.tags.get("nestor.entry") == "evaluate"]
