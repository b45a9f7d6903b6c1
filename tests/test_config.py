"""Run configuration: YAML + --set overrides -> validated dataclasses, with messages that name the key."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import yaml

from nestor_ds.cli import run_cli
from nestor_ds.config import ConfigError, config_from_dict, flatten, load_config, parse_overrides
from nestor_ds.engine.distributed import resolve_ep_size
from nestor_ds.engine.optim import OptimConfig, lr_at
from nestor_ds.errors import UserError


@pytest.fixture
def tmp_path(tiny_shards):  # the configs below point at real shards (validation reads their manifests)
    return tiny_shards[1]["dr_tiny"]


def _base(shard_dir):
    return {
        "data": {"datasets": [{"name": "d", "path": str(shard_dir)}], "t_in": 4, "resolution": 16, "channels": 2},
        "model": {"preset": "nestor-tiny", "width": 16, "num_heads": 2, "patch_size": 4},
    }


def test_preset_then_fields_then_data_bound_fields(tmp_path):
    cfg = config_from_dict(_base(tmp_path))
    assert cfg.preset == "nestor-tiny" and cfg.model.width == 16 and cfg.model.image_experts == 4
    assert (cfg.model.t_in, cfg.model.resolution, cfg.model.in_channels) == (4, 16, 2)  # follow the data section
    assert cfg.ep_size == "auto"


def test_one_model_merge_preset_checkpoint_yaml_data(tmp_path):
    """Fine-tuning: the checkpoint's model under the YAML, data-bound fields from the data; a named preset wins."""
    from nestor_ds.model.presets import get_preset

    ckpt = get_preset(
        "nestor-tiny",
        {
            "width": 24,
            "num_heads": 2,
            "in_channels": 7,
            "t_in": 9,
            "resolution": 64,
            "out_channels": 7,
            "moe": {"ep_size": 4, "top_k": 1},
        },
    ).to_dict()
    raw = _base(tmp_path)
    raw["model"] = {"depth": 1, "moe": {"num_experts": 2}}
    cfg = config_from_dict(raw, base_model=ckpt)
    m = cfg.model
    assert (m.width, m.patch_size, m.depth, m.moe.top_k, m.moe.num_experts) == (24, 8, 1, 1, 2)
    assert (m.in_channels, m.out_channels, m.t_in, m.resolution) == (2, None, 4, 16)  # data-bound: this run's data
    assert m.moe.ep_size == 1 and cfg.ep_size == "auto" and cfg.preset is None  # ep_size followed the old world
    named = config_from_dict(_base(tmp_path), base_model=ckpt)  # a preset in the YAML replaces the checkpoint's
    assert named.preset == "nestor-tiny" and named.model.width == 16 and named.model.moe.top_k == 2


