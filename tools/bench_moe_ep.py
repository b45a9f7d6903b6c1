"""Expert-parallel token MoE, side by side on 2 gloo ranks: our all-to-all-v path vs DeepSpeed's legacy layer.

    python -m tools.bench_moe_ep --json                 # launches 2 ranks itself (torch.distributed.run)
    python -m tools.bench_moe_ep --tokens 4096 --reps 3

nestor-ti's token MoE (D 512, 6 experts top-2, F 512, one shared expert of hidden 341), forward + backward of
sum(out * g), per-rank batches of T tokens. Three contenders, each timed on both ranks at once:
  - new:    build_token_moe(backend local, ep_size 2): all-to-all-v of routed rows, grouped experts (dropless;
            `--routing static` for the fixed-capacity path);
  - legacy: deepspeed.moe.layer.MoE called directly (GShard gating; 0.19.8 dispatches by gathering rows into dense
            [E, C, D] buffers, dropless: C = the largest expert load all-reduced over the group), plus the same shared
            SwiGLU;
  - local:  LocalTokenMoE with all 6 experts on each rank (ep 1), the single-process reference.
A step's time is the slower rank's (max all-reduce); the contenders take turns in every repetition. Bytes: every
all_to_all_single call is counted (input bytes, this rank's own chunk included) forward + backward, per rank.
Reported: tokens/s per rank, `speedup_vs_legacy` (new / legacy), `ratio_vs_local_ep1` (new / local) and
`ceiling_vs_legacy` (local / legacy: what an expert-parallel path with perfectly balanced ranks and a free exchange
would reach against the legacy layer, since at ep P each rank still computes as many expert rows as at ep 1;
speedup_vs_legacy = ratio_vs_local_ep1 x ceiling_vs_legacy), per token count, for two inputs:
  - `tokens`: random rows, balanced router (the best case for the legacy layer's [E, C, D] buffers);
  - `skewed_padded`: what NESTOR's image experts feed the token MoE under expert parallelism: 25% padding rows
    (valid_N False: the legacy layer routes, sends and computes them, as the removed backend did) and a router
    skewed towards expert 0 (rows shifted along its gate row; the dropless capacity of the legacy layer is the
    largest expert load, so every expert's buffer grows to it).
  - `profiled` (with `--profile PROFILE.json` from `nestor_ds.routing.profile --ep 2`): a trained model's routing: the
    profile's padding fraction, and rows shifted towards rank 0's experts (along the difference of the mean gate
    rows of experts 0-2 and 3-5) until rank 0 receives the profile's `rank_imbalance` / 2 of the assignments.
`--one-device` runs no ranks: local ep 1 against the legacy layer at ep 1 in this process, bf16 on a GPU if there is
one (`tools.gpu_check` runs it), to measure `ceiling_vs_legacy` where the legacy layer's per-expert GEMMs and host
reads cost more than on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tools.two_ranks import emit, launch

D, E, K, SHARED_HIDDEN = 512, 6, 2, 341
SKEW = 0.5 / 8  # shift along expert 0's gate row (x sqrt(D)): expert 0 gets ~1/3 of the assignments


def _count_all_to_all():
    """Add up the bytes each all-to-all sends, per rank, forward and backward: torch.distributed.all_to_all_single
    calls (DeepSpeed's layer and our count exchange) as made, and the functional collective of our row exchange as
    its input (forward) plus its output (what its backward sends back)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    counter = {"bytes": 0}
    original, functional = dist.all_to_all_single, funcol.all_to_all_single_autograd

    def counted(output, input, *args, **kwargs):
        counter["bytes"] += input.numel() * input.element_size()
        return original(output, input, *args, **kwargs)

    def counted_functional(input, *args, **kwargs):
        out = functional(input, *args, **kwargs)
        counter["bytes"] += (input.numel() + out.numel()) * input.element_size()
        return out

    dist.all_to_all_single = counted
    funcol.all_to_all_single_autograd = counted_functional
    return counter


def _legacy_layer(ep_size: int = 2):
    """DeepSpeed 0.19.8's deepspeed.moe.layer.MoE configured as the removed `deepspeed` backend did (dropless), plus
    the shared SwiGLU: (run(x) -> out, the modules, to move and to find the gate in)."""
    import torch
    from deepspeed.moe.layer import MoE

    from nestor_ds.moe import SwiGLU

    layer = MoE(
        hidden_size=D,
        expert=SwiGLU(D, D),
        num_experts=E,
        ep_size=ep_size,
        k=K,
        capacity_factor=1.0,
        eval_capacity_factor=1.0,
        min_capacity=0,
        use_residual=False,
        noisy_gate_policy=None,
        drop_tokens=False,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    layer.set_deepspeed_parallelism()
    shared = SwiGLU(D, SHARED_HIDDEN)

    def run(x):
        out, _, _ = layer(x)
        return out + shared(x)

    return run, torch.nn.ModuleList([layer, shared])


def rank0_share(x_TD, gate_ED, k: int) -> float:
    """Share of the top-k assignments of rows x that go to the experts of EP rank 0 of 2 (the first half)."""
    experts = (x_TD.float() @ gate_ED.float().T).topk(k, dim=-1).indices
    return float((experts < gate_ED.shape[0] // 2).float().mean())


def shift_for_share(gate_ED, target: float, k: int, rows: int = 16384) -> tuple[object, float]:
    """(shift [D], share reached): the vector added to standard-normal rows so that rank 0's experts get `target` of the
    top-k assignments. Bisection on the length along the difference of the two halves' mean gate rows (the share
    grows with it); a target at or below the unshifted share needs no shift."""
    import torch

    half = gate_ED.shape[0] // 2
    direction = gate_ED[:half].mean(0) - gate_ED[half:].mean(0)
    direction = direction / direction.norm()
    x = torch.randn(rows, gate_ED.shape[1], generator=torch.Generator().manual_seed(7))
    share = rank0_share(x, gate_ED, k)
    if target <= share:
        return torch.zeros_like(direction), share
    lo, hi = 0.0, 1.0
    while rank0_share(x + hi * direction, gate_ED, k) < target:
        hi *= 2
        if hi > 1e3:
            raise ValueError(f"no shift gives rank 0 a share of {target}")
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rank0_share(x + mid * direction, gate_ED, k) < target else (lo, mid)
    return hi * direction, rank0_share(x + hi * direction, gate_ED, k)


def load_profile(path: str) -> dict[str, float]:
    """The ep-2 row of a nestor_ds.routing.profile JSON: rank_imbalance and padding_fraction."""
    data = json.loads(Path(path).read_text())
    try:
        row = data["ep"]["2"]
        return {"rank_imbalance": float(row["rank_imbalance"]), "padding_fraction": float(row["padding_fraction"])}
    except (KeyError, TypeError):
        raise ValueError(f"{path}: no ep 2 row (run nestor_ds.routing.profile with --ep 2)") from None


def copy_gate(legacy_modules, gate_ED) -> None:
    """Give the legacy layer our gate, so that every contender routes alike."""
    import torch

    gate = next(m for m in legacy_modules.modules() if hasattr(m, "wg")).wg.weight
    with torch.no_grad():
        gate.copy_(gate_ED)


def plan_inputs(args: argparse.Namespace, gate_ED) -> tuple[dict, object, float]:
    """(results keyed by input, the `profiled` input's shift and padding): the inputs asked for, plus `profiled`
    with the profile's row and the share its shift reached when --profile is given."""
    results: dict = {s: {} for s in args.scenarios}
    if not args.profile:
        return results, None, 0.0
    profile = load_profile(args.profile)
    shift, reached = shift_for_share(gate_ED, profile["rank_imbalance"] / 2, K)
    results["profiled"] = {"profile": {**profile, "file": args.profile, "rank0_share_target": reached}}
    return results, shift, profile["padding_fraction"]


def make_input(scenario: str, tokens: int, gate_ED, seed: int, shift=None, padding: float = 0.0):
    """(x [T, D], g [T, D], valid [T] or None): the rows of one input (module docstring) and the output gradient.
    `shift` and `padding` are the `profiled` input's (from `shift_for_share` and the profile)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, D, generator=gen)
    g = torch.randn(tokens, D, generator=gen)
    valid = None
    if scenario == "skewed_padded":
        x = x + SKEW * gate_ED[0] / gate_ED[0].norm() * D**0.5
        valid = torch.arange(tokens) < tokens - tokens // 4
    if scenario == "profiled":
        x = x + shift
        valid = torch.arange(tokens) < tokens - round(tokens * padding)
    return x, g, valid


def routing_row(local, x, valid) -> dict[str, float]:
    """What the router does with the rows (the local ep-1 model routes as the others): largest expert's share,
    EP rank 0's share at ep 2, padding."""
    import torch

    with torch.no_grad():
        counts = local(x, valid).tokens_per_expert_E.float()
    return {
        "max_expert_share": float(counts.max() / counts.sum()),
        "rank0_expert_share": float(counts[: E // 2].sum() / counts.sum()),
        "padding_fraction": 0.0 if valid is None else float(1 - valid.float().mean()),
    }


def take_turns(contenders: dict, x, g, reps: int, start, stop, bytes_sent=None) -> dict[str, dict]:
    """Forward + backward of sum(fn(x) * g) per contender; the contenders take turns inside every repetition (the
    first is a warm-up), so that a drift of the machine or of the process's state hits all alike (run one after
    another, the contender that ran first was 13.5% slower in one case: docs/benchmarks.md). `start()` lines the step up
    and returns its start time, `stop(t0)` waits for it and returns its time (the slower rank's under expert
    parallelism); `bytes_sent` (reset before each step) counts the all-to-all bytes."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    sent: dict[str, list[int]] = {name: [] for name in contenders}
    for rep in range(reps + 1):
        for name, fn in contenders.items():
            xi = x.clone().requires_grad_(True)
            if bytes_sent is not None:
                bytes_sent["bytes"] = 0
            t0 = start()
            (fn(xi) * g).sum().backward()
            elapsed = stop(t0)
            if rep:
                times[name].append(elapsed)
                sent[name].append(bytes_sent["bytes"] if bytes_sent is not None else 0)
    return {
        name: {
            "tokens_per_s_per_rank": x.shape[0] / min(times[name]),
            "step_s": min(times[name]),
            "step_s_all": times[name],
            "all_to_all_bytes_per_rank": max(sent[name]),
        }
        for name in contenders
    }


def add_ratios(row: dict) -> dict:
    """The row with the ratios of the contenders it has (module docstring)."""
    for key, num, den in (
        ("speedup_vs_legacy", "new", "legacy"),
        ("ratio_vs_local_ep1", "new", "local"),
        ("ceiling_vs_legacy", "local", "legacy"),
    ):
        if num in row and den in row:
            row[key] = row[num]["tokens_per_s_per_rank"] / row[den]["tokens_per_s_per_rank"]
    return row


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from nestor_ds.model.parallelize import apply_expert_parallel
    from nestor_ds.moe import MoEConfig, build_token_moe

    torch.set_num_threads(args.threads)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    counter = _count_all_to_all()
    torch.manual_seed(0)
    cfg = dict(num_experts=E, top_k=K, shared_hidden_ratio=SHARED_HIDDEN / D, routing=args.routing)
    new = build_token_moe(MoEConfig(**cfg, ep_size=2), D).train()
    apply_expert_parallel(new, dist.group.WORLD)
    local = build_token_moe(MoEConfig(**cfg), D).train()
    legacy_run, legacy_modules = _legacy_layer()

    with torch.no_grad():  # same routing in all three
        local.router.gate.weight.copy_(new.gate_weight)
    gate_ED = new.gate_weight.detach()
    copy_gate(legacy_modules, gate_ED)
    results, shift, padding = plan_inputs(args, gate_ED)

    def start() -> float:
        dist.barrier()
        return time.perf_counter()

    def stop(t0: float) -> float:
        elapsed = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when the slower rank ends
        return float(elapsed)

    for scenario, tokens in [(s, t) for s in results for t in args.tokens]:
        x, g, valid = make_input(scenario, tokens, gate_ED, 100 + rank, shift, padding)
        contenders = {
            "new": lambda x, valid=valid: new(x, valid).out_ND,
            "local": lambda x, valid=valid: local(x, valid).out_ND,
            "legacy": legacy_run,
        }
        row = routing_row(local, x, valid)
        row.update(take_turns({n: contenders[n] for n in args.contenders}, x, g, args.reps, start, stop, counter))
        results[scenario][str(tokens)] = add_ratios(row)
    if rank == 0:
        emit(
            {
                "world": dist.get_world_size(),
                "threads_per_rank": args.threads,
                "routing": args.routing,
                "D": D,
                "experts": E,
                "top_k": K,
                **results,
            }
        )
    dist.barrier()
    dist.destroy_process_group()


def one_device(args: argparse.Namespace) -> dict:
    """`--one-device`: local ep 1 against the legacy layer at ep 1, in this process, on the accelerator this machine
    has (bf16 on a GPU, fp32 on the CPU): `ceiling_vs_legacy` on one GPU, where the legacy layer's other costs
    show (one small GEMM per expert and projection instead of one grouped GEMM, the capacity read on the host to size
    its buffers). No exchange: ep 2 needs two devices."""
    import torch

    from nestor_ds.engine.distributed import init_distributed
    from nestor_ds.moe import MoEConfig, build_token_moe

    device = init_distributed().device  # the legacy layer needs a process group, even of one
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = dict(num_experts=E, top_k=K, shared_hidden_ratio=SHARED_HIDDEN / D)
    local = build_token_moe(MoEConfig(**cfg), D).train()
    legacy_run, legacy_modules = _legacy_layer(ep_size=1)
    gate_ED = local.router.gate.weight.detach().clone()
    copy_gate(legacy_modules, gate_ED)
    local.to(device, dtype)
    legacy_modules.to(device, dtype)
    results, shift, padding = plan_inputs(args, gate_ED)

    def start() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def stop(t0: float) -> float:
        return start() - t0

    for scenario, tokens in [(s, t) for s in results for t in args.tokens]:
        x, g, valid = make_input(scenario, tokens, gate_ED, 100, shift, padding)
        x, g = x.to(device, dtype), g.to(device, dtype)
        valid = None if valid is None else valid.to(device)
        row = routing_row(local, x, valid)
        contenders = {"local": lambda x, valid=valid: local(x, valid).out_ND, "legacy": legacy_run}
        row.update(take_turns(contenders, x, g, args.reps, start, stop))
        results[scenario][str(tokens)] = add_ratios(row)
    torch.distributed.destroy_process_group()
    return {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "D": D,
        "experts": E,
        "top_k": K,
        **results,
    }


def _stdout_to_stderr(fn, *args):
    """fn(*args) with file descriptor 1 pointed at stderr, for prints and log handlers bound to stdout alike."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        return fn(*args)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="tokens per rank (default 4096 16384)")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions after one warm-up (best is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    ap.add_argument("--routing", choices=("dropless", "static"), default="dropless", help="routing of the new path")
    ap.add_argument("--contenders", nargs="+", default=["new", "legacy", "local"], choices=("new", "legacy", "local"))
    ap.add_argument(
        "--scenarios",
        nargs="+",
        default=["tokens", "skewed_padded"],
        choices=("tokens", "skewed_padded"),
        help="inputs (see above; default both)",
    )
    ap.add_argument(
        "--profile",
        default=None,
        metavar="PROFILE.json",
        help="add the `profiled` input, calibrated to a nestor_ds.routing.profile result (its ep 2 row)",
    )
    ap.add_argument(
        "--one-device",
        action="store_true",
        help="no ranks: local ep 1 vs the legacy layer at ep 1 in this process, on the GPU if there is one "
        "(ceiling_vs_legacy on one device; tools.gpu_check runs it)",
    )
    args = ap.parse_args()
    if any(t <= 0 for t in args.tokens) or args.reps < 1 or args.threads < 1:
        ap.error("--tokens, --reps and --threads must be positive")
    if args.profile:
        try:
            load_profile(args.profile)
        except (OSError, ValueError) as err:
            ap.error(str(err))
    if args.one_device:
        result = _stdout_to_stderr(one_device, args)  # DeepSpeed logs to stdout; --json keeps stdout for the result
    elif "RANK" in os.environ:
        worker(args)
        return
    else:
        result = launch("tools.bench_moe_ep", sys.argv[1:], args.threads)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for scenario in [s for s in result if isinstance(result[s], dict) and s in (*args.scenarios, "profiled")]:
        for tokens, row in result[scenario].items():
            if tokens == "profile":
                continue
            parts = [
                f"{n} {row[n]['tokens_per_s_per_rank']:.0f} tok/s"
                + (f" ({row[n]['all_to_all_bytes_per_rank'] / 1e6:.1f} MB a2a)" if not args.one_device else "")
                for n in ("new", "legacy", "local")
                if n in row
            ]
            keys = ("speedup_vs_legacy", "ratio_vs_local_ep1", "ceiling_vs_legacy")
            ratios = [f"{k} {row[k]:.2f}" for k in keys if k in row]
            print(f"{scenario} T={tokens}/rank: " + ", ".join(parts) + ("; " + ", ".join(ratios) if ratios else ""))


if __name__ == "__main__":
    main()
