"""nestor_ds/routing (profile.py, replay.py): the replay of routing counts for expert-parallel groups, and the CLI on
a real model export and real shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nestor_ds.routing.profile import main
from nestor_ds.routing.replay import Calls, replay, uniform_calls

from train_fixtures import tiny_config


def _two_ranks() -> Calls:
    """1 step, 2 ranks, 1 block, 2 image experts, 2 token experts (numbers small enough to follow by hand)."""
    image = np.array([[[[3, 1]], [[1, 1]]]])  # [S, R, B, E_img]: rank 0 sends 3 samples to image expert 0, rank 1 one
    token = np.array([[[[[4, 2], [1, 1]]], [[[1, 1], [0, 2]]]]])  # [S, R, B, E_img, E_tok]
    return Calls(image, token)


def test_replay_counts_padding_and_the_busiest_rank():
    row = replay(_two_ranks(), ep=2)
    # image expert 0: the group calls it with 3 samples on both ranks, rank 1 pads 2; expert 1: 1 and 1, no padding
    assert row["padding_fraction"] == pytest.approx(2 / ((3 + 1) * 2))
    # received rows per call: expert 0 -> rank 0 gets 4+1, rank 1 gets 2+1; expert 1 -> rank 0 1+0, rank 1 1+2
    assert row["rank_imbalance"] == pytest.approx((5 + 3) / (4 + 2))
    # ep 1: rank 0 computes 6+2 rows, rank 1 2+2 -> 8; ep 2: the busiest rank of each call, 5+3 -> 8
    assert row["expert_rows_ratio"] == pytest.approx(8 / 8)
    # image-expert bodies: ep 1 rank 0 runs 3+1 samples; ep 2 every rank runs 3+1 (padding included)
    assert row["body_rows_ratio"] == pytest.approx(4 / 4)
    # one exchange for both image experts: rank 0 receives 5+1, rank 1 3+3 -> 6; bodies: rank 0 runs 3+1 samples
    assert row["one_exchange_per_block"] == {"expert_rows_ratio": pytest.approx(8 / 6), "body_rows_ratio": 1.0}


def test_replay_without_expert_parallelism_is_balanced_by_definition():
    row = replay(_two_ranks(), ep=1)
    assert row["expert_rows_ratio"] == row["body_rows_ratio"] == row["rank_imbalance"] == 1.0
    assert row["padding_fraction"] == 0.0 and row["one_exchange_per_block"]["expert_rows_ratio"] == 1.0


def test_replay_refuses_a_group_size_that_does_not_divide():
    calls = _two_ranks()
    six_ranks = Calls(np.repeat(calls.image_SRBE, 3, axis=1), np.repeat(calls.token_SRBET, 3, axis=1))
    with pytest.raises(ValueError, match="ep 4 must divide the ranks \\(6\\)"):
        replay(six_ranks, ep=4)
    with pytest.raises(ValueError, match="ep 3 must divide the ranks \\(2\\)"):
        replay(calls, ep=3)


def test_uniform_router_routes_every_sample_and_token_k_times():
    calls = uniform_calls((3, 2, 2, 6, 4), micro_batch=10, tokens=16, image_k=2, token_k=2, seed=0)
    assert (calls.image_SRBE.sum(-1) == 10 * 2).all()
    assert (calls.token_SRBET.sum(-1) == calls.image_SRBE * 16 * 2).all()
    assert calls.image_SRBE.std() > 0  # sampled, not an even split
    row = replay(calls, ep=2)
    assert row["rank_imbalance"] > 1.0 and row["padding_fraction"] > 0.0


def test_cli_profiles_a_model_export_on_its_training_stream(tiny_shards, tmp_path, capsys):
    from nestor_ds.checkpoint.export import save_safetensors
    from nestor_ds.config import load_config
    from nestor_ds.model import build_model

    root, shards = tiny_shards
    cfg = load_config(tiny_config(tmp_path, shards))
    model = build_model(cfg.model)
    export = save_safetensors(model.state_dict(), cfg.to_dict(), tmp_path / "model.safetensors")
    out = tmp_path / "profile.json"
    steps, ranks, micro = 2, 2, 3
    assert main(["--checkpoint", str(export), "--steps", str(steps), "--ranks", str(ranks), "--micro-batch",
                 str(micro), "--ep", "1", "2", "--out", str(out), "--json"]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    m = cfg.model
    # every valid token of every sample is routed K_img x K_tok times in every block: nothing lost, nothing doubled
    assert result["tokens_per_sample"] == (m.resolution // m.patch_size) ** 2
    expected = steps * ranks * micro * result["tokens_per_sample"] * m.image_top_k * m.moe.top_k * m.depth
    assert result["token_assignments"] == expected
    assert result["ep"]["1"]["padding_fraction"] == 0.0
    assert set(result["uniform_router"]) == {"1", "2"} and result["uniform_router"]["1"]["rank_imbalance"] == 1.0
    ep2 = result["ep"]["2"]
    # (ranges such as 0 <= padding < 1 or busiest / mean >= 1 hold by construction and were removed: the replay's
    # arithmetic is checked exactly by hand in test_replay_counts_padding_and_the_busiest_rank)
    # the text form names both paths' numbers, ep 2's as in the JSON
    assert main(["--checkpoint", str(export), "--steps", str(steps), "--ranks", str(ranks), "--micro-batch",
                 str(micro), "--ep", "2"]) == 0  # fmt: skip
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("ep 2") and "model" in x)
    one = ep2["one_exchange_per_block"]
    assert f"busiest rank / mean {ep2['rank_imbalance']:.3f}" in line
    assert f"one exchange per block: expert rows {one['expert_rows_ratio']:.3f}" in line


def test_cli_names_a_model_without_image_moe(tiny_shards, tmp_path):
    from nestor_ds.checkpoint.export import save_safetensors
    from nestor_ds.config import load_config
    from nestor_ds.model import build_model

    root, shards = tiny_shards
    cfg = load_config(tiny_config(tmp_path, shards, model={"preset": "afno-tiny"}))
    export = save_safetensors(build_model(cfg.model).state_dict(), cfg.to_dict(), tmp_path / "afno.safetensors")
    with pytest.raises(SystemExit, match="no image MoE"):
        main(["--checkpoint", str(export), "--steps", "1"])
