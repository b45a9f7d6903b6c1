"""Parallelism applied to a built model from outside (torchtitan's `parallelize` habit): the engine creates the
process groups (nestor_ds.engine.distributed.setup_expert_parallel) and hands them to the model here, in one call,
before deepspeed.initialize. Nothing in nestor_ds.model or nestor_ds.moe looks a group up by itself.

What each group is for:

- ep_group: the expert-parallel group of the token MoEs (moe.ep_size > 1). Each ExpertParallelTokenMoE runs its
  all-to-all-v token exchange over it, and each ImageMoE agrees its dropless sample-group sizes over it (every
  rank of the group must call each image expert's token MoE with the same number of rows).
- lockstep_group: every rank of this group (the data-parallel world) must call the same image experts in the same
  order, so the ImageMoEs agree which experts to call over it instead. ZeRO-3 gathers a module's parameters when it
  is called (``lockstep_mode="always"``); ZeRO-1/2 reduce gradients parameter by parameter, so there the experts
  agree only while gradients are taken (``"backward"``; evaluation and inference stay rank-local).

Parameter names and shapes are unchanged (the groups are plain attributes, not state).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from nestor_ds.moe.expert_parallel import ExpertParallelTokenMoE

from .image_moe import ImageMoE


def apply_expert_parallel(
    model: nn.Module,
    ep_group: dist.ProcessGroup | None = None,
    lockstep_group: dist.ProcessGroup | None = None,
    lockstep_mode: str = "always",
) -> int:
    """Give every MoE layer of ``model`` (a NESTOR model, an ImageMoE or a lone token MoE) its process groups.

    ``lockstep_mode``: ``"always"`` (ZeRO-3) or ``"backward"`` (ZeRO-1/2: only calls that record a backward).
    Returns how many layers (token MoEs + image MoEs) received a group. An expert-parallel token MoE without
    ``ep_group`` is an error: its experts are a shard and it cannot run alone.
    """
    if lockstep_mode not in ("always", "backward"):
        raise ValueError(f"apply_expert_parallel: lockstep_mode={lockstep_mode!r} must be 'always' or 'backward'")
    given = 0
    for m in model.modules():
        if isinstance(m, ExpertParallelTokenMoE):
            if ep_group is None:
                raise ValueError(
                    "apply_expert_parallel: the model has expert-parallel token MoEs "
                    f"(moe.ep_size={m.ep_size}) but no ep_group was given"
                )
            m.set_group(ep_group)
            given += 1
        elif isinstance(m, ImageMoE) and (ep_group is not None or lockstep_group is not None):
            m.ep_group, m.lockstep_group, m.lockstep_mode = ep_group, lockstep_group, lockstep_mode
            given += 1
    return given
