"""One token exchange per NESTOR block under expert parallelism (nestor_ds.moe.expert_parallel.exchange_token_moes):
an ImageMoE whose token MoEs are sharded over 2 gloo ranks must equal the single-process ImageMoE on each rank's own
samples (outputs, token losses, token counts, gradients), with different batch sizes per rank and an image expert
that gets no sample on one rank, for token top-1 and top-2, and must not call the token MoEs one by one.

One launch of `python -m torch.distributed.run --nproc_per_node 2 tests/test_image_moe_ep.py` runs every case;
rank 0 prints one JSON line that the pytest test checks.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from train_fixtures import marked_json, run_two_rank_script

SAMPLES = (3, 5)  # per rank
WIDTH, GRID, IMAGE_EXPERTS = 16, 4, 4


def _block(ep_size: int, token_top_k: int):
    from nestor_ds.model import build_model, get_preset

    cfg = get_preset("nestor-tiny", {"width": WIDTH, "depth": 1, "image_experts": IMAGE_EXPERTS, "image_top_k": 2})
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=4, top_k=token_top_k, ep_size=ep_size))
    torch.manual_seed(0)  # the same weights at every ep_size (the expert-parallel MoE draws as the local one)
    moe = build_model(cfg).blocks[0].moe.train()
    with torch.no_grad():  # image expert 0 scores dim 0 of the pooled input: never chosen for rank 1's samples
        moe.router.weight.zero_()
        moe.router.bias.zero_()
        moe.router.weight[0, 0] = 10.0
    return moe


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    hs = [torch.randn(n, WIDTH, GRID, GRID, generator=gen) for n in SAMPLES]
    hs[0][:, 0] += 1.0  # rank 0: expert 0 wins
    hs[1][:, 0] -= 1.0  # rank 1: expert 0 loses
    return hs


def _loss(out, g: torch.Tensor) -> torch.Tensor:
    return (out.out_BDHW * g).sum() + out.token_lb + out.token_z


def run_case(token_top_k: int) -> dict:
    import torch.distributed as dist

    from nestor_ds.model.parallelize import apply_expert_parallel
    from nestor_ds.moe.expert_parallel import ExpertParallelTokenMoE, local_state_from_expert_parallel

    rank = dist.get_rank()
    hs = _batches()
    gs = [torch.randn(h.shape, generator=torch.Generator().manual_seed(11 + i)) for i, h in enumerate(hs)]

    ref = _block(1, token_top_k)  # one process: each rank's samples on their own, losses summed
    ref_outs = [ref(h) for h in hs]
    sum(_loss(o, g) for o, g in zip(ref_outs, gs, strict=True)).backward()

    ep = _block(2, token_top_k)
    apply_expert_parallel(ep, dist.group.WORLD)
    per_call = []
    for ex in ep.experts:
        ex.moe.register_forward_hook(lambda m, a, o: per_call.append(a[0].shape[0]))
    out = ep(hs[rank])
    _loss(out, gs[rank]).backward()

    # replicated parameters: the engine averages their gradients; here the sum over ranks equals the summed losses'
    errors = {"out": (out.out_BDHW - ref_outs[rank].out_BDHW).abs().max().item()}
    errors["token_lb"] = abs(out.token_lb.item() - ref_outs[rank].token_lb.item())
    errors["token_z"] = abs(out.token_z.item() - ref_outs[rank].token_z.item())
    grad_err = 0.0
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for ex, ref_ex in zip(ep.experts, ref.experts, strict=True):
        assert isinstance(ex.moe, ExpertParallelTokenMoE)
        # this rank's experts, under global names, against the reference's gradients of the same experts
        local_grads = local_state_from_expert_parallel(
            [{n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in ex.moe.named_parameters()}]
        )
        ref_moe = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in ref_ex.moe.named_parameters()}
        held = slice(rank * 2, rank * 2 + 2)  # 4 token experts, 2 per rank
        for w in ("experts.w1_EFD", "experts.w3_EFD", "experts.w2_EDF"):
            grad_err = max(grad_err, (local_grads[w] - ref_moe[w][held]).abs().max().item())
    for n, p in ep.named_parameters():
        if "deepspeed_experts" in n:
            continue
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        ref_name = n.replace("moe.deepspeed_moe.gate.wg.weight", "router.gate.weight")
        ref_g = ref_grads[ref_name] if ref_grads[ref_name] is not None else torch.zeros_like(p)
        grad_err = max(grad_err, (g - ref_g).abs().max().item())
    errors["grad"] = grad_err
    return {
        "k": token_top_k,
        "rank": rank,
        "errors": errors,
        "image_counts": out.routing.image_counts.tolist(),
        "token_counts_equal": torch.equal(out.routing.token_counts, ref_outs[rank].routing.token_counts),
        "per_call": per_call,
    }


def worker() -> None:
    import deepspeed
    import torch.distributed as dist

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    results = [run_case(k) for k in (1, 2)]
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, results)
    if dist.get_rank() == 0:
        print("BLOCK_EP_RESULT " + json.dumps([r for rank_results in everything for r in rank_results]), flush=True)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(600)
def test_block_with_one_exchange_equals_single_process(tmp_path):
    proc = run_two_rank_script(__file__, tmp_path, timeout=580)
    results = marked_json(proc.stdout, "BLOCK_EP_RESULT ")
    assert proc.returncode == 0 and results, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert sorted((r["k"], r["rank"]) for r in results) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for r in results:
        assert all(v < 1e-5 for v in r["errors"].values()), r
        assert r["token_counts_equal"], r
        assert r["per_call"] == [], r  # no token MoE called on its own: the block used one exchange
        assert sum(r["image_counts"]) == 2 * SAMPLES[r["rank"]], r
    for k in (1, 2):
        counts = {r["rank"]: r["image_counts"] for r in results if r["k"] == k}
        assert counts[0][0] > 0 and counts[1][0] == 0, counts  # image expert 0 has no sample on rank 1


if __name__ == "__main__":
    worker()
