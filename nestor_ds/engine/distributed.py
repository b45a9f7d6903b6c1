"""Process-group setup, expert-parallel size resolution, threads and seeds.

Why here and not in the model: parallelism is applied from outside (torchtitan's habit). The model sees only an
integer ``ep_size``; this module decides it from the world size and the expert count, and starts the process group
the same way whether the run was launched by ``deepspeed``, ``torchrun`` or as a plain single process.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from nestor_ds.engine.peers import start_heartbeat
from nestor_ds.errors import UserError
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


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Start (or join) the default process group through DeepSpeed.

    A plain ``python -m nestor_ds.train`` has no launcher environment: we fill in a world of one on a free
    loopback port, so the same DeepSpeed engine path runs everywhere. DeepSpeed picks gloo on CPU, NCCL on GPU.

    ``timeout_s`` (``train.collective_timeout_s``) bounds every collective of every group, so a rank whose peer died
    or froze (a lost node) fails within it instead of waiting 10 (NCCL) or 30 (gloo) minutes; it also bounds how long
    the first node waits for the others to join under the DeepSpeed launcher. With several ranks, a heartbeat through
    the rendezvous store lets ``peers.exit_on_lost_peer`` name the peer that went away.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if int(os.environ["WORLD_SIZE"]) > ranks_per_node(int(os.environ["WORLD_SIZE"])):  # several nodes
        per_host_extensions_dir()
    accel = get_accelerator()
    backend = accel.communication_backend_name()
    if not torch.distributed.is_initialized():
        kwargs = {}
        if timeout_s is not None:
            kwargs["timeout"] = bound_collectives(timeout_s)
        store = _attempt_store(kwargs.get("timeout"))
        if store is not None:  # torch's own set-up, on a store of this attempt; DeepSpeed adopts the group
            torch.distributed.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                                 world_size=int(os.environ["WORLD_SIZE"]), **kwargs)  # fmt: skip
        deepspeed.init_distributed(dist_backend=backend, **kwargs)
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = ranks_per_node(world)
    if world > 1:
        start_heartbeat(rank, world, where=f"{socket.gethostname()} node {node_rank()} pid {os.getpid()}")
    if accel.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(local_rank))
    return DistInfo(rank, world, local_rank, local_world, device)


def _attempt_store(timeout: timedelta | None) -> Any:
    """A restarted attempt under torchrun's elastic agent: the agent's store, prefixed by the restart count; else
    None (the usual env:// set-up).

    Why: torch 2.13's agent shares its rendezvous store with the workers and keeps it across restarts, and env://
    adds no attempt prefix there ("we create a new TCPStore for every retry", torch/distributed/rendezvous.py), so a
    restarted rank can read the dead attempt's gloo/NCCL addresses and fail to connect. The first attempt keeps
    torch's default, so nothing changes for runs that never restart."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not attempt.isdigit() or int(attempt) == 0:
        return None
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timeout or timedelta(minutes=30),
        wait_for_workers=False,
    )
    return torch.distributed.PrefixStore(f"/nestor/attempt_{attempt}", store)


def ranks_per_node(world_size: int, env: Mapping[str, str] | None = None) -> int:
    """Ranks on this node, from what the launcher set: ``LOCAL_WORLD_SIZE`` (torchrun), ``LOCAL_SIZE`` or
    ``world / CROSS_SIZE`` (the DeepSpeed launcher's launch.py, which sets no LOCAL_WORLD_SIZE), else the world (one
    node). Why it matters: ``ep_size: auto`` keeps expert-parallel groups inside a node, and threads are split by it."""
    env = os.environ if env is None else env
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if env.get(key, "").isdigit() and int(env[key]) > 0:
            return int(env[key])
    nodes = env.get("CROSS_SIZE", "")
    if nodes.isdigit() and int(nodes) > 0 and world_size % int(nodes) == 0:
        return world_size // int(nodes)
    return world_size


