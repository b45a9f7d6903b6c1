"""Expert-parallel token MoE of the `local` backend (moe.ep_size > 1): all-to-all-v token exchange, grouped
experts per rank, our router and losses.

Shape legend: N rows in, V valid rows (N less padding), D width, F hidden, E experts (global), P = ep_size ranks of
the expert-parallel group, E_l = E / P experts on this rank, K top-k, A = V*K assignments this rank sends, U rows this
rank receives (for its experts), S rows of an expert-major buffer, Q capacity: rows per expert (static routing).

Rank p holds experts [p*E_l, (p+1)*E_l). Both routings exchange only routed rows:

- dropless: the A assignments of the valid rows are sorted by expert (= by destination rank); the [E] counts
  go through one all_to_all (each rank learns how many rows of each of its experts every source sends; the send
  buffer is built meanwhile), one host read gives the split sizes, then `all_to_all_single` with exact split sizes
  (all-to-all-v) moves the rows (the replicated shared expert runs meanwhile), the local experts run on them with
  the grouped kernel of `experts.py` in arrival order (P * E_l groups, source rank then local expert, each with its
  expert's weights; the padded kernel moves them to expert-major chunks first), and the inverse all-to-all-v brings
  the outputs home. Padding rows are never routed, sent or counted; a rank with no valid row, or an expert with no
  row, still joins every collective (forward and backward).
- static (training): `plan_capacity` gives every expert Q rows on every rank (overflow dropped lowest router
  probability first, padding absent), so the exchange has equal, fixed splits: no count exchange, no host
  sync. The received [P, E_l, Q, D] buffer is one batched matmul per projection on [E_l, P*Q, D]. Needs the
  same N on every rank of the group (the image MoE calls every expert with Q samples on every rank).

A NESTOR block runs the dropless token MoEs of all its image experts through one exchange round trip
(`exchange_token_moes`: assignments sorted by destination rank, image expert, local expert; one grouped kernel over
the image experts' local experts), so it waits for the other ranks once per block and pads nothing.

Losses (load balancing, z-loss) and counts are this rank's valid rows, exactly as `LocalTokenMoE` on this
rank's rows; gradients of replicated parameters (router, shared expert) are averaged by the engine.

Parameters are stored under DeepSpeed-MoE's names (`moe.deepspeed_moe.gate.wg.weight`,
`moe.deepspeed_moe.experts.deepspeed_experts.<i>.w{1,3,2}.weight`, i local; `shared.*`) in a module that is a
`deepspeed.moe.layer.MoE` to DeepSpeed's engine (its forward is never called): the engine then treats the
expert weights as MoE parameters (gradients averaged over the expert-data-parallel group only, ZeRO-1/2
partitions per that group) and writes one checkpoint file per expert with global ids, which
`nestor_ds.checkpoint.export` turns into the single-file local layout. The helpers at the bottom convert
between this layout and LocalTokenMoE's.

The process group is given from outside (`nestor_ds.model.parallelize.apply_expert_parallel`, called by the
engine's `setup_expert_parallel`), never looked up inside the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from .base import MoEOutput, TokenMoE, check_input, static_output
from .config import MoEConfig
from .dispatch import dispatch_rows, gather_rows, plan_static, sorted_position
from .experts import KERNELS, ExpertLayout, SwiGLU, grouped_mm_supported, plan_layout, run_experts
from .router import FP32Linear, load_balancing_loss, route_from_logits, router_z_loss, tokens_per_expert

_DS_GATE = "moe.deepspeed_moe.gate.wg.weight"
_DS_EXPERT = "moe.deepspeed_moe.experts.deepspeed_experts.{i}.{w}.weight"
_LOCAL_EXPERT = {"w1": "experts.w1_EFD", "w3": "experts.w3_EFD", "w2": "experts.w2_EDF"}
_SHARED_PREFIX = "shared."


def all_to_all_v(
    x_SD: torch.Tensor, out_splits: list[int] | None, in_splits: list[int] | None, group: dist.ProcessGroup
) -> torch.Tensor:
    """Send in_splits[p] rows of x_SD to rank p, receive out_splits[p] rows from rank p (None: equal splits).

    PyTorch's functional collective: differentiable (the backward is the inverse exchange) and traced by
    torch.compile, so the static path compiles as one graph under expert parallelism too."""
    return funcol.all_to_all_single_autograd(x_SD.contiguous(), out_splits, in_splits, group)


def _deepspeed_layout_class():
    """`DeepSpeedMoELayout`, built on first use so that importing nestor_ds.moe does not import DeepSpeed."""
    global _LAYOUT_CLASS
    if _LAYOUT_CLASS is not None:
        return _LAYOUT_CLASS
    from nestor_ds.compat import deepspeed_moe_class, expert_group_name, tag_expert_params

    class DeepSpeedMoELayout(deepspeed_moe_class()):
        """Router weight and this rank's experts under DeepSpeed-MoE's parameter names and tags, so that
        DeepSpeed's engine sees an MoE layer (see the module docstring). Holds parameters only."""

        def __init__(self, num_experts: int, ep_size: int, dim: int, hidden: int) -> None:
            nn.Module.__init__(self)  # not MoE.__init__: no DeepSpeed gate or dispatch is built
            self.num_experts, self.ep_size = num_experts, ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = expert_group_name(ep_size)
            self.ep_group: dist.ProcessGroup | None = None  # given by ExpertParallelTokenMoE.set_group
            self.deepspeed_moe = nn.Module()
            self.deepspeed_moe.gate = nn.Module()
            self.deepspeed_moe.gate.wg = FP32Linear(dim, num_experts, bias=False)
            self.deepspeed_moe.experts = nn.Module()
            self.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList(
                SwiGLU(dim, hidden) for _ in range(self.num_local_experts)
            )
            tag_expert_params(self.deepspeed_moe.experts.parameters(), ep_size)  # DeepSpeed's expert tags

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """Called by deepspeed.initialize (DeepSpeed's own MoE creates its groups here): ours were created by the
            engine and given to the model already, so this only checks that they were."""
            if self.ep_group is None:
                raise RuntimeError(
                    f"expert-parallel group {self.expert_group_name} was not given to the model: call "
                    "nestor_ds.engine.distributed.setup_expert_parallel(model, ep_size) before "
                    "deepspeed.initialize"
                )

        def forward(self, *args, **kwargs):  # pragma: no cover - the math is ExpertParallelTokenMoE's
            raise RuntimeError("DeepSpeedMoELayout holds parameters only; call ExpertParallelTokenMoE")

    _LAYOUT_CLASS = DeepSpeedMoELayout
    return DeepSpeedMoELayout


