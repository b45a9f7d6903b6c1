"""Multi-head self-attention over the tokens of one sample.

Kernel choice: flash-attn (`flash_attn_func`) when it is installed, the tensor is on CUDA in bf16/fp16 and
the config allows it ("auto" or "flash"); otherwise torch's scaled_dot_product_attention, which picks its
own fused kernel (flash / memory-efficient / CPU flash). The chosen path is logged once per process.
Attention dropout is applied only in training (the authors kept it on in evaluation).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

try:  # flash-attn needs CUDA to build and import; absent on CPU machines
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_func = None

_logged: set[str] = set()


def _log_once(path: str) -> None:
    if path not in _logged:
        _logged.add(path)
        log.info("attention kernel path: %s", path)


def attention_path(backend: str, x: torch.Tensor) -> str:
    """'flash' or 'sdpa' for this input; raises when 'flash' is required but unusable."""
    usable = flash_attn_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash" and not usable:
        raise RuntimeError(
            "attention='flash' needs flash-attn installed and CUDA bf16/fp16 inputs; "
            f"got flash_attn={'yes' if flash_attn_func else 'no'}, device={x.device}, dtype={x.dtype}"
        )
    return "flash" if usable and backend in ("auto", "flash") else "sdpa"


class SelfAttention(nn.Module):
    """Fused-QKV multi-head self-attention over each sample's tokens: [B, L, D] -> [B, L, D] (no residual; the caller
    adds it)."""

    def __init__(self, dim: int, num_heads: int, attn_dropout: float = 0.0, backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention: width {dim} not divisible by num_heads={num_heads}")
        self.h, self.dh = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout
        self.backend = backend

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        p = self.attn_dropout if self.training else 0.0
        qkv = self.qkv(x_BLD).view(B, L, 3, self.h, self.dh)
        path = attention_path(self.backend, x_BLD)
        if not torch.compiler.is_compiling():  # logging inside a compiled region would break the graph
            _log_once(path)
        if path == "flash":
            q, k, v = qkv.unbind(2)  # [B, L, h, dh]
            o = flash_attn_func(q, k, v, dropout_p=p)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, L, dh]
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=p).transpose(1, 2)
        return self.proj(o.reshape(B, L, D))
