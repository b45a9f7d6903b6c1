"""Expert parallelism of the local token-MoE backend (all-to-all-v, nestor_ds.moe.expert_parallel): 2 gloo ranks
with ep_size=2 must equal the single-process local backend on the same global batch (outputs, losses, gradients),
for top-1 and top-2, dropless and static routing, including a batch where one expert gets no token on one rank
and a rank whose rows are all padding; and the static path under torch.compile(fullgraph=True) equals eager.

One launch of `python -m torch.distributed.run --nproc_per_node 2 tests/test_moe_ep.py` runs every case;
rank 0 prints one JSON line of maximum errors that the pytest test checks.
"""

from __future__ import annotations

import json

import pytest
import torch

from train_fixtures import marked_json, run_two_rank_script

D, E, N_RANK = 16, 4, 10  # width, experts, rows per rank


def run_case(
    name: str,
    k: int,
    x_global: torch.Tensor,
    valid_global: torch.Tensor,
    gate=None,
    routing: str = "dropless",
    kernel: str | None = None,
) -> dict:
    """Forward + backward on both ranks (training mode) and on the 1-process reference; returns this rank's errors."""
    import torch.distributed as dist

    from nestor_ds.model.parallelize import apply_expert_parallel
    from nestor_ds.moe import MoEConfig, build_token_moe
    from nestor_ds.moe.expert_parallel import local_state_from_expert_parallel

    rank, world = dist.get_rank(), dist.get_world_size()
    cf = 2.0 * E / k if routing == "static" else None  # capacity = all rows: static must equal dropless
    torch.manual_seed(1234)  # identical reference weights on every rank
    ref = build_token_moe(MoEConfig(num_experts=E, top_k=k, routing=routing, capacity_factor=cf), D).train()
    if gate is not None:
        with torch.no_grad():
            ref.router.gate.weight.copy_(gate)
    torch.manual_seed(1234)  # same seed: the expert-parallel model starts from the same weights
    ep = build_token_moe(
        MoEConfig(num_experts=E, top_k=k, ep_size=world, routing=routing, capacity_factor=cf), D
    ).train()
    assert apply_expert_parallel(ep, dist.group.WORLD) == 1
    ep.kernel = kernel  # None: per device (grouped on CPU at these sizes)
    if gate is not None:
        with torch.no_grad():
            ep.gate_weight.copy_(gate)
    init_same = all(
        torch.equal(ep.state_dict()[n], v) for n, v in _ep_state(ref.state_dict(), ep.ep_rank, world).items()
    )

    g_global = torch.randn(x_global.shape, generator=torch.Generator().manual_seed(7))
    rows = slice(rank * N_RANK, (rank + 1) * N_RANK)
    x, valid, g = x_global[rows], valid_global[rows], g_global[rows]

    out_ref = ref(x_global, valid_global)
    (out_ref.out_ND * g_global).sum().backward()
    out = ep(x, valid)
    (out.out_ND * g + out.lb_loss * 0.0).sum().backward()

    # expert weights live on one rank each: gather every rank's expert grads and rebuild [E, ...]
    grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad).detach() for n, p in ep.named_parameters()}
    every = [None] * world
    dist.all_gather_object(every, grads)
    ep_grads = local_state_from_expert_parallel(every)
    # router and shared expert are replicated (data parallel): the reference grad is the sum over ranks
    for n in ("router.gate.weight", *[n for n in ep_grads if n.startswith("shared.")]):
        ep_name = "moe.deepspeed_moe.gate.wg.weight" if n.startswith("router.") else n
        ep_grads[n] = sum(state[ep_name] for state in every)
    grad_errs = {n: (p.grad - ep_grads[n]).abs().max().item() for n, p in ref.named_parameters()}

    per_rank_ref = ref(x, valid)  # statistics are per rank
    return {
        "case": name,
        "kernel": kernel,
        "rank": rank,
        "init_same": init_same,
        "valid_rows": int(valid.sum()),
        "counts": out.tokens_per_expert_E.tolist(),
        "dropped": None if out.dropped is None else int(out.dropped),
        "out_err": (out.out_ND - out_ref.out_ND[rows]).abs().max().item(),
        "grad_err": max(grad_errs.values()),
        "lb_err": abs(out.lb_loss.item() - per_rank_ref.lb_loss.item()),
        "z_err": abs(out.z_loss.item() - per_rank_ref.z_loss.item()),
        "counts_equal": out.tokens_per_expert_E.tolist() == per_rank_ref.tokens_per_expert_E.tolist(),
        "finite": bool(torch.isfinite(out.out_ND).all() and torch.isfinite(out.lb_loss)),
    }