def node_rank(env: Mapping[str, str] | None = None) -> int | None:
    """This node's index: ``GROUP_RANK`` (torchrun) or ``CROSS_RANK`` (DeepSpeed's launch.py); None when unknown."""
    env = os.environ if env is None else env
    for key in ("GROUP_RANK", "CROSS_RANK"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return None


def per_host_extensions_dir(env: MutableMapping[str, str] | None = None, host: str | None = None) -> str:
    """Give each host its own torch-extension build directory unless the user chose one (``TORCH_EXTENSIONS_DIR``).

    Why: torch's default, ``~/.cache/torch_extensions``, sits on the shared home of most clusters, and DeepSpeed
    builds its CPU ops with ``-march=native``: a build made on one node can crash another node's CPU, and a node
    killed during a build leaves the lock file that makes every later start wait for it. Ranks of one host still
    share one build (torch's file lock serialises them; same CPU). Returns the directory in use."""
    env = os.environ if env is None else env
    if not env.get("TORCH_EXTENSIONS_DIR"):
        base = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"
        env["TORCH_EXTENSIONS_DIR"] = str(base / (host or socket.gethostname()))
    return env["TORCH_EXTENSIONS_DIR"]


def bound_collectives(timeout_s: float) -> timedelta:
    """The process-group timeout, also made the default of groups created later (DeepSpeed's expert and
    expert-data-parallel groups pass none, and torch would give them 30 min on gloo, 10 on NCCL)."""
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=float(timeout_s))
    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


def resolve_ep_size(
    requested: int | str,
    world_size: int,
    num_experts: int,
    backend: str,
    zero_stage: int = 0,
    ranks_per_node: int | None = None,
) -> int:
    """``auto``: 1 when every rank is on one node (there the token exchange adds about the bytes it saves on the same
    wires and the routing imbalance makes it a net loss: docs/scaling.md, "Where expert parallelism pays"); across
    nodes, the largest size dividing the world size, the token-expert count and the ranks per node (``local`` and the
    legacy ``deepspeed`` backend): groups are consecutive ranks, so one that divides the ranks per node never sends
    its token exchange over the network, and the experts' gradients leave the inter-node all-reduce (24 ranks on 3
    nodes of 8 with 6 experts: 2, not 6). Ask for an ep_size explicitly to run expert parallel on one node. 1 under
    ZeRO-3 (DeepSpeed partitions MoE parameters only up to stage 2), for ``megablocks`` (all experts on every rank)
    and for ``none`` (the AFNO baseline)."""
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
            raise UserError(f"model.moe.ep_size={requested}: {why}")
        return 1
    if requested == "auto":
        node = ranks_per_node or world_size
        if node >= world_size:  # one node
            return 1
        return max(
            d
            for d in range(1, min(world_size, num_experts) + 1)
            if world_size % d == 0 and num_experts % d == 0 and node % d == 0
        )
    ep = int(requested)
    if world_size % ep or num_experts % ep:
        raise UserError(
            f"model.moe.ep_size={ep} must divide both the world size ({world_size}) and "
            f"model.moe.num_experts ({num_experts}); use 'auto' to pick the largest that does"
        )
    return ep


def setup_expert_parallel(
    model: torch.nn.Module, ep_size: int, zero_stage: int = 0
) -> torch.distributed.ProcessGroup | None:
    """Create the process groups the model's MoE layers need and hand them over, before deepspeed.initialize.

    The expert-parallel groups (consecutive ranks, ep_size > 1) are created in DeepSpeed's group registry
    (``deepspeed.utils.groups``, name ``ep_size_<P>``): its engine and ZeRO-1/2 look up the expert-data-parallel
    group there to average expert gradients.

    Lock-step (several ranks, ZeRO 1-3): every rank of the data-parallel world calls the same image experts, in the
    same order, because DeepSpeed's ZeRO needs the same parameters on every rank at the same point. ZeRO-1/2 reduce
    each parameter's gradient with its own collective, skipping parameters without one (ZeRO-1, after backward) or in
    the order gradients arrive (ZeRO-2's hooks): ranks that routed their samples to different image experts issue
    different collectives and gloo aborts, NCCL hangs. So under ZeRO-1/2 the experts agree while gradients are taken
    (``mode="backward"``), and under ZeRO-3, which gathers a module's weights when it is called, on every call
    (``"always"``). ZeRO-0 needs none: DeepSpeed gives parameters without a gradient a zero one and all-reduces all
    of them in one fixed order. Both go to the model through `nestor_ds.model.parallelize.apply_expert_parallel`.
    Returns the expert-parallel group (None for ep_size 1).
    """
    from nestor_ds.model.parallelize import apply_expert_parallel

    ep_group = None
    if ep_size > 1:
        from nestor_ds.compat import expert_parallel_group

        ep_group = expert_parallel_group(ep_size)
    multi_rank = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    lockstep_group = torch.distributed.group.WORLD if multi_rank and zero_stage >= 1 else None
    mode = "always" if zero_stage == 3 else "backward"
    apply_expert_parallel(model, ep_group, lockstep_group, lockstep_mode=mode)
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
