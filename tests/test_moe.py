"""Token-level Sub-MoE (nestor_ds.moe), single process: kernels, routing, losses, padding, static routing (also
inside NESTOR: equality with dropless, overflow, graph breaks), the expert-parallel layout. Two ranks:
tests/test_moe_ep.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nestor_ds.moe import LocalTokenMoE, MoEConfig, build_token_moe, expert_load_stats, grouped_mm_supported
from nestor_ds.moe.dispatch import dispatch_rows, gather_rows, plan_capacity
from nestor_ds.moe.experts import chunk_rows

D, F_HID, E, K = 16, 16, 4, 2  # 16 fp32 = 64 bytes: grouped_mm runs on CPU


def make_moe(seed: int = 0, **kw) -> LocalTokenMoE:
    torch.manual_seed(seed)
    cfg = MoEConfig(**{"num_experts": E, "top_k": K, "num_shared_experts": 1, **kw})
    return build_token_moe(cfg, D)


def swiglu(x, w1, w3, w2):
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def naive_forward(moe: LocalTokenMoE, x_ND: torch.Tensor) -> torch.Tensor:
    """out_n = sum_k w_nk Expert_{e_nk}(x_n) + Shared(x_n), token by token, straight from the math."""
    probs = torch.softmax(x_ND @ moe.router.gate.weight.T, dim=-1)
    rows = []
    for n in range(x_ND.shape[0]):
        top_p, top_e = probs[n].topk(moe.top_k)
        w = top_p / top_p.sum()
        y = sum(
            w[j] * swiglu(x_ND[n], moe.experts.w1_EFD[e], moe.experts.w3_EFD[e], moe.experts.w2_EDF[e])
            for j, e in enumerate(top_e.tolist())
        )
        rows.append(y + moe.shared(x_ND[n]))
    return torch.stack(rows)


def test_grouped_mm_available_on_cpu_for_aligned_sizes():
    assert grouped_mm_supported(torch.device("cpu"), torch.float32, D, F_HID)
    assert not grouped_mm_supported(torch.device("cpu"), torch.float32, 15, F_HID)  # 60-byte rows
    assert not grouped_mm_supported(torch.device("cpu"), torch.float64, D, F_HID)


@pytest.mark.parametrize("kernel", ["grouped", "padded"])
def test_output_shapes_and_matches_naive_math(kernel):
    moe = make_moe()
    moe.kernel = kernel
    x = torch.randn(13, D)
    out = moe(x)
    assert out.out_ND.shape == (13, D) and out.out_ND.dtype == torch.float32
    assert out.lb_loss.shape == () and out.z_loss.shape == ()
    assert out.tokens_per_expert_E.shape == (E,) and out.tokens_per_expert_E.dtype == torch.long
    assert int(out.tokens_per_expert_E.sum()) == 13 * K
    torch.testing.assert_close(out.out_ND, naive_forward(moe, x), atol=1e-5, rtol=1e-5)


def test_chunk_rows_splits_skewed_loads_and_keeps_balanced_ones_whole():
    assert chunk_rows([224, 236, 207, 228, 236, 235]) == 240  # balanced: one chunk per expert
    c = chunk_rows([136, 514, 143, 824, 1612, 867])  # skewed (a router at init)
    assert c % 8 == 0 and c < 1612
    assert sum(-(-n // c) for n in [136, 514, 143, 824, 1612, 867]) * c < 1.3 * 4096  # < 30% padding


def test_padded_kernel_with_several_chunks_per_expert_matches_grouped_in_value_and_gradient():
    """A skewed router (one expert takes most tokens) makes the padded kernel split experts into chunks."""
    outs = {}
    for kernel in ("grouped", "padded"):
        moe = make_moe(seed=3)
        with torch.no_grad():
            moe.router.gate.weight[0] += 3.0 * moe.router.gate.weight[1:].abs().sum(0)  # favour expert 0
        moe.kernel = kernel
        x = torch.randn(600, D, generator=torch.Generator().manual_seed(0)).abs()
        out = moe(x)
        (out.out_ND * torch.linspace(-1, 1, D)).sum().backward()
        outs[kernel] = (out.out_ND, {n: p.grad for n, p in moe.named_parameters()}, out.tokens_per_expert_E)
    counts = outs["padded"][2].tolist()
    assert max(counts) > chunk_rows(counts), counts  # expert 0 really is split
    torch.testing.assert_close(outs["padded"][0], outs["grouped"][0], atol=1e-5, rtol=1e-5)
    for name, g in outs["grouped"][1].items():
        torch.testing.assert_close(outs["padded"][1][name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_dispatch_and_gather_rows_match_index_select_in_value_and_gradient():
    """The gather-both-ways helpers compute what index_select / index_add would, gradients included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    slot = torch.randperm(12, generator=g)[:10].view(5, 2)  # 10 of 12 rows used, 2 stay zero
    buf = dispatch_rows(x, slot, 12)
    ref = torch.zeros(12, 3, dtype=torch.float64).index_put((slot.reshape(-1),), x.repeat_interleave(2, 0))
    torch.testing.assert_close(buf, ref)
    torch.testing.assert_close(gather_rows(buf, slot), x.unsqueeze(1).expand(5, 2, 3))
    assert torch.autograd.gradcheck(lambda t: dispatch_rows(t, slot, 12), (x,))
    assert torch.autograd.gradcheck(
        lambda t: gather_rows(t, slot), (torch.randn(12, 3, dtype=torch.float64, requires_grad=True),)
    )


