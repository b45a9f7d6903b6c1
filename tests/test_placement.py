"""Expert placement (nestor_ds/moe/placement.py, nestor_ds/routing/place.py): balanced orders, re-ordered token MoEs
that compute the same function, and the CLI on a real export and real shards."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from nestor_ds.moe import LocalTokenMoE, MoEConfig
from nestor_ds.moe.placement import (
    EXPERT_TENSORS,
    _greedy_split,
    balanced_order,
    rank_loads,
    read_expert_order,
    reorder_local_state,
)
from nestor_ds.routing.place import main

from train_fixtures import tiny_config


def test_two_popular_experts_go_to_different_ranks():
    load = [5, 5, 1, 1, 1, 1]  # identity: rank 0 holds both popular experts (11 vs 3)
    order = balanced_order(load, ep=2)
    assert sorted(order) == list(range(6))
    assert rank_loads(load, order, 2) == [7, 7]


def test_a_balanced_model_is_left_as_it_is():
    assert balanced_order([5, 1, 1, 5, 1, 1], ep=2) == list(range(6))
    assert balanced_order([3, 1, 4, 1], ep=1) == [0, 1, 2, 3]


@pytest.mark.parametrize(("experts", "ep"), [(6, 2), (6, 3), (8, 2), (8, 4)])
def test_exact_search_finds_the_best_of_all_orders(experts, ep):
    rng = np.random.default_rng(experts * 10 + ep)
    for _ in range(5):
        load = rng.gamma(2.0, size=experts).tolist()
        best = min(max(rank_loads(load, perm, ep)) for perm in itertools.permutations(range(experts)))
        assert max(rank_loads(load, balanced_order(load, ep), ep)) == pytest.approx(best)


def test_many_experts_are_split_greedily_then_improved_by_swaps():
    # 16 experts over 4 ranks: 2.6M splits, past the exhaustive limit; a perfect split exists ({8, 7, 2, 1} x 4)
    load = [8, 8, 8, 8, 7, 7, 7, 7, 1, 1, 1, 1, 2, 2, 2, 2]
    order = balanced_order(load, ep=4)
    assert sorted(order) == list(range(16))
    assert rank_loads(load, order, 4) == [18, 18, 18, 18]  # identity: [32, 28, 4, 8]
    # the swaps finish what the largest-first pass leaves: alone it splits these as 27 / 25, the best split is 26 / 26
    load = [2, 8, 6, 9, 5, 6, 9, 7]
    groups = _greedy_split(load, ep=2)
    assert sorted(sum(load[e] for e in g) for g in groups) == [26, 26]


def test_balanced_order_refuses_a_group_size_that_does_not_divide():
    with pytest.raises(ValueError, match="ep_size 4 must be >= 1 and divide the 6 experts"):
        balanced_order([1.0] * 6, ep=4)


def test_a_reordered_token_moe_computes_the_same_function():
    torch.manual_seed(0)
    moe = LocalTokenMoE(MoEConfig(num_experts=6, top_k=2), dim=16).eval()
    x_ND = torch.randn(64, 16)
    valid_N = torch.rand(64) > 0.2
    before = moe(x_ND, valid_N)
    order = [3, 0, 5, 1, 4, 2]
    state = reorder_local_state(moe.state_dict(), {"": order})
    assert torch.equal(state["experts.w2_EDF"][1], moe.state_dict()["experts.w2_EDF"][0])
    assert torch.equal(state["shared.w1.weight"], moe.state_dict()["shared.w1.weight"])  # not an expert tensor
    moe.load_state_dict(state)
    after = moe(x_ND, valid_N)
    torch.testing.assert_close(after.out_ND, before.out_ND, rtol=1e-5, atol=1e-6)
    assert torch.equal(after.tokens_per_expert_E, before.tokens_per_expert_E[order])
    torch.testing.assert_close(after.lb_loss, before.lb_loss)
    with pytest.raises(ValueError, match="is not an order of 6 experts"):
        reorder_local_state(moe.state_dict(), {"": [0, 0, 1, 2, 3, 4]})
    with pytest.raises(ValueError, match="'blocks.9.': the model has no tensor blocks.9.router.gate.weight"):
        reorder_local_state(moe.state_dict(), {"blocks.9.": order})


def _export(tiny_shards, tmp_path, **model):
    from nestor_ds.checkpoint.export import save_safetensors
    from nestor_ds.config import load_config
    from nestor_ds.model import build_model

    root, shards = tiny_shards
    cfg = load_config(tiny_config(tmp_path, shards, model=model))
    torch.manual_seed(0)
    return save_safetensors(build_model(cfg.model).state_dict(), cfg.to_dict(), tmp_path / "model.safetensors")


def test_cli_writes_a_reordered_export_with_the_same_outputs(tiny_shards, tmp_path, capsys):
    from nestor_ds.checkpoint.load import load_pretrained
    from nestor_ds.checkpoint.safe_load import read_safetensors

    export = _export(tiny_shards, tmp_path, moe={"num_experts": 4, "top_k": 2})
    out = tmp_path / "placed" / "model-ep2.safetensors"
    assert main(["--checkpoint", str(export), "--ep", "2", "--steps", "4", "--micro-batch", "3", "--out", str(out),
                 "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    original, placed = load_pretrained(export), load_pretrained(out)
    assert result["out"] == str(out) and result["token_moes"] == len(result["orders"]) == 2 * 4  # depth x E_img
    state, placed_state = read_safetensors(export)[0], read_safetensors(out)[0]
    for prefix, order in result["orders"].items():
        for name in EXPERT_TENSORS:
            assert torch.equal(placed_state[prefix + name], state[prefix + name][order])
    moved = sum(order != sorted(order) for order in result["orders"].values())
    assert moved == result["token_moes_reordered"]
    assert moved > 0  # a random init routes unevenly enough for at least one MoE to move
    others = [k for k in state if not any(k.startswith(p) and k[len(p) :] in EXPERT_TENSORS for p in result["orders"])]
    assert len(others) == len(state) - 4 * len(result["orders"])
    assert all(torch.equal(placed_state[k], state[k]) for k in others)
    from nestor_ds.data.stream import TrainStream
    from nestor_ds.routing.record import stream_config

    batch = next(TrainStream(stream_config(original, export, None), 4, rank=1, world_size=2, seed=5).batches())
    x, mask = batch["x"], batch["channel_mask"]
    with torch.no_grad():
        torch.testing.assert_close(placed(x, mask).pred, original(x, mask).pred, rtol=1e-5, atol=1e-5)
    # held_out_before/after: replay() rows (their arithmetic is checked by hand in test_routing_profile.py); the
    # former ranges here (busiest / mean >= 1, ratio > 0) held by construction and were removed
    assert {"held_out_before", "held_out_after"} <= set(result)


def test_cli_writes_an_order_file_for_a_resume(tiny_shards, tmp_path, capsys):
    export = _export(tiny_shards, tmp_path, moe={"num_experts": 4, "top_k": 2})
    order_file = tmp_path / "order.json"
    assert main(["--checkpoint", str(export), "--ep", "2", "--steps", "2", "--micro-batch", "3", "--order-out",
                 str(order_file)]) == 0  # fmt: skip
    assert "order.json: " in capsys.readouterr().out
    order = read_expert_order(order_file)
    assert order.ep_size == 2 and order.checkpoint_step is None  # from an export: no checkpoint step to resume
    assert set(order.orders) == {f"blocks.{b}.moe.experts.{e}.moe." for b in range(2) for e in range(4)}
    order_file.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="order.json: not an expert-order file"):
        read_expert_order(order_file)


def test_cli_refuses_what_it_cannot_place(tiny_shards, tmp_path):
    export = _export(tiny_shards, tmp_path, moe={"num_experts": 4, "top_k": 2})
    out = tmp_path / "placed.safetensors"
    with pytest.raises(SystemExit, match="--ep 3 must divide the model's 4 token experts"):
        main(["--checkpoint", str(export), "--ep", "3", "--ranks", "3", "--out", str(out)])
    with pytest.raises(SystemExit):  # argparse: nothing to balance with one rank per group
        main(["--checkpoint", str(export), "--ep", "1", "--out", str(out)])
    (tmp_path / "afno").mkdir()
    afno = _export(tiny_shards, tmp_path / "afno", preset="afno-tiny")
    with pytest.raises(SystemExit, match="no token experts"):
        main(["--checkpoint", str(afno), "--ep", "2", "--out", str(out)])
    with pytest.raises(SystemExit):  # argparse: nothing to write
        main(["--checkpoint", str(export), "--ep", "2"])
    assert not out.exists()


def test_an_order_applies_to_the_checkpoint_it_was_computed_from_only(tmp_path):
    from nestor_ds.checkpoint.elastic import ElasticResumeError, RunLayout
    from nestor_ds.checkpoint.save_resume import _expert_order_for
    from nestor_ds.moe.placement import ExpertOrder, write_expert_order

    order_file = write_expert_order(tmp_path / "order.json", ExpertOrder(2, 3, {"blocks.0.": [1, 0]}))
    zero2 = RunLayout(world_size=2, ep_size=2, zero_stage=2, model={}, expert_order=str(order_file))
    assert _expert_order_for(tmp_path / "step_00000003", zero2).orders == {"blocks.0.": [1, 0]}
    assert _expert_order_for(tmp_path / "step_00000006", zero2) is None  # saved after the re-ordering
    assert _expert_order_for(tmp_path / "step_00000003", RunLayout(2, 2, 2, {})) is None  # no train.expert_order
    with pytest.raises(ElasticResumeError, match="ZeRO stage 3"):
        _expert_order_for(tmp_path / "step_00000003", RunLayout(2, 1, 3, {}, str(order_file)))
    from_export = write_expert_order(tmp_path / "export_order.json", ExpertOrder(2, None, {"blocks.0.": [1, 0]}))
    with pytest.raises(ValueError, match="computed from an export, not from a checkpoint"):
        _expert_order_for(tmp_path / "step_00000003", RunLayout(2, 2, 2, {}, str(from_export)))
