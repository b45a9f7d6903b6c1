"""Image-level mixture of experts: each SAMPLE (its whole token field) is routed to k image experts.

Shape legend: B samples, D width, H, W token grid, L = H*W tokens per sample, E = E_img image experts (E_tok token
experts), K image top-k, A = B*K assignments, S samples of an expert-major buffer (one expert's slice of it: the
samples that expert is called with, padded under expert parallelism), Q capacity (samples per expert, static),
N token rows an image expert's token MoE routes (its samples x L).

    ImageMoE(h) = sum_k w_k * Expert_k(h) + SharedAFNO(h) [+ h when image_moe_skip, as the authors do]
    Expert(h)   = LN2(a + TokenMoE(a)),  a = LN1(h + MHSA(h))      (post-norm transformer layer)

Routing: global average pool -> Linear(D -> E, bias) -> softmax -> top-k -> renormalise, using the
token router's `route_from_logits` and `load_balancing_loss` (one implementation in the project).

Dispatch: the A assignments are sorted by expert (argsort); one gather puts every sample's token field
in its K rows of an expert-sorted buffer, each expert runs on its contiguous slice, and one gather brings
the outputs back to (sample, k) order for the weighted sum (gathers both ways, also in backward: the helpers of
nestor_ds.moe.dispatch, shared with the token MoE). No per-expert masks over the whole batch.

Static routing (cfg.image_routing="static", training): every image expert gets a fixed buffer of
Q = ceil(cf * K * B / E) samples (nestor_ds.moe.dispatch.plan_static: overflow samples dropped lowest
router weight first and counted; they keep the shared-AFNO path and the skip). All E experts are called
with Q samples each, unused rows passed as valid_N = False: no host sync, shapes fixed by B, and every
rank of an expert-parallel group calls every expert with the same N without any collective.

Dropless (default, and always in evaluation) under expert parallelism (cfg.moe.ep_size > 1), token MoEs dropless
too: one exchange per block. Every image expert runs its attention on this rank's own samples (none when it has
none), then the token MoEs of all image experts share one all-to-all-v round trip
(`nestor_ds.moe.expert_parallel.exchange_token_moes`), then each expert finishes: no padding, and the block waits
for the other ranks once instead of once per image expert (docs/scaling.md, "What a trained model's routing costs").

Otherwise the token MoEs are called one at a time. Under expert parallelism they need the same rows on every rank of
the group (static token routing in training): each expert's sample group is padded to the group-wide maximum of that
expert's sample count (one all_reduce MAX of counts_E per block), padded rows passed as valid_N = False.

Lock-step (data parallelism under ZeRO 1-3, `lockstep_group`): every rank calls every image expert that any rank of
the data-parallel world calls, in the same order, so that DeepSpeed reduces (ZeRO-1/2) or gathers (ZeRO-3) the same
parameters on every rank: one all_reduce MAX of counts_E per block, and an expert this rank has no sample for runs on
one zero sample whose output is dropped (its parameters get a zero gradient; no other padding). ZeRO-1/2 need this only
while gradients are taken (`lockstep_mode="backward"`), ZeRO-3 on every call. The alternative, every rank calling
all E experts always, saves the collective but computes experts no rank needs. An expert whose group maximum is 0 is
skipped on every rank. Without expert parallelism or lockstep there is no padding and no collective.
`pad_to` (debug) forces padding of every called expert's group to at least that many samples in a
single process, so the padding path is testable without a process group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nestor_ds.moe import MoEOutput, build_token_moe
from nestor_ds.moe.dispatch import dispatch_rows, gather_rows, plan_static, sorted_position
from nestor_ds.moe.expert_parallel import ExpertParallelTokenMoE, exchange_token_moes
from nestor_ds.moe.router import FP32Linear, load_balancing_loss, route_from_logits, tokens_per_expert

from .afno import afno_stack
from .attention import SelfAttention
from .config import ModelConfig


@dataclass
class BlockRouting:
    """Routing record of one NESTOR block (for logging expert specialisation)."""

    image_topk_idx: torch.Tensor  # [B, K] long, selected image experts per sample, best first
    image_counts: torch.Tensor  # [E_img] long, samples routed to each image expert (before capacity)
    token_counts: torch.Tensor  # [E_img, E_tok] long, token assignments inside each image expert
    # static routing: tokens of samples over an image expert's capacity + token assignments over a token expert's
    # capacity, a device tensor (read it only when logging); None when both levels are dropless
    dropped_tokens: torch.Tensor | None = None


@dataclass
class ImageMoEOutput:
    out_BDHW: torch.Tensor
    image_lb: torch.Tensor
    token_lb: torch.Tensor
    token_z: torch.Tensor
    routing: BlockRouting


class ImageExpert(nn.Module):
    """The "FlashAttention expert": MHSA over the sample's tokens, then the token-level Sub-MoE."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.width
        self.attn = SelfAttention(D, cfg.num_heads, cfg.attn_dropout, cfg.attention)
        self.norm1 = nn.LayerNorm(D)
        self.moe = build_token_moe(cfg.moe, D)
        self.norm2 = nn.LayerNorm(D)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h_SLD: torch.Tensor, valid_N: torch.Tensor | None) -> tuple[torch.Tensor, MoEOutput]:
        """The S samples routed to this expert; valid_N [S*L] marks the token rows of real (not padding) samples."""
        S, L, D = h_SLD.shape
        a = self.attend(h_SLD)
        m = self.moe(a.reshape(S * L, D), valid_N)
        return self.finish(a, m), m

    def attend(self, h_SLD: torch.Tensor) -> torch.Tensor:
        """The part before the token MoE (its input a)."""
        return self.norm1(h_SLD + self.drop(self.attn(h_SLD)))  # residual adds the block input

    def finish(self, a_SLD: torch.Tensor, m: MoEOutput) -> torch.Tensor:
        """The part after the token MoE."""
        return self.norm2(a_SLD + self.drop(m.out_ND.view(a_SLD.shape)))