def test_default_kernel_per_device_and_padded_fallback_for_float64():
    moe = make_moe()
    assert moe.experts.default_kernel(torch.zeros(1, D)) == "grouped"  # CPU fp32, aligned rows
    assert moe.experts.default_kernel(torch.zeros(1, D, dtype=torch.float64)) == "padded"
    moe = moe.double()
    x = torch.randn(13, D, dtype=torch.float64)
    torch.testing.assert_close(moe(x).out_ND, naive_forward(moe, x))


def test_weights_initialised_and_finite():
    moe = make_moe(mlp_ratio=2.0)
    for name, p in moe.named_parameters():
        assert torch.isfinite(p).all() and p.abs().max() > 0, name
    assert moe.experts.w1_EFD.shape == (E, 2 * D, D) and moe.experts.w2_EDF.shape == (E, D, 2 * D)
    # experts differ from each other (independent init, not copies)
    assert not torch.equal(moe.experts.w1_EFD[0], moe.experts.w1_EFD[1])


def test_bf16_forward_is_finite():
    moe = make_moe().to(torch.bfloat16)
    out = moe(torch.randn(9, D, dtype=torch.bfloat16))
    assert out.out_ND.dtype == torch.bfloat16 and torch.isfinite(out.out_ND.float()).all()


@pytest.mark.parametrize("kernel", ["grouped", "padded"])
def test_gradients_reach_only_selected_experts(kernel):
    moe = make_moe(seed=1)
    moe.kernel = kernel
    x = torch.randn(3, D)
    with torch.no_grad():
        chosen = torch.softmax(x @ moe.router.gate.weight.T, -1).topk(K).indices
    used = set(chosen.flatten().tolist())
    assert len(used) < E, "need an unselected expert for this test; change the seed"
    out = moe(x)
    (out.out_ND * torch.randn_like(out.out_ND)).sum().backward()
    for e in range(E):
        grads = [moe.experts.w1_EFD.grad[e], moe.experts.w3_EFD.grad[e], moe.experts.w2_EDF.grad[e]]
        if e in used:
            assert all(g.abs().sum() > 0 for g in grads), e
        else:
            assert all(torch.count_nonzero(g) == 0 for g in grads), e
    assert all(p.grad.abs().sum() > 0 for p in moe.shared.parameters())  # shared expert sees every token
    assert moe.router.gate.weight.grad.abs().sum() > 0  # router learns through the renormalised weights
    assert out.tokens_per_expert_E.tolist() == torch.bincount(chosen.flatten(), minlength=E).tolist()


def hand_routed_moe() -> tuple[LocalTokenMoE, torch.Tensor, list[list[int]], list[list[float]]]:
    """Gate = identity on the first E dims, tokens a*e_i + b*e_j (a > b > 0): token routes to (i, j)."""
    moe = make_moe()
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[:, :E] = torch.eye(E)
    pairs = [(0, 1), (0, 2), (0, 1), (3, 0), (2, 1)]
    a, b = 2.0, 1.0
    x = torch.zeros(len(pairs), D)
    for n, (i, j) in enumerate(pairs):
        x[n, i], x[n, j] = a, b
    logits = [[a if e == i else b if e == j else 0.0 for e in range(E)] for i, j in pairs]
    return moe, x, [list(p) for p in pairs], logits