def test_overrides_parse_yaml_values_and_numbers_like_3e_3(tmp_path):
    raw = _base(tmp_path)
    over = parse_overrides(["optim.lr=3e-3", "train.max_steps=7", "model.moe.ep_size=2", "optim.betas=[0.9, 0.99]"])
    cfg = config_from_dict({**raw, **{k: {**raw.get(k, {}), **v} for k, v in over.items()}})
    assert cfg.optim.lr == pytest.approx(3e-3) and cfg.train.max_steps == 7 and cfg.ep_size == 2
    assert cfg.optim.betas == (0.9, 0.99)


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"model": {"widht": 3}}, "unknown key 'model.widht'"),
        ({"train": {"max_steps": "abc"}}, "train.max_steps must be an integer"),
        ({"optim": {"schedule": "linear"}}, "optim.schedule must be onecycle, cosine or constant"),
        ({"model": {"t_in": 5}}, "model.t_in = 5 disagrees with data.t_in = 4"),
        ({"finetune": {"freeze": ["heads"]}}, "finetune.freeze unknown part(s) ['heads']"),
        ({"bogus": {}}, "unknown key 'bogus'"),
        ({"optim": {"div_factor": 0.5}}, "optim.div_factor must be >= 1"),
        ({"train": {"eval_windows": "last"}}, "train.eval_windows must be all or first"),
        ({"model": {"moe": {"top_k": 9}}}, "moe.top_k=9"),
        ({"data": {"num_workers": -1}}, "data.num_workers: must be an integer >= 0"),
        ({"data": {"datasets": [{"name": "d", "path": "/nonexistent/shards"}]}}, "/nonexistent/shards does not exist"),
    ],
)
def test_bad_values_name_the_key(tmp_path, patch, message):
    raw = _base(tmp_path)
    for k, v in patch.items():
        raw[k] = {**raw.get(k, {}), **v}
    with pytest.raises(UserError) as err:  # a UserError: the entries print it as one line (run_cli)
        config_from_dict(raw)
    assert message in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cfg")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp / "nope.yaml")
    bad = tmp / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_gives_one_line_for_the_users_mistake_and_a_traceback_for_our_bug(
    tmp_path, tmp_path_factory, capsys, monkeypatch
):
    """run_cli: a bad config key is one line and exit 2; a plain ValueError raised inside our code (a bug: here
    `balanced_order` given an ep_size that does not divide the experts, which no user input reaches) keeps its
    traceback and exits 1 -- it used to be printed as one line, hiding where it came from."""
    from nestor_ds.train import main

    cfg = tmp_path_factory.mktemp("cli") / "run.yaml"
    cfg.write_text(yaml.safe_dump({**_base(tmp_path), "train": {"max_steps": 1}}))
    argv = ["train", "--ds_config", "ds.json", "--config", str(cfg), "--set", "model.widht=3"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        run_cli(main)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.splitlines() == [err], err
    assert err.startswith("error:") and "unknown key 'model.widht'" in err

    bug = (
        "from nestor_ds.cli import run_cli\n"
        "from nestor_ds.moe.placement import balanced_order\n"
        "run_cli(lambda: balanced_order([1.0, 2.0, 3.0, 4.0], 3) and 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", bug], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr and "placement.py" in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("ValueError: balanced_order"), proc.stderr


def test_flatten_names_every_leaf(tmp_path):
    flat = flatten(config_from_dict(_base(tmp_path)).to_dict())
    assert flat["data.datasets.0.name"] == "d" and flat["model.moe.num_experts"] == 4 and "optim.lr" in flat


def test_ep_size_resolution():
    # one node (ranks per node = world, also when the launcher says nothing): data parallel, as docs/scaling.md advises
    assert resolve_ep_size("auto", 2, 4, "local") == 1
    assert resolve_ep_size("auto", 8, 6, "local", ranks_per_node=8) == 1
    # several nodes: the largest size dividing the world, the experts and the ranks per node
    assert resolve_ep_size("auto", 16, 6, "local", ranks_per_node=8) == 2
    assert resolve_ep_size("auto", 8, 4, "local", ranks_per_node=4) == 4
    assert resolve_ep_size("auto", 4, 4, "local", ranks_per_node=2) == 2
    # groups are consecutive ranks: auto keeps them inside a node (3 nodes x 8 GPUs, 6 experts: not 6)
    assert resolve_ep_size("auto", 24, 6, "local", ranks_per_node=8) == 2
    assert resolve_ep_size("auto", 24, 6, "local", ranks_per_node=24) == 1  # one node of 24
    assert resolve_ep_size("auto", 12, 6, "local", ranks_per_node=6) == 6
    assert resolve_ep_size(2, 2, 4, "local") == 2
    with pytest.raises(ValueError, match="must divide both the world size"):
        resolve_ep_size(3, 4, 6, "local")
    # DeepSpeed: MoE params up to ZeRO-2
    assert resolve_ep_size("auto", 4, 4, "local", ranks_per_node=2, zero_stage=3) == 1
    with pytest.raises(ValueError, match="ZeRO stage 3 does not partition MoE parameters"):
        resolve_ep_size(2, 2, 4, "local", zero_stage=3)
    with pytest.raises(ValueError, match="backend=megablocks keeps all token experts on every rank"):
        resolve_ep_size(2, 2, 4, "megablocks")
    assert resolve_ep_size("auto", 2, 6, "megablocks") == 1  # MegaBlocks experts are not expert-parallel here
    with pytest.raises(ValueError, match="the AFNO baseline has no experts"):
        resolve_ep_size(2, 2, 6, "none")


def test_schedules_warm_up_and_decay():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, schedule="onecycle", final_lr_ratio=0.01)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] < 1e-4 and max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 9
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-6)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    # the one-cycle start is lr / div_factor (25 by default, as torch's OneCycleLR; DPOT uses 1e4); the first
    # step is one warm-up increment above it
    w = 10
    for div in (25.0, 1e4):
        start = 1e-3 / div
        first = start + (1e-3 - start) * (1 - math.cos(math.pi / w)) / 2
        assert lr_at(0, 100, OptimConfig(lr=1e-3, warmup_steps=w, div_factor=div)) == pytest.approx(first, rel=1e-12)
    const = OptimConfig(lr=1e-3, warmup_steps=4, schedule="constant")
    assert [lr_at(s, 10, const) for s in (0, 3, 9)] == pytest.approx([2.5e-4, 1e-3, 1e-3])