_LAYOUT_CLASS = None


def default_ep_rank(ep_size: int) -> int:
    """This rank's index in its expert-parallel group before the group exists: groups are consecutive ranks
    ([0..P-1], [P..2P-1], ...), as DeepSpeed builds them, so it is rank % P (0 without distributed)."""
    return dist.get_rank() % ep_size if dist.is_available() and dist.is_initialized() else 0


class ExpertParallelTokenMoE(TokenMoE):
    """Top-k MoE of SwiGLU experts sharded over an expert-parallel group, plus replicated shared experts."""

    def __init__(self, cfg: MoEConfig, dim: int) -> None:
        super().__init__()
        from .local import LocalTokenMoE

        cfg.validate()
        self.cfg = cfg
        self.num_experts, self.top_k, self.ep_size = cfg.num_experts, cfg.top_k, cfg.ep_size
        self.local_experts = cfg.num_experts // cfg.ep_size
        self.dim, self.hidden = dim, cfg.hidden_dim(dim)
        self.ep_rank = default_ep_rank(cfg.ep_size)
        self.kernel: str | None = None  # None = per device, as LocalTokenMoE
        # Initial weights are a function of the seed, not of the parallel layout: draw every expert as the local
        # backend does (same RNG stream), then keep this rank's slice. ep 1 and ep P start from the same model.
        import dataclasses

        reference = LocalTokenMoE(dataclasses.replace(cfg, ep_size=1), dim)
        with torch.random.fork_rng(devices=[]):
            self.moe = _deepspeed_layout_class()(cfg.num_experts, cfg.ep_size, dim, self.hidden)
        self.shared = reference.shared
        self.load_state_dict(
            {
                k: v
                for k, v in expert_parallel_state_from_local(reference.state_dict(), self.ep_rank, self.ep_size).items()
            }
        )

    # -- parameters -------------------------------------------------------------------------------------------
    @property
    def gate_weight(self) -> torch.Tensor:
        """Router weight [E, D] (all experts: every rank routes its own rows)."""
        return self.moe.deepspeed_moe.gate.wg.weight

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's E_l expert weights stacked as [E_l, F, D], [E_l, F, D], [E_l, D, F] (a copy per call: the
        per-expert parameters are what DeepSpeed's per-expert checkpoint files need)."""
        experts = list(self.moe.deepspeed_moe.experts.deepspeed_experts)
        return (
            torch.stack([e.w1.weight for e in experts]),
            torch.stack([e.w3.weight for e in experts]),
            torch.stack([e.w2.weight for e in experts]),
        )

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        """The expert-parallel group the all-to-all-v exchange runs over (None until set_group)."""
        return self.moe.ep_group

    def set_group(self, group: dist.ProcessGroup) -> None:
        """Take the expert-parallel group to exchange tokens over (called by apply_expert_parallel)."""
        if dist.get_world_size(group) != self.ep_size:
            raise ValueError(
                f"expert-parallel group has {dist.get_world_size(group)} ranks, moe.ep_size={self.ep_size}"
            )
        if dist.get_rank(group) != self.ep_rank:
            raise ValueError(
                f"rank {dist.get_rank()} is rank {dist.get_rank(group)} of its expert-parallel group but "
                f"holds experts of group rank {self.ep_rank}: groups must be consecutive ranks"
            )
        self.moe.ep_group = group

    # -- forward ----------------------------------------------------------------------------------------------
    def route(self, x_ND: torch.Tensor):
        logits_NE = self.moe.deepspeed_moe.gate.wg(x_ND)
        if self.training and self.cfg.router_noise > 0:
            logits_NE = logits_NE + self.cfg.router_noise * torch.randn_like(logits_NE)
        return route_from_logits(logits_NE, self.top_k)

    def forward(self, x_ND: torch.Tensor, valid_N: torch.Tensor | None = None) -> MoEOutput:
        check_input(x_ND, valid_N, self.dim)
        if self.ep_group is None:
            raise RuntimeError(
                "ExpertParallelTokenMoE: no expert-parallel group; call "
                "nestor_ds.model.parallelize.apply_expert_parallel(model, group) first"
            )
        if self.cfg.static and self.training:
            return self._forward_static(x_ND, valid_N)
        return self._forward_dropless(x_ND, valid_N)

    def _forward_dropless(self, x_ND: torch.Tensor, valid_N: torch.Tensor | None) -> MoEOutput:
        P, E_l, K = self.ep_size, self.local_experts, self.top_k
        rows_V = None if valid_N is None else valid_N.nonzero().squeeze(1)
        x_VD = x_ND if rows_V is None else x_ND.index_select(0, rows_V)
        V = x_VD.shape[0]
        routing = self.route(x_VD)
        counts_E = tokens_per_expert(routing.experts_NK, self.num_experts)

        # counts per (source rank, local expert) in flight while the send buffer is built: the assignments sorted
        # by expert = by destination rank, one row each
        recv_PE = torch.empty_like(counts_E)
        counts_sent = dist.all_to_all_single(recv_PE, counts_E.contiguous(), group=self.ep_group, async_op=True)
        sorted_A = sorted_position(routing.experts_NK.reshape(-1))
        send_AD = dispatch_rows(x_VD, sorted_A.view(V, K), V * K)
        counts_sent.wait()
        sizes = torch.cat([counts_E.view(P, E_l).sum(1), recv_PE.view(P, E_l).sum(1)]).tolist()  # one host read
        send_splits, recv_splits = sizes[:P], sizes[P:]
        recv_UD = all_to_all_v(send_AD, recv_splits, send_splits, self.ep_group)
        # the shared expert needs no exchange: it runs while the rows travel (the functional collective's result
        # is waited for on first use, in _run_received)
        shared_VD = self.shared(x_VD) if self.shared is not None else None

        y_UD = self._run_received(recv_UD, recv_PE)
        back_AD = all_to_all_v(y_UD, send_splits, recv_splits, self.ep_group)

        y_VKD = gather_rows(back_AD, sorted_A.view(V, K))
        y_VD = (routing.weights_NK.unsqueeze(-1) * y_VKD.float()).sum(dim=1).to(x_VD.dtype)
        if shared_VD is not None:
            y_VD = y_VD + shared_VD
        out_ND = y_VD if rows_V is None else torch.zeros_like(x_ND).index_copy(0, rows_V, y_VD)
        return MoEOutput(
            out_ND,
            load_balancing_loss(routing.probs_NE, routing.experts_NK),
            router_z_loss(routing.logits_NE),
            counts_E,
        )

    def _run_received(self, recv_UD: torch.Tensor, recv_PE: torch.Tensor) -> torch.Tensor:
        """This rank's experts on the U received rows (P * E_l groups in arrival order; see run_arrival_groups)."""
        return run_arrival_groups(recv_UD, recv_PE, self.local_weights(), self.ep_size, self.kernel_for(recv_UD))

    def kernel_for(self, x_UD: torch.Tensor) -> str:
        """The expert kernel for rows like x_UD: `self.kernel`, or per device and dtype (as LocalTokenMoE)."""
        kernel = self.kernel or (
            "grouped" if grouped_mm_supported(x_UD.device, x_UD.dtype, self.dim, self.hidden) else "padded"
        )
        if kernel not in KERNELS:
            raise ValueError(f"ExpertParallelTokenMoE.kernel={kernel!r}: expected one of {KERNELS}")
        return kernel

    def _forward_static(self, x_ND: torch.Tensor, valid_N: torch.Tensor | None) -> MoEOutput:
        N, E, P, E_l, K, D = x_ND.shape[0], self.num_experts, self.ep_size, self.local_experts, self.top_k, self.dim
        Q = self.cfg.capacity(N)
        routing = self.route(x_ND)
        plan = plan_static(routing.experts_NK, routing.probs_NE, valid_N, E, Q)

        x_SD = dispatch_rows(x_ND, plan.slot_A.view(N, K), plan.rows)
        recv_SD = all_to_all_v(x_SD[: E * Q], None, None, self.ep_group)  # [P sources, E_l, Q, D]
        mine_SD = recv_SD.view(P, E_l, Q, D).transpose(0, 1).reshape(E_l * P * Q, D)
        layout = ExpertLayout("padded", E_l * P * Q, chunk=P * Q, one_chunk_per_expert=True)
        y_mine_SD = run_experts(mine_SD, layout, *self.local_weights())
        back_SD = y_mine_SD.view(E_l, P, Q, D).transpose(0, 1).reshape(E * Q, D)
        y_SD = torch.cat([all_to_all_v(back_SD, None, None, self.ep_group), x_SD.new_zeros(1, D)])  # + drop row

        return static_output(y_SD, plan, routing, x_ND, valid_N, self.shared)


