"""SwiGLU experts: one expert as a module (shared expert, DeepSpeed's per-expert module) and E experts
as grouped weights run over an expert-major row buffer.

Shape legend: A routed assignments, S rows of the expert-major buffer, D model width, F hidden width,
E experts, J chunks of G rows (padded kernel), N rows of a single expert module.
SwiGLU(x) = W2 (silu(W1 x) * W3 x), no biases.

Two kernels for the E experts, chosen per device (same math, same parameters):
  - "grouped": rows sorted by expert, one torch._grouped_mm per projection (fast on Hopper GPUs);
  - "padded": each expert's rows cut into chunks of G rows (the last one zero-padded), one torch.bmm per
    projection over the J chunks with each chunk's expert weights: the fallback where grouped_mm does not run
    (fp64, unaligned widths, GPUs without it) and the layout of static routing's fixed buffers. G is chosen
    from the expert loads so that an unbalanced router (e.g. at initialisation) wastes little on padding.
Timings of both kernels: docs/benchmarks.md ("Model step").
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import sorted_position


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


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, dim: int, hidden: int) -> bool:
    """Whether torch._grouped_mm runs forward and backward for these sizes on this device/dtype.

    It needs fp32/bf16/fp16, 16-byte aligned row strides, and (on CUDA) a recent GPU; probing once
    with tiny tensors is more reliable than encoding those rules here. False while torch.compile traces: the probe
    would run on fake tensors, whose _grouped_mm (torch 2.13) accepts bf16 only although the CPU kernel runs fp32,
    and its failure must not be remembered as the eager answer (the padded kernel traces everywhere; the regions
    that compile a token MoE use it anyway).
    """
    if torch.compiler.is_compiling():
        return False
    return _grouped_mm_runs(device, dtype, dim, hidden)


@functools.cache
def _grouped_mm_runs(device: torch.device, dtype: torch.dtype, dim: int, hidden: int) -> bool:
    """grouped_mm_supported's eager answer, probed once per device, dtype and sizes."""
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
    x_SD = torch.randn(3, dim, device=device, dtype=dtype, requires_grad=True)
    w_EFD = torch.randn(2, hidden, dim, device=device, dtype=dtype, requires_grad=True)
    offs_E = torch.tensor([1, 3], device=device, dtype=torch.int32)
    y_SF = _ContiguousGrad.apply(torch._grouped_mm(x_SD, w_EFD.transpose(-2, -1), offs=offs_E))
    y_SF.sum().backward()
    return True


KERNELS = ("grouped", "padded")


