"""Export of a real 2-rank, ep_size-2 DeepSpeed checkpoint -> safetensors -> load_pretrained.

The module fixture trains a tiny NESTOR (expert-parallel local token MoE, ep_size 2, ZeRO-2, gloo) for one
step on 2 ranks (torchrun's environment: tests/fork_ranks.py) through the training entry's own set-up
(``run_training``: ``Trainer.build``, its data stream, its checkpoint save with the COMPLETE marker), and records
the trained DeepSpeed engine model's eval output on a fixed input. This file is also that worker
(`--worker OUT_DIR CONFIG DS_CONFIG`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CKPT = Path("runs") / "export" / "checkpoints"  # the trainer's checkpoint root under the fixture's directory
MODEL_OVERRIDES = {
    "in_channels": 2,
    "t_in": 3,
    "resolution": 16,
    "patch_size": 4,
    "width": 16,
    "num_heads": 2,
    "image_experts": 2,
    "image_top_k": 1,
    "afno_num_blocks": 2,
    "norm_groups": 4,
    "head_dim": 8,
    "depth": 1,
    "moe": {"backend": "local", "ep_size": 2, "num_experts": 4, "top_k": 2},
}


def tiny_config():
    from nestor_ds.model import get_preset

    return get_preset("nestor-tiny", MODEL_OVERRIDES)


def fixed_input() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(3, 16, 16, 3, 2, generator=g)
    return x, torch.ones(3, 2, dtype=torch.bool)


def worker(out: Path, config: Path, ds_config_path: Path) -> None:
    """2 ranks: one ZeRO-2 step of ``run_training`` (what ``python -m nestor_ds.train`` runs, so the engine is the
    one users get from ``Trainer.build``), then the trained engine module's eval outputs, recorded on rank 0."""
    from nestor_ds.config import load_config
    from nestor_ds.engine.trainer import run_training

    result = run_training(load_config(str(config)), str(ds_config_path), run_name="export")
    model = result.model
    model.eval()
    x, mask = fixed_input()
    with torch.no_grad():  # both ranks: the token experts' all-to-all needs the whole expert-parallel group
        pred = model(x, mask).pred
        roll = model.rollout(x, 2, mask)
    if torch.distributed.get_rank() == 0:
        torch.save({"x": x, "pred": pred, "rollout": roll}, out / "reference.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ds_run(tiny_shards, tmp_path_factory) -> Path:
    from train_fixtures import ds_config, run_two_rank_script
    from train_fixtures import tiny_config as run_config

    out = tmp_path_factory.mktemp("ds_ep2")
    root, shards = tiny_shards
    model = {k: v for k, v in MODEL_OVERRIDES.items() if k not in ("in_channels", "t_in", "resolution")}
    config = run_config(
        out,
        shards,
        data={"t_in": 3, "channels": 2, "resolution": 16},
        model={**model, "preset": "nestor-tiny"},
        train={"max_steps": 1, "ckpt_every": 1, "eval_max_trajectories": 1},
        tracking={"enabled": False},
    )
    args = ("--worker", str(out), str(config), str(ds_config(out, stage=2, micro=2)))
    proc = run_two_rank_script(Path(__file__).resolve(), out, *args, timeout=600)
    if proc.returncode != 0:
        pytest.fail(
            f"2-rank DeepSpeed worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return out


def test_deepspeed_files_are_what_we_expect(ds_run):
    from nestor_ds.checkpoint.layout import resolve_checkpoint
    from nestor_ds.checkpoint.safe_load import gather_deepspeed_state

    tag = resolve_checkpoint(ds_run / CKPT)
    assert tag.name == "step_00000001"
    names = sorted(p.name for p in tag.iterdir())
    # 1 DeepSpeed token-MoE layer (depth 1 x 2 image experts = 2 layers) x 4 global experts, ranks 0 and 1
    assert [n for n in names if n.startswith("layer_")] == [
        f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in range(4)
    ]
    state = gather_deepspeed_state(tag)
    expert_keys = [k for k in state if ".deepspeed_experts." in k]
    assert len(expert_keys) == 2 * 4 * 3  # layers x experts x (w1, w3, w2)
    # expert ids in the keys are global: 2 and 3 came from rank 1's files
    assert any(".deepspeed_experts.3.w2.weight" in k for k in expert_keys)


def test_export_then_load_pretrained_matches_engine_model(ds_run, tmp_path):
    from safetensors import safe_open

    from nestor_ds import load_pretrained
    from nestor_ds.checkpoint.export import export_checkpoint

    out = export_checkpoint(ds_run / CKPT, tmp_path / "tiny.safetensors")
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert json.loads(meta["nestor_config"])["ep_size"] == 2
    assert json.loads((tmp_path / "tiny.json").read_text())["model"]["moe"]["backend"] == "local"
    assert any(k.endswith("experts.w1_EFD") for k in keys) and not any("deepspeed" in k for k in keys)

    ref = torch.load(ds_run / "reference.pt", weights_only=True)
    model = load_pretrained(out)
    assert not model.training
    assert model.cfg.moe.backend == "local" and model.cfg.moe.ep_size == 1
    _, mask = fixed_input()
    with torch.no_grad():
        pred = model(ref["x"], mask).pred
    torch.testing.assert_close(pred, ref["pred"], atol=1e-6, rtol=0)
    torch.testing.assert_close(model.rollout(ref["x"], 2, mask), ref["rollout"], atol=1e-6, rtol=0)

    # the DeepSpeed directory itself (root -> latest tag) loads to the same weights
    direct = load_pretrained(ds_run / CKPT)
    for (k, a), (_, b) in zip(model.state_dict().items(), direct.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_missing_expert_file_is_named(ds_run, tmp_path):
    from nestor_ds.checkpoint.export import export_checkpoint
    from nestor_ds.checkpoint.layout import CheckpointError

    tag = tmp_path / "step_00000001"
    shutil.copytree(ds_run / CKPT / "step_00000001", tag)
    (tag / "layer_1_expert_2_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"MoE layer 1 is missing expert file\(s\) for expert id\(s\) \[2\]"):
        export_checkpoint(tag, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_root_resolves_to_newest_complete_tag_not_latest(ds_run, tmp_path):
    """A save cut short (DeepSpeed already moved `latest`, our COMPLETE marker missing) is never used."""
    from nestor_ds.checkpoint.layout import resolve_checkpoint

    root = tmp_path / "ckpt"
    shutil.copytree(ds_run / CKPT, root)
    good = root / "step_00000001"
    assert json.loads((good / "COMPLETE").read_text())["step"] == 1  # written by the trainer's save
    (root / "nestor_latest").unlink()  # without the run's pointer, only the COMPLETE markers decide
    cut = root / "step_00000002"
    shutil.copytree(good, cut)
    (cut / "COMPLETE").unlink()
    (root / "latest").write_text("step_00000002")
    assert resolve_checkpoint(root) == good


def test_root_follows_the_runs_pointer_after_a_rollback(tmp_path):
    """A run rolled back to step 1 (``--resume .../step_00000001``) exports what it resumed from, not step 2."""
    from nestor_ds.checkpoint.layout import COMPLETE_MARKER, MODEL_STATES, POINTER, resolve_checkpoint
    from nestor_ds.checkpoint.save_resume import POINTER as SAVE_POINTER

    assert SAVE_POINTER == POINTER == "nestor_latest"
    root = tmp_path / "ckpt"
    for step in (1, 2):
        tag = root / f"step_{step:08d}"
        tag.mkdir(parents=True)
        (tag / MODEL_STATES).write_bytes(b"")
        (tag / COMPLETE_MARKER).write_text(json.dumps({"step": step, "seq": step}))
    assert resolve_checkpoint(root) == root / "step_00000002"  # no pointer: the highest complete step
    (root / POINTER).write_text("step_00000001\n")
    assert resolve_checkpoint(root) == root / "step_00000001"
    (root / POINTER).write_text("step_00000009\n")  # a pointer to a tag that is gone (or incomplete) is ignored
    assert resolve_checkpoint(root) == root / "step_00000002"


def test_config_mismatch_names_key_and_both_shapes(ds_run, tmp_path):
    from nestor_ds import load_pretrained
    from nestor_ds.checkpoint.export import save_safetensors
    from nestor_ds.checkpoint.layout import CheckpointError
    from nestor_ds.checkpoint.load import load_local_state

    state, run_cfg, _ = load_local_state(ds_run / CKPT)
    run_cfg["model"]["head_dim"] = 12  # the weights were trained with head_dim 8
    bad = save_safetensors(state, run_cfg, tmp_path / "bad.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"key 'head\.[\w.]+' has shape \(\d+(, \d+)*\) in the checkpoint "
        r"but \(\d+(, \d+)*\) in the model built from its config",
    ):
        load_pretrained(bad)


def test_evaluate_cli_on_exported_checkpoint(ds_run, tmp_path):
    from nestor_ds.checkpoint.export import export_checkpoint

    from shard_fixtures import build_dataset

    shards = build_dataset(tmp_path, "tiny2", n=6, t=6, res=16, c=2, per_shard=2, test_fraction=0.5)
    model_file = export_checkpoint(ds_run / CKPT, tmp_path / "m.safetensors")
    report_file = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "nestor_ds.evaluate",
        "--checkpoint",
        str(model_file),
        "--data",
        str(shards),
        "--rollout-steps",
        "2",
        "--batch-size",
        "2",
        "--out",
        str(report_file),
        "--no-mlflow",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_file.read_text())
    r = report["datasets"]["tiny2"]
    # 3 test trajectories of 6 frames, t_in 3: every start frame 3, 4, 5 scored one-step; 3 and 4 have 2 frames left
    assert r["n_samples"] == 9 and r["n_rollout_windows"] == 6 and report["settings"]["windows"] == "all"
    assert r["rollout_steps"] == 2 and len(r["l2re_curve"]) == 2
    assert 0 < r["l2re_1step"] < float("inf") and len(r["channels"]) == 2
    assert "tiny2" in proc.stdout

    bad = subprocess.run(
        cmd[:5] + ["--data", str(tmp_path / "missing"), "--no-mlflow"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "manifest" in bad.stderr, bad.stderr


class Payload:
    """A custom class: unpickling it would run arbitrary code paths, so loading must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_object_is_refused(tmp_path):
    from nestor_ds import load_pretrained
    from nestor_ds.checkpoint.layout import CheckpointError

    tag = tmp_path / "step_00000001"
    tag.mkdir()
    torch.save({"module": {"w": torch.zeros(2)}, "client": Payload()}, tag / "mp_rank_00_model_states.pt")
    (tag / "nestor_config.json").write_text(json.dumps({"model": tiny_config().to_dict()}))
    with pytest.raises(
        CheckpointError,
        match=r"mp_rank_00_model_states\.pt: refused to load: it contains pickled "
        r"objects .*weights_only=True",
    ):
        load_pretrained(tag)


def test_bad_paths_are_one_line_errors(tmp_path):
    from nestor_ds.checkpoint.layout import CheckpointError, resolve_checkpoint

    with pytest.raises(CheckpointError, match="no such file"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("step_9")
    with pytest.raises(CheckpointError, match="names tag 'step_9'"):
        resolve_checkpoint(tmp_path)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    worker(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