def test_load_balancing_loss_on_hand_built_routing():
    moe, x, pairs, logits = hand_routed_moe()
    out = moe(x)
    n = len(pairs)
    f = [sum(p.count(e) for p in pairs) / (K * n) for e in range(E)]  # [4, 3, 2, 1] / 10
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    P = [sum(row[e] for row in probs) / n for e in range(E)]
    expected = E * sum(fi * pi for fi, pi in zip(f, P, strict=True))
    assert out.tokens_per_expert_E.tolist() == [4, 3, 2, 1]
    assert out.lb_loss.item() == pytest.approx(expected, rel=1e-6)


def test_uniform_routing_gives_lb_loss_one():
    moe = make_moe()
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[:, :E] = torch.eye(E) * 1e-3  # nearly uniform probabilities
    x = torch.zeros(E, D)
    x[:, :E] = torch.eye(E) * 3 + torch.roll(torch.eye(E), 1, dims=1)  # each expert first once, second once
    assert moe(x).lb_loss.item() == pytest.approx(1.0, abs=1e-3)


def test_z_loss_formula():
    moe, x, _, logits = hand_routed_moe()
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / len(logits)
    assert moe(x).z_loss.item() == pytest.approx(expected, rel=1e-6)


def test_top1_weight_is_renormalised_to_one():
    moe = make_moe(top_k=1, num_shared_experts=0)
    x = torch.randn(5, D)
    e = torch.softmax(x @ moe.router.gate.weight.T, -1).argmax(-1)
    expected = torch.stack(
        [swiglu(x[n], moe.experts.w1_EFD[e[n]], moe.experts.w3_EFD[e[n]], moe.experts.w2_EDF[e[n]]) for n in range(5)]
    )
    torch.testing.assert_close(moe(x).out_ND, expected, atol=1e-5, rtol=1e-5)


def test_padding_rows_are_excluded():
    moe = make_moe(seed=3)
    x = torch.randn(12, D)
    valid = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0], dtype=torch.bool)
    x_padded = x.clone()
    x_padded[~valid] = 1e3  # garbage in padding must not leak anywhere
    full, only = moe(x_padded, valid), moe(x[valid])
    torch.testing.assert_close(full.out_ND[valid], only.out_ND)
    assert torch.count_nonzero(full.out_ND[~valid]) == 0
    torch.testing.assert_close(full.lb_loss, only.lb_loss)
    torch.testing.assert_close(full.z_loss, only.z_loss)
    assert full.tokens_per_expert_E.tolist() == only.tokens_per_expert_E.tolist()


def test_all_padding_gives_zero_losses_and_counts():
    moe = make_moe()
    x = torch.randn(4, D, requires_grad=True)
    out = moe(x, torch.zeros(4, dtype=torch.bool))
    assert out.lb_loss.item() == 0.0 and out.z_loss.item() == 0.0
    assert out.tokens_per_expert_E.tolist() == [0] * E and torch.count_nonzero(out.out_ND) == 0
    (out.out_ND.sum() + out.lb_loss + out.z_loss).backward()  # graph stays usable, no NaN
    assert torch.isfinite(x.grad).all()


def test_router_noise_only_in_training():
    moe = make_moe(router_noise=5.0)
    x = torch.randn(64, D)
    moe.eval()
    a, b = moe(x), moe(x)
    torch.testing.assert_close(a.out_ND, b.out_ND)
    moe.train()
    torch.manual_seed(0)
    assert moe(x).tokens_per_expert_E.tolist() != a.tokens_per_expert_E.tolist() or not torch.allclose(
        moe(x).out_ND, a.out_ND
    )