def chunk_rows(counts: list[int], overhead_rows: int = 64, max_splits: int = 8) -> int:
    """Rows per chunk G for the padded kernel: the G = ceil(max_count / j), j = 1..max_splits, rounded up to 8,
    that minimises padded rows + a fixed per-chunk cost (`overhead_rows`: its weight copy, forward and backward).
    Balanced loads give one chunk per expert; a skewed load splits its big experts instead of padding all."""
    top = max(max(counts), 1)
    best = None
    for j in range(1, max_splits + 1):
        c = math.ceil(math.ceil(top / j) / 8) * 8
        cost = sum(-(-n // c) for n in counts) * (c + overhead_rows)
        if best is None or cost < best[0]:
            best = (cost, c)
    return best[1]


@dataclass
class ExpertLayout:
    """Where each expert's rows sit in the expert-major buffer [S, D] that GroupedSwiGLU consumes.

    grouped: S = A rows sorted by expert, offs_E = end row of each expert's group;
    padded: S = J * G rows, chunk j holds rows of expert expert_J[j] (unused rows are zero).
    """

    kernel: str
    rows: int
    offs_E: torch.Tensor | None = None  # grouped: int32 [E]
    chunk: int = 0  # padded: G
    expert_J: torch.Tensor | None = None  # padded: long [J]
    one_chunk_per_expert: bool = False  # padded: expert_J == arange(E): use the weights as they are


def plan_layout(expert_A: torch.Tensor, counts_E: torch.Tensor, kernel: str) -> tuple[torch.Tensor, ExpertLayout]:
    """slot_A: the buffer row of each assignment (experts in order, assignments in order inside an expert),
    and the buffer layout for `kernel`. One stable argsort; the padded kernel also reads counts_E on the host."""
    A = expert_A.numel()
    rank_A = sorted_position(expert_A)  # row in the sorted (grouped) layout
    if kernel == "grouped":
        return rank_A, ExpertLayout("grouped", A, offs_E=counts_E.cumsum(0).to(torch.int32))
    counts = counts_E.tolist()
    G = chunk_rows(counts)
    chunks_E = (counts_E + G - 1) // G
    start_E = counts_E.cumsum(0) - counts_E  # first sorted row of each expert
    first_chunk_E = chunks_E.cumsum(0) - chunks_E
    slot_A = rank_A + (first_chunk_E * G - start_E).index_select(0, expert_A)
    expert_J = torch.repeat_interleave(torch.arange(len(counts), device=expert_A.device), chunks_E)
    J = expert_J.numel()
    one_each = J == len(counts) and all(n > 0 for n in counts)
    return slot_A, ExpertLayout("padded", J * G, chunk=G, expert_J=expert_J, one_chunk_per_expert=one_each)


class GroupedSwiGLU(nn.Module):
    """E SwiGLU experts stored as grouped weights w1_EFD, w3_EFD [E, F, D] and w2_EDF [E, D, F].

    forward(x_SD, layout) runs every expert on its rows of the expert-major buffer (see ExpertLayout).
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

    def default_kernel(self, x: torch.Tensor) -> str:
        """grouped_mm wherever it runs for this device/dtype/size (CUDA and CPU), else the padded batched matmul."""
        return "grouped" if grouped_mm_supported(x.device, x.dtype, self.dim, self.hidden) else "padded"

    def forward(self, x_SD: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
        return run_experts(x_SD, layout, self.w1_EFD, self.w3_EFD, self.w2_EDF)


def run_experts(
    x_SD: torch.Tensor, layout: ExpertLayout, w1_EFD: torch.Tensor, w3_EFD: torch.Tensor, w2_EDF: torch.Tensor
) -> torch.Tensor:
    """E SwiGLU experts with weights [E, F, D], [E, F, D], [E, D, F] over the expert-major buffer x_SD (see
    ExpertLayout). A function of the weights, so the expert-parallel backend runs it on its local experts."""
    if layout.kernel == "grouped":
        return _forward_grouped(x_SD.contiguous(), layout.offs_E, w1_EFD, w3_EFD, w2_EDF)
    return _forward_padded(x_SD, layout, w1_EFD, w3_EFD, w2_EDF)


def _forward_grouped(
    x_SD: torch.Tensor, offs_E: torch.Tensor, w1_EFD: torch.Tensor, w3_EFD: torch.Tensor, w2_EDF: torch.Tensor
) -> torch.Tensor:
    def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # a [S, in] @ w[e]^T for the rows of expert e; w is [E, out, in]
        return _ContiguousGrad.apply(torch._grouped_mm(a, w.to(a.dtype).transpose(-2, -1), offs=offs_E))

    h_SF = F.silu(mm(x_SD, w1_EFD)) * mm(x_SD, w3_EFD)
    return mm(h_SF, w2_EDF)


def _forward_padded(
    x_SD: torch.Tensor, layout: ExpertLayout, w1_EFD: torch.Tensor, w3_EFD: torch.Tensor, w2_EDF: torch.Tensor
) -> torch.Tensor:
    J, G = layout.rows // max(layout.chunk, 1), layout.chunk
    dim = w2_EDF.shape[1]
    if J == 0:
        return x_SD.new_zeros(0, dim)

    def weights(w: torch.Tensor) -> torch.Tensor:  # [E, out, in] -> [J, in, out]
        w = w if layout.one_chunk_per_expert else w.index_select(0, layout.expert_J)
        return w.to(x_SD.dtype).transpose(1, 2)

    x_JGD = x_SD.view(J, G, dim)
    h_JGF = F.silu(torch.bmm(x_JGD, weights(w1_EFD))) * torch.bmm(x_JGD, weights(w3_EFD))
    return torch.bmm(h_JGF, weights(w2_EDF)).view(J * G, dim)
