"""SwiGLU experts: one expert as a module (shared expert, DeepSpeed's per-expert module) and E experts
as grouped weights run by one grouped matmul per projection.

Shape legend: R routed rows (tokens sorted by expert), D model width, F hidden width, E experts.
SwiGLU(x) = W2 (silu(W1 x) * W3 x), no biases.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn


def _init_uniform_(w: torch.Tensor, fan_in: int) -> None:
    """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so grouped and per-expert
    modules start from the same distribution (never leave torch.empty memory in a weight)."""
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(w, -bound, bound)


class SwiGLU(nn.Module):
    """One SwiGLU feed-forward: w1, w3: Linear(D -> F), w2: Linear(F -> D), no biases.

    Used as the shared expert and as the per-expert module DeepSpeed replicates. S shared experts are
    built as one SwiGLU of hidden S*F, which is exactly the sum of S SwiGLUs of hidden F.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_ND)) * self.w3(x_ND))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: torch._grouped_mm's backward
    rejects expanded gradients (e.g. from `.sum()`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


@functools.lru_cache(maxsize=None)
def grouped_mm_supported(device: torch.device, dtype: torch.dtype, dim: int, hidden: int) -> bool:
    """Whether torch._grouped_mm runs forward and backward for these sizes on this device/dtype.

    It needs fp32/bf16/fp16, 16-byte aligned row strides, and (on CUDA) a recent GPU; probing once
    with tiny tensors is more reliable than encoding those rules here.
    """
    if not hasattr(torch, "_grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    itemsize = torch.empty((), dtype=dtype).element_size()
    if (dim * itemsize) % 16 or (hidden * itemsize) % 16:
        return False
    try:
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):  # may be first called under no_grad (eval)
            return _probe_grouped_mm(device, dtype, dim, hidden)
    except (RuntimeError, NotImplementedError):
        return False


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype, dim: int, hidden: int) -> bool:
    """One tiny forward + backward; raises where the kernel is missing (runs under fork_rng: no RNG side effect)."""
    x_RD = torch.randn(3, dim, device=device, dtype=dtype, requires_grad=True)
    w_EFD = torch.randn(2, hidden, dim, device=device, dtype=dtype, requires_grad=True)
    offs_E = torch.tensor([1, 3], device=device, dtype=torch.int32)
    y_RF = _ContiguousGrad.apply(torch._grouped_mm(x_RD, w_EFD.transpose(-2, -1), offs=offs_E))
    y_RF.sum().backward()
    return True


class GroupedSwiGLU(nn.Module):
    """E SwiGLU experts stored as grouped weights w1_EFD, w3_EFD [E, F, D] and w2_EDF [E, D, F].

    forward takes rows already sorted by expert with counts_E rows per expert, and runs one
    torch._grouped_mm per projection when the device/dtype supports it, else a loop over experts
    on contiguous slices (same math).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.w1_EFD = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w3_EFD = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w2_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_uniform_(self.w1_EFD, self.dim)
        _init_uniform_(self.w3_EFD, self.dim)
        _init_uniform_(self.w2_EDF, self.hidden)

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor, use_grouped_mm: bool | None = None) -> torch.Tensor:
        if use_grouped_mm is None:
            use_grouped_mm = grouped_mm_supported(x_RD.device, x_RD.dtype, self.dim, self.hidden)
        if use_grouped_mm:
            return self._forward_grouped(x_RD.contiguous(), counts_E)
        return self._forward_loop(x_RD, counts_E)

    def _forward_grouped(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offs_E = counts_E.cumsum(0).to(torch.int32)  # end row of each expert's group

        def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            # a [R, in] @ w[e]^T for the rows of expert e; w is [E, out, in]
            return _ContiguousGrad.apply(torch._grouped_mm(a, w.to(a.dtype).transpose(-2, -1), offs=offs_E))

        h_RF = F.silu(mm(x_RD, self.w1_EFD)) * mm(x_RD, self.w3_EFD)
        return mm(h_RF, self.w2_EDF)

    def _forward_loop(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        outs = []
        for e, x_rD in enumerate(torch.split(x_RD, counts_E.tolist())):
            w1, w3, w2 = (w[e].to(x_RD.dtype) for w in (self.w1_EFD, self.w3_EFD, self.w2_EDF))
            outs.append(F.linear(F.silu(F.linear(x_rD, w1)) * F.linear(x_rD, w3), w2))
        return torch.cat(outs, dim=0) if outs else x_RD.new_zeros(0, self.dim)
