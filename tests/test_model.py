"""Model package: shapes, parameter counts, routing semantics, losses, padding, determinism, FLOPs."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nestor_ds.model import build_model, get_preset, list_presets
from nestor_ds.model.config import ModelConfig
from nestor_ds.model.flops import account, forward_flops, measured_flops, param_counts
from nestor_ds.model.image_moe import ImageMoE
from nestor_ds.model.parallelize import apply_expert_parallel
from nestor_ds.moe import LocalTokenMoE
from nestor_ds.procs import free_port

torch.set_num_threads(1)


def inputs(cfg: ModelConfig, batch: int = 3, res: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = res or cfg.resolution
    return torch.randn(batch, r, r, cfg.t_in, cfg.in_channels, generator=g)


def tiny(**kw) -> ModelConfig:
    moe = kw.pop("moe", None)
    cfg = get_preset("nestor-tiny", kw)
    if moe:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe))
    return cfg


@pytest.mark.parametrize(
    "preset,over,res",
    [
        ("nestor-tiny", {}, 32),
        ("nestor-tiny", {}, 48),  # other grid: interpolated positional embedding
        ("nestor-tiny", {"t_ar": 2, "t_in": 4, "in_channels": 2}, 32),
        ("nestor-tiny", {"out_channels": 3, "image_top_k": 1, "shared_afno_layers": 0}, 32),
        ("afno-tiny", {}, 32),
        ("afno-tiny", {"t_ar": 3, "patch_size": 4}, 16),
    ],
)
def test_shapes(preset, over, res):
    torch.manual_seed(0)
    cfg = get_preset(preset, over)
    model = build_model(cfg)
    x = inputs(cfg, 2, res)
    out = model(x)
    assert out.pred.shape == (2, res, res, cfg.t_ar, cfg.c_out)
    assert set(out.aux_losses) == {"image_lb", "token_lb", "token_z"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.aux_losses.values())
    if cfg.arch == "nestor":
        assert len(out.routing) == cfg.depth
        r = out.routing[0]
        assert r.image_topk_idx.shape == (2, cfg.image_top_k)
        assert r.image_counts.shape == (cfg.image_experts,) and int(r.image_counts.sum()) == 2 * cfg.image_top_k
        assert r.token_counts.shape == (cfg.image_experts, cfg.moe.num_experts)
        # every token of every selected expert routed to moe.top_k token experts
        L = (res // cfg.patch_size) ** 2
        assert int(r.token_counts.sum()) == 2 * cfg.image_top_k * L * cfg.moe.top_k
    else:
        assert out.routing == [] and all(float(v) == 0 for v in out.aux_losses.values())


def test_bad_input_is_one_clear_error():
    cfg = get_preset("nestor-tiny")
    with pytest.raises(ValueError, match=r"t_in=10"):
        build_model(cfg)(torch.randn(1, 32, 32, 3, 4))
    with pytest.raises(ValueError, match="num_heads"):
        get_preset("nestor-tiny", {"width": 30})
    with pytest.raises(ValueError, match="unknown key"):
        ModelConfig.from_dict({"widht": 3})


def test_from_dict_nested_moe_and_overrides():
    cfg = ModelConfig.from_dict({"width": 64, "moe": {"num_experts": 8, "top_k": 2}})
    assert cfg.moe.num_experts == 8 and cfg.width == 64
    cfg2 = get_preset("nestor-ti", {"depth": 3, "moe.num_experts": 4, "moe": {"top_k": 1}})
    assert (cfg2.depth, cfg2.moe.num_experts, cfg2.moe.top_k, cfg2.width) == (3, 4, 1, 512)
    assert get_preset("nestor-ti").moe.num_experts == 6  # presets are not mutated
    assert {"nestor-ti", "nestor-s", "nestor-m", "nestor-l", "afno-ti", "nestor-tiny", "afno-tiny"} <= set(
        list_presets()
    )


def test_preset_parameter_counts():
    total, active = param_counts(get_preset("nestor-ti"))
    assert abs(total - 83.1e6) / 83.1e6 < 0.001, total  # the authors' count (shared token expert 341 wide)
    assert active < total / 3
    total, _ = param_counts(get_preset("afno-ti"))
    assert abs(total - 7.5e6) / 7.5e6 < 0.05, total
    assert param_counts(get_preset("nestor-l"))[0] < 1.1e9
    # the meta-device count is the real model's count
    cfg = get_preset("nestor-tiny")
    assert param_counts(cfg)[0] == sum(p.numel() for p in build_model(cfg).parameters())


def test_each_sample_uses_exactly_its_topk_experts_and_the_shared_afno():
    torch.manual_seed(1)
    cfg = tiny(depth=1)
    model = build_model(cfg)
    x = inputs(cfg, 1)
    out = model(x)
    (out.pred.square().mean() + sum(out.aux_losses.values())).backward()
    chosen = set(out.routing[0].image_topk_idx[0].tolist())
    assert len(chosen) == cfg.image_top_k
    moe = model.blocks[0].moe
    for e, expert in enumerate(moe.experts):
        grads = [p.grad for p in expert.parameters()]
        if e in chosen:
            assert any(g is not None and g.abs().sum() > 0 for g in grads), e
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads), e
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moe.shared.parameters())
    assert moe.router.weight.grad.abs().sum() > 0 and moe.router.bias.grad.abs().sum() > 0
    # the output does not depend on unselected experts and does depend on selected ones
    model.eval()
    with torch.no_grad():
        ref = model(x).pred
        other = next(e for e in range(cfg.image_experts) if e not in chosen)
        for p in moe.experts[other].parameters():
            p.add_(1.0)
        assert torch.equal(model(x).pred, ref)
        for p in moe.experts[min(chosen)].parameters():
            p.add_(1.0)
        assert not torch.allclose(model(x).pred, ref)


def test_image_lb_loss_matches_formula_on_hand_built_case():
    cfg = tiny(width=8, num_heads=2, image_experts=4, image_top_k=2, afno_num_blocks=2, shared_afno_layers=1)
    moe = ImageMoE(cfg)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:4, :4] = 3.0 * torch.eye(4)
        moe.router.bias.copy_(torch.tensor([0.5, 0.0, -0.5, 0.2]))
    pooled = torch.tensor(
        [
            [1.0, 0, 0, 0, 0, 0, 0, 0],
            [1.0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 1.0, 0, 0, 0, 0, 0],
            [0, 1.0, 0.5, 0, 0, 0, 0, 0],
        ]
    )
    h = pooled[:, :, None, None].expand(4, 8, 2, 2).contiguous()  # average pool gives `pooled`
    out = moe(h)
    # the formula by hand: lb = E * sum_i f_i P_i
    E, K, B = 4, 2, 4
    logits = [[3.0 * pooled[b, i].item() + [0.5, 0.0, -0.5, 0.2][i] for i in range(E)] for b in range(B)]
    probs = [[math.exp(v) / sum(math.exp(m) for m in row) for v in row] for row in logits]
    topk = [sorted(range(E), key=lambda i: -p[i])[:K] for p in probs]
    f = [sum(i in t for t in topk) / (K * B) for i in range(E)]
    P = [sum(p[i] for p in probs) / B for i in range(E)]
    expected = E * sum(fi * Pi for fi, Pi in zip(f, P, strict=True))
    assert out.image_lb.item() == pytest.approx(expected, rel=1e-6)
    assert [sorted(t) for t in topk] == [sorted(t) for t in out.routing.image_topk_idx.tolist()]
    assert out.routing.image_counts.tolist() == [round(fi * K * B) for fi in f]


def test_eval_is_deterministic_with_dropout_and_training_is_not():
    torch.manual_seed(0)
    cfg = tiny(dropout=0.3, attn_dropout=0.3)
    model = build_model(cfg)
    x = inputs(cfg, 2)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).pred, model(x).pred)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x).pred, model(x).pred)


@pytest.mark.parametrize("preset", ["nestor-ti", "afno-ti"])
def test_no_nan_at_init(preset):
    torch.manual_seed(0)
    cfg = get_preset(preset, {"resolution": 32})
    model = build_model(cfg)
    out = model(inputs(cfg, 2))
    assert torch.isfinite(out.pred).all() and all(torch.isfinite(v) for v in out.aux_losses.values())
    out.pred.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_rollout_shape_and_mode():
    torch.manual_seed(0)
    cfg = tiny(t_ar=2)
    model = build_model(cfg).train()
    x = inputs(cfg, 2)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    y = model.rollout(x, 5, mask)
    assert y.shape == (2, 32, 32, 5, 4) and model.training
    assert (y[0, ..., 2:] == 0).all()  # padded channels stay exactly zero
    # the first two frames are the one-step prediction
    model.eval()
    with torch.no_grad():
        assert torch.allclose(y[:, :, :, :2], model(x, mask).pred)


def test_forced_padding_changes_nothing():
    """The expert-parallel padding path (padded sample groups, valid_N masks) in one process."""
    torch.manual_seed(0)
    cfg = tiny()
    model = build_model(cfg).eval()
    x = inputs(cfg, 3)
    with torch.no_grad():
        ref = model(x)
        for blk in model.blocks:
            blk.moe.pad_to = 5  # > any group size: every called expert gets padding rows
        got = model(x)
    assert torch.allclose(got.pred, ref.pred, atol=1e-5)
    for k in ref.aux_losses:
        assert got.aux_losses[k].item() == pytest.approx(ref.aux_losses[k].item(), rel=1e-5)
    for a, b in zip(got.routing, ref.routing, strict=True):
        assert torch.equal(a.token_counts, b.token_counts)


# static routing's capacity (overflow, drop order, counts) is tested in tests/test_moe.py


def test_dropless_reports_no_dropped_tokens():
    cfg = tiny(depth=1)
    out = build_model(cfg).blocks[0].moe(torch.randn(2, cfg.width, 4, 4))
    assert out.routing.dropped_tokens is None


def _ep_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same weights on both ranks
    cfg = tiny(depth=1, image_experts=4, image_top_k=1)
    moe = build_model(cfg).blocks[0].moe.eval()
    # pretend the token experts are sharded: the dispatch must pad groups to the group-wide maximum
    moe.cfg = dataclasses.replace(moe.cfg, moe=dataclasses.replace(moe.cfg.moe, ep_size=world))
    apply_expert_parallel(moe, dist.group.WORLD)
    sizes: list[tuple[int, int]] = []
    for e, ex in enumerate(moe.experts):
        ex.moe.register_forward_hook(lambda m, a, o, e=e: sizes.append((e, a[0].shape[0])))
    torch.manual_seed(100 + rank)  # different samples (and batch sizes) per rank
    h = torch.randn(2 + 3 * rank, cfg.width, 4, 4)
    with torch.no_grad():
        out = moe(h)
        ep_sizes = list(sizes)
        moe.cfg = dataclasses.replace(moe.cfg, moe=dataclasses.replace(moe.cfg.moe, ep_size=1))
        ref = moe(h)  # same model without padding
    queue.put(
        (rank, ep_sizes, out.routing.image_counts.tolist(), torch.allclose(out.out_BDHW, ref.out_BDHW, atol=1e-5))
    )
    dist.destroy_process_group()


def test_expert_parallel_padding_two_ranks():
    port = free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.spawn(_ep_worker, args=(2, port, q), nprocs=2, join=True)
    res = sorted(q.get() for _ in range(2))
    (_, sizes0, counts0, same0), (_, sizes1, counts1, same1) = res
    assert same0 and same1  # padding does not change the result
    assert counts0 != counts1  # the ranks did route differently
    # identical call sequence on both ranks, each with (group maximum of samples) x 16 tokens rows
    expected = [(e, max(a, b) * 16) for e, (a, b) in enumerate(zip(counts0, counts1, strict=True)) if max(a, b) > 0]
    assert sizes0 == sizes1 == expected


def exact_token_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """The grouped kernel runs exactly the routed rows (the padded one also multiplies its zero padding),
    so FlopCounterMode sees the analytic count."""
    for m in model.modules():
        if isinstance(m, LocalTokenMoE):
            m.kernel = "grouped"
    return model


def test_flops_match_flop_counter_and_reference():
    # model FLOPs count AFNO's transforms as FFTs (5 n log n); with afno_spectral="dft" the counter would also see
    # the DFT matmuls, so the counter comparison runs the FFT islands (the counter does not count FFTs)
    fft = {"afno_spectral": "fft"}
    for preset in ("nestor-tiny", "afno-tiny"):
        torch.manual_seed(0)
        cfg = get_preset(preset, fft)
        model = exact_token_kernels(build_model(cfg))
        x = inputs(cfg, 2)
        model(x)  # warm-up (kernel probes run outside the counter)
        assert measured_flops(model, x) == 2 * forward_flops(cfg)[0], preset
    cfg = get_preset("afno-ti", fft)
    mm, _ = forward_flops(cfg)
    assert abs(mm - 3.77e9) / 3.77e9 < 0.01  # DPOT-Ti measured with FlopCounterMode
    model = build_model(cfg)
    assert measured_flops(model, inputs(cfg, 1)) == mm
    cfg = get_preset("nestor-ti", fft)
    model = exact_token_kernels(build_model(cfg))
    x = inputs(cfg, 1)
    model(x)
    acc = account(cfg)
    assert measured_flops(model, x) == acc.matmul_flops  # 2 of 6 image experts, 2+1 of 6+1 token experts
    assert abs(acc.matmul_flops - 10.75e9) / 10.75e9 < 0.001  # the authors' NESTOR-Ti, FlopCounterMode
    assert acc.flops_per_sample > acc.matmul_flops


def test_predict_residual_starts_from_persistence():
    cfg = tiny(predict_residual=True)
    model = build_model(cfg).eval()
    last_layer = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    torch.nn.init.zeros_(last_layer.weight)
    torch.nn.init.zeros_(last_layer.bias)
    x = torch.randn(2, cfg.resolution, cfg.resolution, cfg.t_in, cfg.in_channels)
    mask = torch.ones(2, cfg.in_channels, dtype=torch.bool)
    mask[1, -1] = False
    with torch.no_grad():
        pred = model(x, mask).pred
    expected = x[..., -1:, :].expand_as(pred) * mask[:, None, None, None, :]
    assert torch.equal(pred, expected)
    with pytest.raises(ValueError, match="predict_residual needs out_channels == in_channels"):
        build_model(tiny(predict_residual=True, out_channels=1))