def compiled_static_case() -> dict:
    """The static expert-parallel MoE under torch.compile(fullgraph=True): the exchange is PyTorch's functional
    collective, so the forward and backward trace as one graph each; outputs and gradients equal eager's."""
    import torch.distributed as dist

    from nestor_ds.model.parallelize import apply_expert_parallel
    from nestor_ds.moe import MoEConfig, build_token_moe

    rank = dist.get_rank()
    torch.manual_seed(1234)
    ep = build_token_moe(MoEConfig(num_experts=E, top_k=2, ep_size=2, routing="static", capacity_factor=1.5), D)
    apply_expert_parallel(ep.train(), dist.group.WORLD)
    x = torch.randn(N_RANK, D, generator=torch.Generator().manual_seed(50 + rank))
    valid = torch.arange(N_RANK) < (N_RANK if rank == 0 else 6)  # padding on rank 1 only
    g = torch.randn(N_RANK, D, generator=torch.Generator().manual_seed(60 + rank))

    def step(module):
        for p in ep.parameters():
            p.grad = None
        out = module(x, valid)
        (out.out_ND * g).sum().add(out.lb_loss + out.z_loss).backward()
        return out.out_ND.detach(), {n: p.grad.clone() for n, p in ep.named_parameters()}

    eager_out, eager_grads = step(ep)
    compiled_out, compiled_grads = step(torch.compile(ep, fullgraph=True))
    return {
        "rank": rank,
        "out_err": (compiled_out - eager_out).abs().max().item(),
        "grad_err": max((compiled_grads[n] - eager_grads[n]).abs().max().item() for n in eager_grads),
    }


def _ep_state(local_state, ep_rank, ep_size):
    from nestor_ds.moe.expert_parallel import expert_parallel_state_from_local

    return expert_parallel_state_from_local(local_state, ep_rank, ep_size)


CASES = ("random", "empty_expert_on_rank1", "padding_rank1_empty")
# dropless runs each kernel: grouped keeps the received rows in arrival order, padded moves them to expert-major chunks
ROUTINGS = (("dropless", "grouped"), ("dropless", "padded"), ("static", None))


def worker() -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo")
    n_global = N_RANK * dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    all_valid = torch.ones(n_global, dtype=torch.bool)
    x_random = torch.randn(n_global, D, generator=gen)
    # gate = identity on the first E dims; rank 1's rows have a large negative dim 0: expert 0 is
    # never chosen there, so rank 1 sends no token to expert 0 (held by rank 0)
    gate = torch.zeros(E, D)
    gate[:, :E] = 3 * torch.eye(E)
    x_empty = torch.randn(n_global, D, generator=gen)
    x_empty[N_RANK:, 0] = -5.0
    # unequal valid rows at equal N: rank 0 keeps 7 of 10, rank 1 is all padding
    valid = all_valid.clone()
    valid[7:N_RANK] = False
    valid[N_RANK:] = False
    x_pad = torch.randn(n_global, D, generator=gen)
    x_pad[~valid] = 0.0
    results = []
    for routing, kernel in ROUTINGS:
        for k in (1, 2):
            opts = {"routing": routing, "kernel": kernel}
            results.append(run_case(f"random/k{k}/{routing}", k, x_random, all_valid, **opts))
            results.append(run_case(f"empty_expert_on_rank1/k{k}/{routing}", k, x_empty, all_valid, gate=gate, **opts))
            results.append(run_case(f"padding_rank1_empty/k{k}/{routing}", k, x_pad, valid, **opts))

    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, results)
    compiled = [None] * dist.get_world_size()
    dist.all_gather_object(compiled, compiled_static_case())
    if dist.get_rank() == 0:
        print("EP_RESULT " + json.dumps([r for rank_results in everything for r in rank_results]), flush=True)
        print("EP_COMPILED " + json.dumps(compiled), flush=True)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(900)
