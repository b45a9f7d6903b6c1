"""MegaBlocks dropless MoE (dMoE, grouped GEMM kernels) for the routed experts, CUDA only.

Shape legend: N rows, V valid rows (N less padding), D width, F hidden, E experts, K top-k.

MegaBlocks' router = Linear(D -> E, no bias) + softmax + top-k; with moe_normalize_expert_weights=1
the k weights are divided by their L1 norm, i.e. renormalised over the k like the other backends.
Its GLU experts store w1, v1, w2 as [E*F, D] (w2 applied untransposed), so
    local experts.w1_EFD = mlp.w1.view(E, F, D), experts.w3_EFD = mlp.v1.view(E, F, D),
    experts.w2_EDF = mlp.w2.view(E, F, D).transpose(1, 2), router.gate.weight = router.layer.weight.
Our lb/z losses and counts are recomputed in fp32 from the router weight on valid rows (MegaBlocks'
own loss is disabled with moe_loss_weight=0 and its saved-loss list is cleared after every call).
Padding rows are overwritten with copies of valid rows (dMoE has no mask) and zeroed in the output.
megablocks 0.10 pins torch 2.7 and needs CUDA to build and import: see requirements-gpu.txt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ExternalRoutedMoE
from .config import MoEConfig
from .experts import SwiGLU

INSTALL_HINT = "pip install -r requirements-gpu.txt --no-build-isolation"


def _import_megablocks():
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except Exception as err:  # ImportError, or CUDA-extension load errors on CPU machines
        raise RuntimeError(
            f"moe.backend='megablocks' needs MegaBlocks on a CUDA machine ({INSTALL_HINT}); "
            f"import failed: {type(err).__name__}: {err}"
        ) from err
    return Arguments, dMoE


class MegaBlocksTokenMoE(ExternalRoutedMoE):
    """Token MoE whose routed experts run in MegaBlocks' dMoE; shared experts are ours."""

    def __init__(self, cfg: MoEConfig, dim: int, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        Arguments, dMoE = _import_megablocks()
        if not torch.cuda.is_available():
            raise RuntimeError(f"moe.backend='megablocks' needs a CUDA device ({INSTALL_HINT})")
        cfg.validate()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.dim, self.hidden = dim, cfg.hidden_dim(dim)
        bound_d, bound_f = 1.0 / dim**0.5, 1.0 / self.hidden**0.5
        args = Arguments(
            hidden_size=dim,
            ffn_hidden_size=self.hidden,
            bias=False,
            return_bias=False,
            activation_fn=F.silu,
            mlp_type="glu",
            mlp_impl="grouped",
            moe_num_experts=cfg.num_experts,
            moe_top_k=cfg.top_k,
            moe_normalize_expert_weights=1,
            moe_loss_weight=0.0,
            moe_jitter_eps=None,
            fp16=dtype == torch.float16,
            bf16=dtype == torch.bfloat16,
            device=torch.cuda.current_device(),
            init_method=lambda w: torch.nn.init.uniform_(w, -bound_d, bound_d),
            output_layer_init_method=lambda w: torch.nn.init.uniform_(w, -bound_f, bound_f),
        )
        self.dmoe = dMoE(args)
        self.shared = (
            SwiGLU(dim, cfg.shared_hidden_dim(dim)).to(device=args.device, dtype=dtype)
            if cfg.num_shared_experts > 0
            else None
        )

    @property
    def gate_weight(self) -> torch.Tensor:
        return self.dmoe.router.layer.weight

    def routed(self, x_ND: torch.Tensor) -> torch.Tensor:
        res = self.dmoe(x_ND.unsqueeze(1))  # dMoE wants [seq, batch, D]
        out_ND = (res[0] if isinstance(res, tuple) else res).squeeze(1)
        try:  # MegaBlocks keeps per-call router outputs for its own loss: drop them (ours is computed by the base)
            from megablocks.layers.moe import clear_load_balancing_loss

            clear_load_balancing_loss()
        except ImportError:
            pass
        return out_ND

    @torch.no_grad()
    def load_local_state(self, local_state: dict[str, torch.Tensor]) -> None:
        """Copy a LocalTokenMoE state dict into this layer (mapping in the module docstring)."""
        mlp = self.dmoe.experts.mlp
        E, Fh, D = local_state["experts.w1_EFD"].shape
        self.gate_weight.copy_(local_state["router.gate.weight"])
        mlp.w1.copy_(local_state["experts.w1_EFD"].reshape(E * Fh, D))
        mlp.v1.copy_(local_state["experts.w3_EFD"].reshape(E * Fh, D))
        mlp.w2.copy_(local_state["experts.w2_EDF"].transpose(1, 2).reshape(E * Fh, D))
        if self.shared is not None:
            self.shared.load_state_dict(
                {k[len("shared.") :]: v for k, v in local_state.items() if k.startswith("shared.")}
            )
