"""Process-group setup, expert-parallel size resolution, threads and seeds.

Why here and not in the model: parallelism is applied from outside (torchtitan's habit). The model sees only an
integer ``ep_size``; this module decides it from the world size and the expert count, and starts the process group
the same way whether the run was launched by ``deepspeed``, ``torchrun`` or as a plain single process.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

from nestor_ds.procs import free_port


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Start (or join) the default process group through DeepSpeed.

    A plain ``python -m nestor_ds.train`` has no launcher environment: we fill in a world of one on a free
    loopback port, so the same DeepSpeed engine path runs everywhere. DeepSpeed picks gloo on CPU, NCCL on GPU.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    accel = get_accelerator()
    backend = accel.communication_backend_name()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    if accel.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(local_rank))
    return DistInfo(rank, world, local_rank, local_world, device)


def resolve_ep_size(
    requested: int | str,
    world_size: int,
    num_experts: int,
    backend: str,
    zero_stage: int = 0,
    ranks_per_node: int | None = None,
) -> int:
    """``auto``: the largest size dividing the world size, the token-expert count and the ranks per node (``local``
    and the legacy ``deepspeed`` backend): groups are consecutive ranks, so one that divides the ranks per node never
    sends its token exchange over the network (24 ranks on 3 nodes of 8 with 6 experts: 2, not 6). 1 under ZeRO-3
    (DeepSpeed partitions MoE parameters only up to stage 2), for ``megablocks`` (all experts on every rank) and for
    ``none`` (the AFNO baseline)."""
    if backend in ("megablocks", "none") or zero_stage == 3:
        if requested not in ("auto", 1):
            why = (
                "the AFNO baseline has no experts"
                if backend == "none"
                else "ZeRO stage 3 does not partition MoE parameters (DeepSpeed: MoE up to stage 2); use "
                "ds_configs/zero2.json"
                if zero_stage == 3
                else f"model.moe.backend={backend} keeps all token experts on every rank; use model.moe.backend=local"
            )
            raise ValueError(f"model.moe.ep_size={requested}: {why}")
        return 1
    if requested == "auto":
        node = ranks_per_node or world_size
        return max(
            d
            for d in range(1, min(world_size, num_experts) + 1)
            if world_size % d == 0 and num_experts % d == 0 and node % d == 0
        )
    ep = int(requested)
    if world_size % ep or num_experts % ep:
        raise ValueError(
            f"model.moe.ep_size={ep} must divide both the world size ({world_size}) and "
            f"model.moe.num_experts ({num_experts}); use 'auto' to pick the largest that does"
        )
    return ep


def setup_expert_parallel(
    model: torch.nn.Module, ep_size: int, lockstep: bool = False
) -> torch.distributed.ProcessGroup | None:
    """Create the process groups the model's MoE layers need and hand them over, before deepspeed.initialize.

    The expert-parallel groups (consecutive ranks, ep_size > 1) are created in DeepSpeed's group registry
    (``deepspeed.utils.groups``, name ``ep_size_<P>``): its engine and ZeRO-1/2 look up the expert-data-parallel
    group there to average expert gradients. ``lockstep`` (ZeRO-3 with several ranks) makes every rank call the same
    image experts over the whole world, since ZeRO-3 gathers a module's weights collectively when it is called.
    Both go to the model through `nestor_ds.model.parallelize.apply_expert_parallel`. Returns the expert-parallel
    group (None for ep_size 1).
    """
    from nestor_ds.model.parallelize import apply_expert_parallel

    ep_group = None
    if ep_size > 1:
        from deepspeed.utils import groups

        name = f"ep_size_{ep_size}"
        if name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(ep_size)
        ep_group = groups._get_expert_parallel_group(name)
    multi_rank = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    lockstep_group = torch.distributed.group.WORLD if lockstep and multi_rank else None
    apply_expert_parallel(model, ep_group, lockstep_group)
    return ep_group


def set_threads(threads_per_rank: int | None, local_world_size: int) -> int:
    """Split the cores between the ranks of one node (oversubscription makes CPU runs crawl)."""
    n = threads_per_rank or max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    torch.set_num_threads(n)
    return n


def derive_seed(*parts: object) -> int:
    """One seed per purpose from the run seed: ``derive_seed(seed, "noise", rank, step)``. Stable across runs."""
    h = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