def test_ep2_equals_single_process(tmp_path):
    proc = run_two_rank_script(__file__, tmp_path)
    results = marked_json(proc.stdout, "EP_RESULT ")
    assert proc.returncode == 0 and results, (proc.stdout[-2000:], proc.stderr[-4000:])
    compiled = marked_json(proc.stdout, "EP_COMPILED ")
    assert [c["rank"] for c in compiled] == [0, 1]
    assert all(c["out_err"] < 1e-5 and c["grad_err"] < 1e-5 for c in compiled), compiled
    assert len(results) == 2 * 2 * len(ROUTINGS) * len(CASES)
    for r in results:
        assert r["init_same"], r  # ep 2 starts from the ep 1 weights
        assert r["out_err"] < 1e-5 and r["grad_err"] < 1e-5, r
        assert r["lb_err"] < 1e-5 and r["z_err"] < 1e-5 and r["counts_equal"] and r["finite"], r
        assert r["dropped"] == (0 if r["case"].endswith("static") else None), r
    by = {(r["case"], r["kernel"], r["rank"]): r for r in results}
    for k in (1, 2):
        for routing, kernel in ROUTINGS:
            case = f"empty_expert_on_rank1/k{k}/{routing}"
            empty = by[(case, kernel, 1)]["counts"][0] == 0 and by[(case, kernel, 0)]["counts"][0] > 0
            assert empty  # really an empty expert
            case = f"padding_rank1_empty/k{k}/{routing}"
            assert by[(case, kernel, 1)]["valid_rows"] == 0 and by[(case, kernel, 1)]["counts"] == [0] * E


@pytest.mark.parametrize("rows_per_group", [1, 200])  # few rows: permuted to expert-major; many: weights repeated
def test_received_groups_run_with_their_experts_weights(rows_per_group):
    """run_arrival_groups (pure compute, one process): group (p, x) of the received rows goes through expert x, in
    both grouped layouts, outputs and gradients equal to running each group through its expert on its own."""
    from nestor_ds.moe.expert_parallel import run_arrival_groups

    P, X, F = 2, 3, 8
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([rows_per_group, 0, 2 * rows_per_group, rows_per_group, rows_per_group + 1, 3])  # (p, x)
    x = torch.randn(int(sizes.sum()), D, generator=gen, requires_grad=True)
    w = [torch.randn(X, F, D, generator=gen), torch.randn(X, F, D, generator=gen), torch.randn(X, D, F, generator=gen)]
    w = [t.requires_grad_() for t in w]
    g = torch.randn(x.shape, generator=gen)
    y = run_arrival_groups(x, sizes, tuple(w), P, "grouped")
    grads = torch.autograd.grad((y * g).sum(), [x, *w])

    def expert(i, rows):
        return (torch.nn.functional.silu(rows @ w[0][i].T) * (rows @ w[1][i].T)) @ w[2][i].T

    pieces, start = [], 0
    for group, n in enumerate(sizes.tolist()):
        pieces.append(expert(group % X, x[start : start + n]))
        start += n
    ref = torch.cat(pieces)
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, *w])
    assert torch.allclose(y, ref, atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-3) for a, b in zip(grads, ref_grads, strict=True))


if __name__ == "__main__":
    worker()
