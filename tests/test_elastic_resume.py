"""Elastic resume (docs/reliability.md, §6): a ZeRO-2 checkpoint continued on another number of ranks and another
ep_size follows the uninterrupted run's trajectory; a changed model or a layout that cannot be re-sharded is refused
with one line naming what to do.

Every run trains on one global batch sequence whatever its rank count (tests/scripts/probe_train.py), so a run
saved on 2 ranks (ep 2) and continued on 1 rank must reproduce the 1-rank run step for step, up to the summation
order of the gradient all-reduce. Dropping Adam's moments at the switch moves the weights by ~lr per step, far
outside the tolerance, so the comparison checks the optimizer state too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train_fixtures import ds_config, launch, tiny_config

PROBE = "tests.scripts.probe_train"
pytestmark = pytest.mark.timeout(900)
GLOBAL_BATCH = 4


def _probe(tmp: Path, cfg: Path, ranks: int, run: str, out: str, *extra: str, stage: int = 2):
    """The probe on `ranks` ranks; ZeRO 0-2 runs expert parallel over all of them (ep_size = ranks: `auto` would
    keep one node data parallel), so each switch of world size also switches ep_size."""
    ds = ds_config(tmp, stage=stage, micro=GLOBAL_BATCH // ranks)
    args = [PROBE, "--config", str(cfg), "--ds_config", str(ds), "--global-batch", str(GLOBAL_BATCH)]
    if stage < 3:
        args += ["--set", f"model.moe.ep_size={ranks}"]
    return launch([*args, "--out", out, "--run-name", run, *extra], ranks=ranks, cwd=tmp)


def _ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-6000:]}"


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def elastic_cfg(tiny_shards, tmp_path) -> Path:
    _, shards = tiny_shards
    return tiny_config(
        tmp_path,
        shards,
        model={"moe": {"backend": "local"}},
        loss={"image_lb_weight": 0.0, "token_lb_weight": 0.0},
        train={"max_steps": 6, "ckpt_every": 3, "log_every": 1},
        tracking={"enabled": False},
    )


def test_resume_on_other_world_and_ep_size_follows_the_uninterrupted_run(elastic_cfg, tmp_path):
    """1 rank uninterrupted vs (2 ranks, ep 2 -> 1 rank, ep 1) and (1 rank -> 2 ranks, ep 2), switching at step 3."""
    _ok(_probe(tmp_path, elastic_cfg, 1, "ref", "ref"))
    ref = _rows(tmp_path / "runs" / "ref")
    ref_pred = torch.load(tmp_path / "ref" / "probe.pt", weights_only=True)["pred"]
    for first, second in ((2, 1), (1, 2)):
        run = f"from{first}to{second}"
        _ok(_probe(tmp_path, elastic_cfg, first, run, f"{run}_a", "--set", "train.stop_at=3"))
        proc = _probe(tmp_path, elastic_cfg, second, run, run, "--resume", "auto")
        _ok(proc)
        log = proc.stderr + proc.stdout
        assert f"saved on world size {first}, ep_size {first}" in log and "re-sharded" in log, log[-3000:]
        assert "elastic resume at step 3: 12 samples seen" in log, log[-3000:]
        rows = _rows(tmp_path / "runs" / run)
        assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, 7))
        for a, b in zip(ref, rows, strict=True):
            assert abs(a["train/loss"] - b["train/loss"]) <= 1e-5 * abs(a["train/loss"]), (run, a, b)
            assert abs(a["train/lr"] - b["train/lr"]) <= 1e-12, (run, a, b)
        pred = torch.load(tmp_path / run / "probe.pt", weights_only=True)["pred"]
        worst = (pred - ref_pred).abs().max().item()
        assert worst <= 1e-4, (run, worst)
        # the continued run saves on its own layout, and a plain resume of that works (no re-sharding)
        saved = json.loads(
            (tmp_path / "runs" / run / "checkpoints" / "step_00000006" / "nestor_config.json").read_text()
        )
        assert (saved["world_size"], saved["ep_size"]) == (second, second)


def test_changed_model_is_refused_before_loading(elastic_cfg, tmp_path):
    """Same layout (DeepSpeed's loader) and another layout (re-sharding): one line naming the tensor, both shapes
    and the config key that changed; nothing of the run directory is touched."""
    _ok(_probe(tmp_path, elastic_cfg, 2, "r", "a", "--set", "train.stop_at=3"))
    ckpts = sorted(p.name for p in (tmp_path / "runs" / "r" / "checkpoints").iterdir())
    for ranks in (2, 1):
        proc = _probe(tmp_path, elastic_cfg, ranks, "r", "b", "--resume", "auto", "--set", "model.width=24")
        assert proc.returncode != 0
        err = proc.stderr
        assert "the model changed since this checkpoint" in err, err[-3000:]
        assert "model.width 16 -> 24" in err and "(16," in err and "(24," in err, err[-3000:]
        assert "--load all" in err
        assert sorted(p.name for p in (tmp_path / "runs" / "r" / "checkpoints").iterdir()) == ckpts


def test_zero0_checkpoint_on_another_world_size_names_the_supported_path(elastic_cfg, tmp_path):
    """ZeRO-0 keeps no partitioned fp32 state to re-shard: the error says how to go on (fine-tune --load all)."""
    _ok(_probe(tmp_path, elastic_cfg, 2, "z0", "a", "--set", "train.stop_at=3", stage=0))
    proc = _probe(tmp_path, elastic_cfg, 1, "z0", "b", "--resume", "auto", stage=0)
    assert proc.returncode != 0
    assert "ZeRO stage 1 or 2" in proc.stderr and "nestor_ds.finetune --pretrained" in proc.stderr, proc.stderr[-3000:]


def test_zero3_resume_checks_the_model_against_the_gathered_weights(tiny_shards, tmp_path):
    """ZeRO-3 tags hold partitions, not a module file: the changed-model check reads the full weights gathered at
    save time and compares them with the parameters' full shapes, so a plain resume still works."""
    _, shards = tiny_shards
    sections = {"model": {"moe": {"backend": "local"}}, "tracking": {"enabled": False}}
    train = {"max_steps": 5, "ckpt_every": 3, "eval_every": 0}
    ds = str(ds_config(tmp_path, stage=3, micro=2))

    def run(cfg: Path, *extra: str):
        args = ["nestor_ds.train", "--ds_config", ds, "--config", str(cfg), "--run-name", "z3", *extra]
        return launch(args, ranks=1, cwd=tmp_path)

    _ok(run(tiny_config(tmp_path, shards, train={**train, "stop_at": 3}, **sections)))
    cfg = tiny_config(tmp_path, shards, train=train, **sections)
    changed = run(cfg, "--resume", "auto", "--set", "model.width=24")
    assert changed.returncode != 0 and "model.width 16 -> 24" in changed.stderr, changed.stderr[-3000:]
    resumed = run(cfg, "--resume", "auto")
    _ok(resumed)
    assert "resumed from" in resumed.stderr and len(_rows(tmp_path / "runs" / "z3")) == 5


def test_resume_with_an_expert_order_keeps_the_trajectory_and_reorders_the_experts(elastic_cfg, tmp_path):
    """train.expert_order (nestor_ds/routing/place.py --order-out): 2 ranks, ep 2, stopped at step 3 and continued with
    every token MoE's experts rotated by one (across the two ranks). The same function in another order: losses and
    the final prediction match the uninterrupted run's, and the final experts are the uninterrupted run's in the new
    order, so Adam's moments moved with them (dropped moments move the weights far outside 1e-4, see above). The tag
    saved after the re-ordering is not re-ordered again."""
    from nestor_ds.checkpoint.load import load_local_state
    from nestor_ds.config import load_config
    from nestor_ds.model import build_model
    from nestor_ds.moe import LocalTokenMoE
    from nestor_ds.moe.placement import EXPERT_TENSORS, ExpertOrder, read_expert_order, write_expert_order
    from nestor_ds.routing.place import main as place_main

    _ok(_probe(tmp_path, elastic_cfg, 2, "ref", "ref"))
    _ok(_probe(tmp_path, elastic_cfg, 2, "placed", "placed_a", "--set", "train.stop_at=3"))
    model = build_model(load_config(elastic_cfg).model)
    moes = {f"{name}.": m.num_experts for name, m in model.named_modules() if isinstance(m, LocalTokenMoE)}
    # the tool on the stopped run's checkpoints names their step and every token MoE (its orders may be the identity
    # on a model this young: the test rotates the experts itself)
    assert place_main(["--checkpoint", str(tmp_path / "runs" / "placed" / "checkpoints"), "--ep", "2", "--steps", "2",
                       "--micro-batch", "2", "--order-out", str(tmp_path / "tool_order.json")]) == 0  # fmt: skip
    from_tool = read_expert_order(tmp_path / "tool_order.json")
    assert from_tool.checkpoint_step == 3 and set(from_tool.orders) == set(moes) and from_tool.ep_size == 2
    orders = {prefix: [*range(1, E), 0] for prefix, E in moes.items()}
    order_file = write_expert_order(tmp_path / "order.json", ExpertOrder(2, 3, orders))
    order_arg = f"train.expert_order={order_file}"
    proc = _probe(tmp_path, elastic_cfg, 2, "placed", "placed", "--resume", "auto", "--set", order_arg)
    _ok(proc)
    log = proc.stderr + proc.stdout
    assert f"re-ordering the token experts of {len(orders)} token MoEs" in log, log[-3000:]
    assert "configuration differs" not in log  # the order is not part of the trajectory's configuration

    ref, rows = _rows(tmp_path / "runs" / "ref"), _rows(tmp_path / "runs" / "placed")
    assert [r["step"] for r in rows] == list(range(1, 7))
    for a, b in zip(ref, rows, strict=True):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-5 * abs(a["train/loss"]), (a, b)
    pred = torch.load(tmp_path / "placed" / "probe.pt", weights_only=True)["pred"]
    ref_pred = torch.load(tmp_path / "ref" / "probe.pt", weights_only=True)["pred"]
    assert (pred - ref_pred).abs().max().item() <= 1e-4
    ref_state = load_local_state(tmp_path / "runs" / "ref" / "checkpoints")[0]
    placed_state = load_local_state(tmp_path / "runs" / "placed" / "checkpoints")[0]
    for prefix, order in orders.items():
        for name in EXPERT_TENSORS:
            torch.testing.assert_close(placed_state[prefix + name], ref_state[prefix + name][order], atol=1e-4, rtol=0)

    again = _probe(tmp_path, elastic_cfg, 2, "placed", "placed_b", "--resume", "auto", "--set", order_arg)
    _ok(again)
    log = again.stderr + again.stdout
    assert "was computed from step 3, this checkpoint is step 6: the experts keep their order" in log, log[-3000:]