def test_bad_input_and_config_errors():
    moe = make_moe()
    with pytest.raises(ValueError, match=r"x_ND must be \[N, 16\]"):
        moe(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match="valid_N must be a bool tensor"):
        moe(torch.randn(3, D), torch.ones(3))
    # each bad config must fail for its own reason: the whole message, not just the section name every one has
    for bad, message in [
        (dict(backend="tutel"), "moe.backend='tutel': expected one of ('local', 'megablocks')"),
        (dict(top_k=7), "moe.top_k=7: must be in [1, num_experts=6]"),
        (
            dict(backend="megablocks", ep_size=2),
            "moe.ep_size=2: moe.backend='megablocks' has no expert parallelism; use moe.backend='local'",
        ),
        (dict(capacity_factor=1.0), "moe.capacity_factor=1.0 is used only by moe.routing='static'"),
        (dict(routing="bucketed"), "moe.routing='bucketed': expected one of ('dropless', 'static')"),
        (dict(routing="static", capacity_factor=0.0), "moe.capacity_factor=0.0: must be > 0 with moe.routing='static'"),
        (dict(num_experts=6, ep_size=4), "moe.ep_size=4: must be >= 1 and divide num_experts=6"),
        (dict(mlp_ratio=0.0), "moe.mlp_ratio=0.0: must be > 0"),
        (dict(backend="megablocks", router_noise=0.1), "moe.router_noise > 0 is not supported by moe.backend="),
        (dict(backend="megablocks", routing="static"), "moe.routing='static' is not supported by moe.backend="),
    ]:
        with pytest.raises(ValueError) as err:
            MoEConfig(**bad).validate()
        assert str(err.value).startswith(message), (bad, str(err.value))


