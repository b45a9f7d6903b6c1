"""Configuration of the token-level Sub-MoE (one dataclass, defaults next to the code that uses them)."""

from __future__ import annotations

from dataclasses import dataclass

from nestor_ds.errors import UserError

BACKENDS = ("local", "megablocks")
# "deepspeed" named the removed wrapper of deepspeed.moe.layer.MoE; its checkpoints use the same parameter names as
# the local backend's expert-parallel layout, so old configs and checkpoints run on "local" (docs/scaling.md)
LEGACY_BACKENDS = {"deepspeed": "local"}
ROUTINGS = ("dropless", "static")
# Rows per expert under static routing: Q = ceil(cf * N * K / E), N rows of the call. On the demo mixture factors
# 1.0-2.0 all matched dropless L2RE within seed noise; 1.25 keeps a margin (docs/benchmarks.md, "Static routing").
DEFAULT_CAPACITY_FACTOR = 1.25
# Q is rounded up to a multiple of 8 rows: tensor-core tiles (bf16 mma works on 8/16-row tiles) and 32-byte
# aligned buffers; the extra rows cost at most 7 per expert.
CAPACITY_MULTIPLE = 8


@dataclass
class MoEConfig:
    """Token-level mixture of SwiGLU experts.

    Defaults are NESTOR's: top-2 of 6 routed experts plus one always-on shared expert, hidden width
    equal to the model width, no capacity limit (dropless). routing="static" gives each expert a fixed buffer
    of Q = ceil(capacity_factor * N * K / E) rows (rounded up to 8) during training: no host sync and static
    shapes (torch.compile fullgraph, CUDA graphs); overflow is dropped lowest router weight first and counted.
    Evaluation always routes dropless (a sample's prediction must not depend on the rest of its batch).
    """

    backend: str = "local"  # "local" (plain PyTorch; expert parallel when ep_size > 1) | "megablocks" (CUDA)
    num_experts: int = 6  # routed experts E
    top_k: int = 2  # experts per token K
    num_shared_experts: int = 1  # always-on SwiGLU experts, added to every token
    mlp_ratio: float = 1.0  # expert hidden width F = int(dim * mlp_ratio)
    shared_hidden_ratio: float | None = None  # shared-expert hidden per shared expert / dim; None = mlp_ratio
    # expert-parallel group: ranks that split the token experts, num_experts / ep_size each ("auto" or a divisor of
    # the world size and num_experts in YAML; the engine resolves it and passes it to build_model)
    ep_size: int = 1
    routing: str = "dropless"  # "dropless" (every assignment computed) | "static" (fixed per-expert capacity)
    capacity_factor: float | None = None  # static only: Q = ceil(cf*N*K/E) rows per expert; None = default
    router_noise: float = 0.0  # std of Gaussian noise added to router logits, training only

    def hidden_dim(self, dim: int) -> int:
        """Expert hidden width F for model width `dim`."""
        return int(dim * self.mlp_ratio)

    @property
    def static(self) -> bool:
        return self.routing == "static"

    def capacity(self, rows: int) -> int:
        """Rows per expert Q for a call with `rows` rows under static routing (rounded to CAPACITY_MULTIPLE)."""
        from .dispatch import capacity

        factor = DEFAULT_CAPACITY_FACTOR if self.capacity_factor is None else self.capacity_factor
        return capacity(factor, rows, self.top_k, self.num_experts, CAPACITY_MULTIPLE)

    def shared_hidden_dim(self, dim: int) -> int:
        """Hidden width of the always-on SwiGLU: S shared experts run as one SwiGLU of S times the width.
        The authors' Ti uses a LLaMA-style width 2/3 * dim (set by the nestor-ti preset)."""
        ratio = self.mlp_ratio if self.shared_hidden_ratio is None else self.shared_hidden_ratio
        return int(dim * ratio) * self.num_shared_experts

    def validate(self) -> MoEConfig:
        """Raise ValueError with one clear line for an inconsistent configuration; return self."""
        if self.backend in LEGACY_BACKENDS:
            import logging

            logging.getLogger("nestor_ds").warning(
                "moe.backend=%r was removed; running %r (same parameter layout)",
                self.backend,
                LEGACY_BACKENDS[self.backend],
            )
            self.backend = LEGACY_BACKENDS[self.backend]
        if self.backend not in BACKENDS:
            raise UserError(f"moe.backend={self.backend!r}: expected one of {BACKENDS}")
        if self.num_experts < 1:
            raise UserError(f"moe.num_experts={self.num_experts}: must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise UserError(f"moe.top_k={self.top_k}: must be in [1, num_experts={self.num_experts}]")
        if self.num_shared_experts < 0:
            raise UserError(f"moe.num_shared_experts={self.num_shared_experts}: must be >= 0")
        if self.mlp_ratio <= 0:
            raise UserError(f"moe.mlp_ratio={self.mlp_ratio}: must be > 0")
        if self.shared_hidden_ratio is not None and self.shared_hidden_ratio <= 0:
            raise UserError(f"moe.shared_hidden_ratio={self.shared_hidden_ratio}: must be > 0 (or None = mlp_ratio)")
        if self.ep_size < 1 or self.num_experts % self.ep_size != 0:
            raise UserError(f"moe.ep_size={self.ep_size}: must be >= 1 and divide num_experts={self.num_experts}")
        if self.routing not in ROUTINGS:
            raise UserError(f"moe.routing={self.routing!r}: expected one of {ROUTINGS}")
        if self.static and self.capacity_factor is not None and self.capacity_factor <= 0:
            raise UserError(f"moe.capacity_factor={self.capacity_factor}: must be > 0 with moe.routing='static'")
        if not self.static and self.capacity_factor not in (None, 0, 0.0):
            # older configs meant "capacity_factor > 0 = drop tokens"; the switch is explicit now
            raise UserError(
                f"moe.capacity_factor={self.capacity_factor} is used only by moe.routing='static' "
                f"(set moe.routing: static, or remove capacity_factor for dropless)"
            )
        if self.router_noise < 0:
            raise UserError(f"moe.router_noise={self.router_noise}: must be >= 0")
        if self.backend == "megablocks":
            if self.ep_size != 1:
                raise UserError(
                    f"moe.ep_size={self.ep_size}: moe.backend='megablocks' has no expert parallelism; "
                    "use moe.backend='local'"
                )
            if self.static:
                raise UserError("moe.routing='static' is not supported by moe.backend='megablocks' (dropless only)")
            if self.router_noise > 0:
                raise UserError(
                    "moe.router_noise > 0 is not supported by moe.backend='megablocks' "
                    "(its router jitter is multiplicative, not Gaussian logit noise); use 0"
                )
        return self