def run_arrival_groups(
    recv_UD: torch.Tensor,
    sizes_G: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    P: int,
    kernel: str,
) -> torch.Tensor:
    """Experts on received rows that arrive as G = P * X contiguous groups (source rank, then local expert x; sizes
    sizes_G), X experts with weights [X, F, D], [X, F, D], [X, D, F]. grouped kernel, two ways, whichever copies
    less: group (p, x) runs with expert x's weights, the weights repeated P times, so the rows never leave arrival
    order ((P-1) * X * 3 * F * D more weight elements, docs/benchmarks.md); or the rows are permuted into
    expert-major order and back (2 * U * D elements, forward and backward alike). Many received rows favour the
    first, many experts (one exchange for a block's image experts) and few rows the second. padded kernel: rows go
    to expert-major chunks as in LocalTokenMoE."""
    w1, w3, w2 = weights
    X, U = w1.shape[0], recv_UD.shape[0]
    if U == 0:  # nothing to compute here; stay in the graph so the backward exchanges run on this rank too
        return recv_UD * 0.0 + 0.0 * (w1.sum() + w3.sum() + w2.sum()).to(recv_UD.dtype)
    if kernel == "grouped" and (P - 1) * X * 3 * w1.shape[1] <= 2 * U:
        layout = ExpertLayout("grouped", U, offs_E=sizes_G.cumsum(0).to(torch.int32))
        return run_experts(recv_UD, layout, w1.repeat(P, 1, 1), w3.repeat(P, 1, 1), w2.repeat(P, 1, 1))
    expert_U = torch.repeat_interleave(torch.arange(X, device=recv_UD.device).repeat(P), sizes_G)
    slot_U, layout = plan_layout(expert_U, sizes_G.view(P, X).sum(0), kernel)
    y_SD = run_experts(dispatch_rows(recv_UD, slot_U.view(U, 1), layout.rows), layout, w1, w3, w2)
    return gather_rows(y_SD, slot_U)