# ---- static routing (fixed capacity per expert, no data-dependent shapes) ----


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient; an unused one (None: dropless never called that expert) counts as zero, as in
    the optimizer step (static routing calls every expert, so it gets an exact zero there)."""
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("top_k", [1, 2])
def test_static_equals_dropless_without_overflow_including_padding(top_k):
    x = torch.randn(24, D)
    valid = torch.rand(24, generator=torch.Generator().manual_seed(1)) > 0.3
    x[~valid] = 1e3  # garbage in padding rows must not leak
    results = []
    for routing in ("dropless", "static"):
        moe = make_moe(seed=2, top_k=top_k, routing=routing, capacity_factor=E / top_k if routing == "static" else None)
        moe.train()  # static routing applies in training
        xi = x.clone().requires_grad_(True)
        out = moe(xi, valid)
        (out.out_ND.square().sum() + out.lb_loss + out.z_loss).backward()
        results.append((out, xi.grad, _grads(moe)))
    (a, gxa, ga), (b, gxb, gb) = results
    assert b.dropped is not None and int(b.dropped) == 0 and a.dropped is None
    torch.testing.assert_close(b.out_ND, a.out_ND, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.lb_loss, a.lb_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.z_loss, a.z_loss, atol=1e-6, rtol=1e-5)
    assert b.tokens_per_expert_E.tolist() == a.tokens_per_expert_E.tolist()
    torch.testing.assert_close(gxb, gxa, atol=1e-5, rtol=1e-5)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-5, rtol=1e-5, msg=n)


def test_static_overflow_drops_lowest_weight_first_and_counts():
    moe = make_moe(seed=4, top_k=1, num_shared_experts=0, routing="static", capacity_factor=0.5).train()
    x = torch.randn(40, D)
    valid = torch.ones(40, dtype=torch.bool)
    valid[-4:] = False  # padding never takes a row
    C = moe.cfg.capacity(40)
    assert C == 8  # ceil(0.5 * 40 * 1 / 4) = 5, rounded up to 8
    with torch.no_grad():
        out = moe(x, valid)
        r = moe.router(x)
    e_N = r.experts_NK[:, 0]
    probs_N = torch.softmax(x @ moe.router.gate.weight.T, -1).max(-1).values.detach()
    kept_N = out.out_ND.abs().amax(1) > 0
    expected_kept = torch.zeros(40, dtype=torch.bool)
    for e in range(E):
        members = [n for n in range(36) if int(e_N[n]) == e]
        members.sort(key=lambda n: -float(probs_N[n]))  # priority: the router probability
        expected_kept[members[:C]] = True
    assert int(expected_kept.sum()) < 36  # some expert overflowed
    assert kept_N.tolist() == expected_kept.tolist()
    assert int(out.dropped) == 36 - int(kept_N.sum())
    assert out.tokens_per_expert_E.tolist() == [int((e_N[:36] == e).sum()) for e in range(E)]


def test_plan_capacity_keeps_highest_weights_and_ignores_padding():
    expert_A = torch.tensor([0, 0, 1, 0, 1, 0, 0])
    weight_A = torch.tensor([0.2, 0.9, 0.5, 0.7, 0.6, 0.95, 0.1])
    valid_A = torch.tensor([True, True, True, True, True, False, True])
    plan = plan_capacity(expert_A, weight_A, valid_A, num_experts=3, cap=2)
    # expert 0 valid: weights 0.2, 0.9, 0.7, 0.1 -> keeps 0.9 (row 0), 0.7 (row 1); the 0.95 is padding
    assert plan.keep_A.tolist() == [False, True, True, True, True, False, False]
    assert plan.slot_A.tolist() == [6, 0, 3, 1, 2, 6, 6]  # expert*C + position; 6 = E*C = the drop row
    assert plan.kept_E.tolist() == [2, 2, 0] and plan.routed_E.tolist() == [4, 2, 0]
    assert int(plan.dropped) == 2 and plan.rows == 7


def test_capacity_is_rounded_to_eight_and_bounded_by_rows():
    cfg = MoEConfig(num_experts=6, top_k=2, routing="static", capacity_factor=1.25)
    assert cfg.capacity(256) == 112  # ceil(1.25 * 256 * 2 / 6) = 107 -> 112
    assert cfg.capacity(5) == 5 and cfg.capacity(0) == 0  # never more rows than the call has


def test_removed_deepspeed_backend_name_runs_local():
    """Configs and checkpoints of the removed deepspeed backend keep working: same parameter layout as local's
    expert-parallel path."""
    assert MoEConfig(backend="deepspeed", ep_size=2).validate().backend == "local"


def test_expert_load_stats():
    uniform = expert_load_stats(torch.tensor([5, 5, 5, 5]))
    assert uniform["entropy_norm"] == pytest.approx(1.0) and uniform["max_share"] == uniform["min_share"] == 0.25
    skewed = expert_load_stats(torch.tensor([10, 0, 0, 0]))
    assert skewed["entropy"] == pytest.approx(0.0) and skewed["max_share"] == 1.0 and skewed["min_share"] == 0.0


def test_megablocks_backend_missing_names_requirements_file():
    try:
        import megablocks  # noqa: F401

        pytest.skip("megablocks is installed: checked by tools/gpu_check_moe.py")
    except Exception:
        pass
    with pytest.raises(RuntimeError, match="pip install -r requirements-gpu.txt"):
        build_token_moe(MoEConfig(backend="megablocks"), D)


# ---------------------------------------------------------------- expert-parallel layout (one process)


def test_expert_parallel_layout_tags_roundtrip_and_group_required():
    """The ep 2 module on each rank holds its slice of the ep 1 weights under DeepSpeed-MoE's names and tags (what
    DeepSpeed's engine needs for MoE gradient groups and per-expert checkpoint files); the layout converts back."""
    from nestor_ds.moe.expert_parallel import (
        ExpertParallelTokenMoE,
        expert_parallel_state_from_local,
        local_state_from_expert_parallel,
    )

    local = make_moe(seed=5)
    torch.manual_seed(5)
    ep = build_token_moe(MoEConfig(num_experts=E, top_k=K, num_shared_experts=1, ep_size=2), D)
    assert isinstance(ep, ExpertParallelTokenMoE) and ep.ep_rank == 0 and ep.local_experts == E // 2
    assert all(
        torch.equal(ep.state_dict()[k], v)
        for k, v in expert_parallel_state_from_local(local.state_dict(), 0, 2).items()
    )  # same seed: the ep 1 weights, rank 0's slice
    experts = [p for n, p in ep.named_parameters() if "deepspeed_experts" in n]
    assert len(experts) == 3 * E // 2 and all(p.allreduce is False and p.group_name == "ep_size_2" for p in experts)
    assert all(not hasattr(p, "allreduce") for n, p in ep.named_parameters() if "deepspeed_experts" not in n)
    from deepspeed.moe.layer import MoE

    assert isinstance(ep.moe, MoE)  # what DeepSpeed's engine looks for
    states = [expert_parallel_state_from_local(local.state_dict(), r, 2) for r in range(2)]
    back = local_state_from_expert_parallel(states)
    assert back.keys() == local.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in local.state_dict().items())
    with pytest.raises(RuntimeError, match="apply_expert_parallel"):
        ep(torch.randn(3, D))


# ---- static routing inside NESTOR (both MoE levels) ----


def _tiny_nestor(image_routing: str = "dropless", routing: str = "dropless", image_cf=None, token_cf=None, **over):
    from nestor_ds.model import build_model, get_preset

    moe = {"routing": routing, "capacity_factor": token_cf}
    cfg = get_preset(
        "nestor-tiny", {"image_routing": image_routing, "image_capacity_factor": image_cf, "moe": moe, **over}
    )
    torch.manual_seed(0)
    return build_model(cfg).train(), cfg


