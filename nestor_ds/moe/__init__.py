"""Token-level Sub-MoE of NESTOR: top-k routed SwiGLU experts plus shared SwiGLU experts.

    moe = build_token_moe(MoEConfig(num_experts=6, top_k=2), dim=512)
    out = moe(x_ND, valid_N)          # MoEOutput(out_ND, lb_loss, z_loss, tokens_per_expert_E)

Backends: "local" (plain PyTorch, dropless or static routing; expert parallel with all-to-all-v when
ep_size > 1, see expert_parallel.py) and "megablocks" (MegaBlocks dMoE, CUDA only). DeepSpeed's legacy
deepspeed.moe.layer.MoE backend was removed (slower than the local one: docs/benchmarks.md);
tools/bench_moe_ep.py still runs it for comparison.
"""

from __future__ import annotations

from .base import MoEOutput, TokenMoE
from .config import MoEConfig
from .experts import GroupedSwiGLU, SwiGLU, grouped_mm_supported
from .local import LocalTokenMoE
from .router import (
    Routing,
    TopKRouter,
    expert_load_stats,
    load_balancing_loss,
    route_from_logits,
    router_z_loss,
    tokens_per_expert,
)

__all__ = [
    "MoEConfig",
    "MoEOutput",
    "TokenMoE",
    "build_token_moe",
    "LocalTokenMoE",
    "GroupedSwiGLU",
    "SwiGLU",
    "TopKRouter",
    "Routing",
    "route_from_logits",
    "load_balancing_loss",
    "router_z_loss",
    "tokens_per_expert",
    "expert_load_stats",
    "grouped_mm_supported",
]


def build_token_moe(cfg: MoEConfig, dim: int) -> TokenMoE:
    """Build the configured backend. With ep_size > 1 the module holds this rank's experts (rank % ep_size of
    torch.distributed, 0 without it) and needs its group before the first forward:
    nestor_ds.model.parallelize.apply_expert_parallel."""
    cfg.validate()
    if cfg.backend == "local":
        if cfg.ep_size > 1:
            from .expert_parallel import ExpertParallelTokenMoE  # imports deepspeed only when asked for

            return ExpertParallelTokenMoE(cfg, dim)
        return LocalTokenMoE(cfg, dim)
    from .megablocks_backend import MegaBlocksTokenMoE

    return MegaBlocksTokenMoE(cfg, dim)
