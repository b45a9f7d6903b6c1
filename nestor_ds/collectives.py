"""Host-side collectives on small tensors (statistics, flags, logged numbers), whatever the backend.

Shared by the engine, checkpointing, evaluation and tracking; all are no-ops without a process group.
"""

from __future__ import annotations

import torch


def all_reduce_host(t: torch.Tensor, op: torch.distributed.ReduceOp.RedOpType = None, group=None) -> torch.Tensor:
    """In-place all-reduce of a small host-side tensor (statistics, flags) whatever the backend.

    NCCL reduces only CUDA tensors ("No backend type associated with device type cpu", seen on an H200), gloo only
    CPU ones: the tensor travels to the backend's device and back. A no-op without a process group.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    op = torch.distributed.ReduceOp.SUM if op is None else op
    if torch.distributed.get_backend(group) == "nccl" and t.device.type != "cuda":
        moved = t.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(moved, op=op, group=group)
        t.copy_(moved.cpu())
    else:
        torch.distributed.all_reduce(t, op=op, group=group)
    return t


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Average a small tensor over all ranks (for logging identical numbers on every rank)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        values = all_reduce_host(values.clone()) / torch.distributed.get_world_size()
    return values


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (preemption must be agreed on before a collective save)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return flag
    t = all_reduce_host(torch.tensor([1.0 if flag else 0.0]), torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)