def _nestor_inputs(cfg, batch: int = 5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.resolution, cfg.resolution, cfg.t_in, cfg.in_channels, generator=g)
    y = torch.randn(batch, cfg.resolution, cfg.resolution, cfg.t_ar, cfg.c_out, generator=g)
    return x, y, torch.ones(batch, cfg.c_out, dtype=torch.bool)


def _nestor_loss(model, x, y, mask):
    from nestor_ds.config import LossConfig
    from nestor_ds.engine.loss import training_loss

    out = model(x)
    loss, _ = training_loss(out.pred, y, mask, out.aux_losses, LossConfig(token_z_weight=1e-3))
    return loss, out


def test_nestor_static_equals_dropless_at_both_levels_without_overflow():
    runs = []
    for level in ("dropless", "static"):
        cf = 10.0 if level == "static" else None  # capacities = all rows: nothing overflows
        model, cfg = _tiny_nestor(level, level, image_cf=cf, token_cf=cf)
        x, y, mask = _nestor_inputs(cfg)
        loss, out = _nestor_loss(model, x, y, mask)
        loss.backward()
        runs.append((loss, out, _grads(model)))
    (la, oa, ga), (lb, ob, gb) = runs
    torch.testing.assert_close(ob.pred, oa.pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lb, la, atol=1e-6, rtol=1e-5)
    for k in oa.aux_losses:
        torch.testing.assert_close(ob.aux_losses[k], oa.aux_losses[k], atol=1e-6, rtol=1e-5, msg=k)
    for ra, rb in zip(oa.routing, ob.routing, strict=True):
        assert torch.equal(ra.token_counts, rb.token_counts) and torch.equal(ra.image_counts, rb.image_counts)
        assert ra.dropped_tokens is None and int(rb.dropped_tokens) == 0
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-5, rtol=1e-5, msg=n)


def test_nestor_static_forward_and_loss_trace_without_graph_breaks():
    model, cfg = _tiny_nestor("static", "static")
    x, y, mask = _nestor_inputs(cfg, batch=4)
    explain = torch._dynamo.explain(lambda a, b, c: _nestor_loss(model, a, b, c)[0])(x, y, mask)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    torch._dynamo.reset()


def test_nestor_static_compiles_fullgraph_forward_and_backward():
    """aot_eager traces the backward too (custom autograd functions, capacity plan): one graph, same gradients."""
    model, cfg = _tiny_nestor("static", "static", depth=1)
    x, y, mask = _nestor_inputs(cfg, batch=4)
    loss_eager, _ = _nestor_loss(model, x, y, mask)
    loss_eager.backward()
    eager = _grads(model)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(lambda a, b, c: _nestor_loss(model, a, b, c)[0], fullgraph=True, backend="aot_eager")
    loss = compiled(x, y, mask)
    loss.backward()
    torch.testing.assert_close(loss, loss_eager, atol=1e-6, rtol=1e-5)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, eager[n], atol=1e-5, rtol=1e-5, msg=n)
    torch._dynamo.reset()


def test_image_static_overflow_drops_lowest_probability_samples_and_counts_them():
    model, cfg = _tiny_nestor("static", "dropless", image_cf=0.5, depth=1, image_experts=2, image_top_k=1)
    moe = model.blocks[0].moe  # capacity ceil(0.5 * 1 * 6 / 2) = 2 samples
    h = torch.randn(6, cfg.width, 4, 4)
    with torch.no_grad():
        out = moe(h)
        r = moe.route(h)
    base = (moe.shared(h) if moe.shared is not None else 0) + h
    kept = ((out.out_BDHW - base).flatten(1).abs().amax(1) > 0).tolist()
    p = r.probs_NE.max(-1).values
    expected = [False] * 6
    for e in range(2):
        members = sorted((n for n in range(6) if int(r.experts_NK[n, 0]) == e), key=lambda n: -float(p[n]))
        for n in members[:2]:
            expected[n] = True
    assert kept == expected and sum(expected) < 6
    assert int(out.routing.dropped_tokens) == (6 - sum(expected)) * 16  # dropped samples x 4x4 tokens
    moe.eval()  # evaluation never drops
    with torch.no_grad():
        assert moe(h).routing.dropped_tokens is None