class ImageMoE(nn.Module):
    """sum_k w_k Expert_k(h) + SharedAFNO(h) (+ h), per-sample top-k routing with grouped dispatch."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.E, self.K = cfg.image_experts, cfg.image_top_k
        self.router = FP32Linear(cfg.width, cfg.image_experts, bias=True)
        self.experts = nn.ModuleList(ImageExpert(cfg) for _ in range(cfg.image_experts))
        # the shared global expert; None when shared_afno_layers = 0 (an empty Sequential would be identity)
        self.shared = afno_stack(cfg, cfg.shared_afno_layers) if cfg.shared_afno_layers else None
        self.pad_to: int | None = None  # debug: force padded groups (tests)
        self.one_exchange = True  # False: token MoEs one at a time even where one exchange applies (benchmarks)
        # given from outside by nestor_ds.model.parallelize.apply_expert_parallel (see group_sizes)
        self.ep_group: dist.ProcessGroup | None = None  # expert-parallel group of the token MoEs
        self.lockstep_group: dist.ProcessGroup | None = None  # ZeRO 1-3: every rank calls the same experts
        self.lockstep_mode = "always"  # ZeRO-3: every call; "backward" (ZeRO-1/2): calls that record a backward

    @property
    def expert_parallel(self) -> bool:
        return self.cfg.moe.ep_size > 1

    @property
    def static(self) -> bool:
        """Static image routing applies in training; evaluation is dropless (no coupling between samples)."""
        return self.cfg.image_routing == "static" and self.training

    def _sync_group(self) -> dist.ProcessGroup | None:
        """The group whose ranks must call the same image experts now (lock-step, else expert-parallel), or None."""
        lockstep = self.lockstep_group is not None and (self.lockstep_mode == "always" or torch.is_grad_enabled())
        if lockstep:
            return self.lockstep_group  # the whole data-parallel world contains every expert-parallel group
        if self.expert_parallel:
            if self.ep_group is None:
                raise RuntimeError(
                    "ImageMoE: moe.ep_size > 1 but no expert-parallel group was given; call "
                    "nestor_ds.model.parallelize.apply_expert_parallel(model, ep_group)"
                )
            return self.ep_group
        return None

    def group_sizes(self, counts_E: torch.Tensor) -> list[int]:
        """Dropless: rows (samples) each expert is called with on this rank; 0 = skip. Alone: this rank's counts.
        Under a group (`_sync_group`): every expert some rank of it calls, on every rank; padded to the group's
        largest count under expert parallelism (its token MoEs want the same rows on every rank), else to one
        sample where this rank has none."""
        group = self._sync_group()
        if group is None:
            sizes = counts_E.tolist()
        else:
            top = counts_E.clone()
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            if self.expert_parallel:
                sizes = top.tolist()
            else:
                sizes = [max(n, 1) if m > 0 else 0 for n, m in zip(counts_E.tolist(), top.tolist(), strict=True)]
        if self.pad_to is not None:
            sizes = [max(s, self.pad_to) if s > 0 else 0 for s in sizes]
        return sizes

    def route(self, h_BDHW: torch.Tensor):
        """Router on the pooled token field: fp32 logits (+ training noise) -> top-k routing."""
        pooled_BD = h_BDHW.mean(dim=(2, 3)).float()
        logits_BE = self.router(pooled_BD)
        if self.training and self.cfg.image_router_noise > 0:
            logits_BE = logits_BE + self.cfg.image_router_noise * torch.randn_like(logits_BE)
        return route_from_logits(logits_BE, self.K)

    def forward(self, h_BDHW: torch.Tensor) -> ImageMoEOutput:
        r = self.route(h_BDHW)
        image_lb = load_balancing_loss(r.probs_NE, r.experts_NK)
        counts_E = tokens_per_expert(r.experts_NK, self.E)
        if self.static:
            mix_BLD, token_lb, token_z, token_counts, dropped = self._experts_static(h_BDHW, r)
        else:
            mix_BLD, token_lb, token_z, token_counts, dropped = self._experts_dropless(h_BDHW, r, counts_E)
        B, D, H, W = h_BDHW.shape
        out = mix_BLD.transpose(1, 2).reshape(B, D, H, W)
        if self.shared is not None:
            out = out + self.shared(h_BDHW)
        if self.cfg.image_moe_skip:
            out = out + h_BDHW
        routing = BlockRouting(r.experts_NK.detach(), counts_E.detach(), token_counts, dropped)
        return ImageMoEOutput(out, image_lb, token_lb, token_z, routing)

    def _experts_static(self, h_BDHW: torch.Tensor, r):
        """sum_k w_k Expert_k(h) with Q samples per expert: fixed shapes, no host sync (see module docstring)."""
        B, D, H, W = h_BDHW.shape
        L, E, K = H * W, self.E, self.K
        Q = self.cfg.image_capacity(B)
        plan = plan_static(r.experts_NK, r.probs_NE, None, E, Q)  # drop lowest router probability first
        slot_BK = plan.slot_A.view(B, K)
        x_BLD = h_BDHW.flatten(2).transpose(1, 2)
        x_SLD = dispatch_rows(x_BLD.reshape(B, L * D), slot_BK, plan.rows).view(-1, L, D)  # S = E*Q + drop row
        sample_N = torch.arange(Q * L, device=h_BDHW.device) // L  # sample of each token row
        y_pieces, lb, z, counts, dropped = [], [], [], [], plan.dropped * L
        for e in range(E):
            valid_N = sample_N < plan.kept_E[e]
            y_QLD, m = self.experts[e](x_SLD[e * Q : (e + 1) * Q], valid_N)
            y_pieces.append(y_QLD.reshape(Q, L * D))
            lb.append(m.lb_loss.float())
            z.append(m.z_loss.float())
            counts.append(m.tokens_per_expert_E)
            if m.dropped is not None:
                dropped = dropped + m.dropped
        y_pieces.append(x_SLD.new_zeros(1, L * D))  # the drop row's output
        # token losses averaged over the block's real samples (each expert's loss is ~1 when balanced)
        real_E = plan.kept_E.float()
        real_total = real_E.sum().clamp(min=1.0)
        token_lb = (torch.stack(lb) * real_E).sum() / real_total
        token_z = (torch.stack(z) * real_E).sum() / real_total
        y_BKLD = gather_rows(torch.cat(y_pieces, dim=0), slot_BK).view(B, K, L, D)
        w_BK = torch.where(plan.keep_A.view(B, K), r.weights_NK, torch.zeros_like(r.weights_NK))
        mix_BLD = (w_BK.to(y_BKLD.dtype)[:, :, None, None] * y_BKLD).sum(dim=1)
        return mix_BLD, token_lb, token_z, torch.stack(counts), dropped

    def _one_exchange(self) -> bool:
        """Dropless token MoEs under expert parallelism run as one exchange per block (`exchange_token_moes`)."""
        moes = [ex.moe for ex in self.experts]
        return (
            self.one_exchange
            and self.pad_to is None
            and all(isinstance(m, ExpertParallelTokenMoE) for m in moes)
            and not (self.cfg.moe.static and self.training)
        )

    def _experts_exchanged(self, x_ALD: torch.Tensor, counts_E: torch.Tensor):
        """Expert outputs in sorted order when every token MoE of the block shares one exchange: each expert's
        attention on its own samples (no padding), then the token MoEs together, then each expert's finish.

        Every rank runs the same operations in the same order (an expert that any rank of the group calls is called
        here too, on one zero sample whose output is dropped when this rank has none), so every parameter gets a
        gradient on every rank in the same order: ZeRO-2 reduces gradients in buckets filled in that order."""
        sizes, called_anywhere = counts_E.tolist(), self.group_sizes(counts_E)
        _, L, D = x_ALD.shape
        a_pieces = list(torch.split(x_ALD, sizes))
        called = [e for e, n in enumerate(called_anywhere) if n > 0]
        for e in called:
            if sizes[e]:
                a_pieces[e] = self.experts[e].attend(a_pieces[e])
            else:  # no empty-batch attention kernels: one zero sample, none of it kept
                a_pieces[e] = self.experts[e].attend(x_ALD.new_zeros(1, L, D))[:0]
        # only experts some rank calls take part (the same list on every rank): the others have no row anywhere
        outs = exchange_token_moes([self.experts[e].moe for e in called], [a_pieces[e].reshape(-1, D) for e in called])
        y_pieces = [self.experts[e].finish(a_pieces[e], out) for e, out in zip(called, outs, strict=True)]
        real = counts_E[called].float()
        token_lb = (torch.stack([o.lb_loss.float() for o in outs]) * real).sum() / real.sum().clamp(min=1.0)
        token_z = (torch.stack([o.z_loss.float() for o in outs]) * real).sum() / real.sum().clamp(min=1.0)
        token_counts = torch.zeros(self.E, self.experts[0].moe.num_experts, dtype=torch.long, device=x_ALD.device)
        token_counts[called] = torch.stack([o.tokens_per_expert_E for o in outs]).to(token_counts.device)
        return y_pieces, token_lb, token_z, token_counts

    def _experts_dropless(self, h_BDHW: torch.Tensor, r, counts_E: torch.Tensor):
        """sum_k w_k Expert_k(h), each expert called on exactly its samples (padded under expert parallelism, unless
        the block's token MoEs share one exchange)."""
        B, D, H, W = h_BDHW.shape
        L = H * W
        slot_BK = sorted_position(r.experts_NK.reshape(-1)).view(B, self.K)  # row of (b, k), grouped by expert

        x_BLD = h_BDHW.flatten(2).transpose(1, 2)
        x_ALD = dispatch_rows(x_BLD.reshape(B, L * D), slot_BK, B * self.K).view(-1, L, D)  # sorted by expert
        if self.expert_parallel and self._one_exchange():
            y_pieces, token_lb, token_z, token_counts = self._experts_exchanged(x_ALD, counts_E)
            keep_in_graph, dropped = h_BDHW.new_zeros(()), None
        else:
            one_by_one = self._experts_one_by_one(x_ALD, counts_E)
            y_pieces, token_lb, token_z, token_counts, dropped, keep_in_graph = one_by_one

        # back to (sample, k) order, then the router-weighted sum over the K experts of each sample
        y_BKLD = gather_rows(torch.cat(y_pieces, dim=0), slot_BK)
        w_BK11 = r.weights_NK.to(y_BKLD.dtype)[:, :, None, None]
        mix_BLD = (w_BK11 * y_BKLD).sum(dim=1) + keep_in_graph
        return mix_BLD, token_lb, token_z, token_counts, dropped

    def _experts_one_by_one(self, x_ALD: torch.Tensor, counts_E: torch.Tensor):
        """Expert outputs in sorted order, each expert's token MoE called on its own (padded under expert parallelism
        to the group's largest sample count)."""
        _, L, D = x_ALD.shape
        sizes = self.group_sizes(counts_E)
        y_pieces: list[torch.Tensor] = []  # expert outputs in sorted order
        keep_in_graph = x_ALD.new_zeros(())  # padding-only calls under expert parallelism (see below)
        token_counts = torch.zeros(self.E, self.experts[0].moe.num_experts, dtype=torch.long, device=x_ALD.device)
        token_lb = token_z = x_ALD.new_zeros((), dtype=torch.float32)
        dropped = None  # token-level drops, when the token MoE routes statically
        real_total = 0
        start = 0
        for e, (real, size) in enumerate(zip(counts_E.tolist(), sizes, strict=True)):
            seg = slice(start, start + real)
            start += real
            if size == 0:
                continue
            x_SLD = x_ALD[seg]
            valid_N = None
            if size > real:
                x_SLD = torch.cat([x_SLD, x_SLD.new_zeros(size - real, L, D)], dim=0)
                valid_N = torch.arange(size * L, device=x_SLD.device) < real * L
            y_SLD, m = self.experts[e](x_SLD, valid_N)
            if real > 0:
                y_pieces.append(y_SLD[:real])
            else:
                # Only padding here, but other ranks of the expert-parallel group have real samples: keep this
                # call in the autograd graph so its backward all-to-alls run on every rank, in the same order.
                keep_in_graph = keep_in_graph + 0.0 * y_SLD.sum()
            if m.dropped is not None:
                dropped = m.dropped if dropped is None else dropped + m.dropped
            token_counts[e] = m.tokens_per_expert_E.to(token_counts.device)
            # token losses averaged over the block's real samples (each expert's loss is ~1 when balanced)
            token_lb = token_lb + m.lb_loss.float() * real
            token_z = token_z + m.z_loss.float() * real
            real_total += real
        if real_total > 0:
            token_lb, token_z = token_lb / real_total, token_z / real_total
        return y_pieces, token_lb, token_z, token_counts, dropped, keep_in_graph