def exchange_token_moes(moes: Sequence[ExpertParallelTokenMoE], xs_ND: Sequence[torch.Tensor]) -> list[MoEOutput]:
    """The dropless token MoEs of M image experts of one block in ONE exchange round trip: moes[m] on the rows
    xs_ND[m] (this rank's valid rows for image expert m; N_m may be 0). Equal to calling each moe on its rows.

    A rank that calls the token MoEs one at a time waits at each call for the rank with the most samples of that image
    expert, and pads its call to that count; here every rank runs all its image experts' attention first and the block
    waits once (docs/scaling.md, "What a trained model's routing costs": the image-expert bodies lose ~15% at ep 2
    otherwise). Assignments travel sorted by (destination rank, image expert m, local expert): every rank receives
    P * M * E_l groups in arrival order and runs them with one grouped kernel over the M token MoEs' local experts."""
    first = moes[0]
    P, E_l, K, E, group = first.ep_size, first.local_experts, first.top_k, first.num_experts, first.ep_group
    M, D = len(moes), first.dim
    if group is None:
        raise RuntimeError("exchange_token_moes: no expert-parallel group; call apply_expert_parallel first")
    if len(moes) != len(xs_ND):
        raise ValueError(f"exchange_token_moes: {len(moes)} token MoEs but {len(xs_ND)} row blocks")
    routings = [moe.route(x) for moe, x in zip(moes, xs_ND, strict=True)]
    counts_ME = torch.stack([tokens_per_expert(r.experts_NK, E) for r in routings])
    send_PX = counts_ME.view(M, P, E_l).transpose(0, 1).reshape(P, M * E_l)  # X = (m, local expert)
    recv_PX = torch.empty_like(send_PX)
    counts_sent = dist.all_to_all_single(recv_PX, send_PX.contiguous(), group=group, async_op=True)
    key_A = torch.cat(
        [(r.experts_NK // E_l) * (M * E_l) + m * E_l + r.experts_NK % E_l for m, r in enumerate(routings)]
    ).reshape(-1)
    sorted_A = sorted_position(key_A)  # row of each assignment in the send buffer
    x_VD = torch.cat([x.reshape(-1, D) for x in xs_ND])
    send_AD = dispatch_rows(x_VD, sorted_A.view(-1, K), key_A.numel())
    counts_sent.wait()
    sizes = torch.cat([send_PX.sum(1), recv_PX.sum(1)]).tolist()  # one host read
    send_splits, recv_splits = sizes[:P], sizes[P:]
    recv_UD = all_to_all_v(send_AD, recv_splits, send_splits, group)
    shared_VD = [moe.shared(x) if moe.shared is not None else None for moe, x in zip(moes, xs_ND, strict=True)]

    weights = tuple(torch.cat(ws) for ws in zip(*(moe.local_weights() for moe in moes), strict=True))
    y_UD = run_arrival_groups(recv_UD, recv_PX.reshape(-1), weights, P, first.kernel_for(recv_UD))
    back_AD = all_to_all_v(y_UD, send_splits, recv_splits, group)
    y_VKD = gather_rows(back_AD, sorted_A.view(-1, K))

    outs, start = [], 0
    for m, (r, x) in enumerate(zip(routings, xs_ND, strict=True)):
        y_NKD = y_VKD[start : start + x.shape[0]]
        start += x.shape[0]
        y_ND = (r.weights_NK.unsqueeze(-1) * y_NKD.float()).sum(dim=1).to(x.dtype)
        if shared_VD[m] is not None:
            y_ND = y_ND + shared_VD[m]
        outs.append(
            MoEOutput(y_ND, load_balancing_loss(r.probs_NE, r.experts_NK), router_z_loss(r.logits_NE), counts_ME[m])
        )
    return outs


# ----------------------------------------------------------------------------------- layout conversion


def expert_parallel_state_from_local(
    local_state: Mapping[str, torch.Tensor], ep_rank: int = 0, ep_size: int = 1
) -> dict[str, torch.Tensor]:
    """State dict of the ExpertParallelTokenMoE on EP rank `ep_rank` from a LocalTokenMoE state dict."""
    w1_EFD = local_state[_LOCAL_EXPERT["w1"]]
    num_experts = w1_EFD.shape[0]
    if num_experts % ep_size:
        raise ValueError(f"expert_parallel_state_from_local: E={num_experts} not divisible by ep_size={ep_size}")
    per_rank = num_experts // ep_size
    out = {_DS_GATE: local_state["router.gate.weight"].clone()}
    for i in range(per_rank):
        g = ep_rank * per_rank + i
        for w, name in _LOCAL_EXPERT.items():
            out[_DS_EXPERT.format(i=i, w=w)] = local_state[name][g].clone()
    out.update({k: v.clone() for k, v in local_state.items() if k.startswith(_SHARED_PREFIX)})
    return out


def local_state_from_expert_parallel(
    states: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """LocalTokenMoE state dict from ExpertParallelTokenMoE state dicts, one per EP rank in EP-rank order, or one
    mapping holding every expert under its global id (DeepSpeed's per-expert checkpoint files). The gate and
    shared weights are replicated: taken from the first."""
    states = [states] if isinstance(states, Mapping) else list(states)
    if not states:
        raise ValueError("local_state_from_expert_parallel: no state dicts given")
    experts: dict[str, list[torch.Tensor]] = {w: [] for w in _LOCAL_EXPERT}
    for rank, state in enumerate(states):
        i = 0
        while _DS_EXPERT.format(i=i, w="w1") in state:
            for w in _LOCAL_EXPERT:
                experts[w].append(state[_DS_EXPERT.format(i=i, w=w)])
            i += 1
        if i == 0:
            raise ValueError(
                f"local_state_from_expert_parallel: state {rank} has no key {_DS_EXPERT.format(i=0, w='w1')}"
            )
    out = {"router.gate.weight": states[0][_DS_GATE].clone()}
    out.update({_LOCAL_EXPERT[w]: torch.stack(ws) for w, ws in experts.items()})
    out.update({k: v.clone() for k, v in states[0].items() if k.startswith(_SHARED_PREFIX)})
    return out
