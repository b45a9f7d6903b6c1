"""Elastic resume: continue a ZeRO-1/2 checkpoint on another world size or ep_size, weights and optimizer re-sharded.

Why: DeepSpeed's own loader needs the saving run's data-parallel world size (ZeRO partitions: "DP world size of 2
but the current world size is 1") and its parameter groups (another ep_size changes the expert groups: "parameter
group that doesn't match"). Users gain or lose nodes between jobs; the run must go on.

How (`load_resharded`, every rank, after `deepspeed.initialize` built the new engine):
1. Every saved rank's slices are read into full per-parameter tensors: the fp32 master weights and Adam's moments
   (`fp32_master.py`: the flat partitions cut by `param_shapes`, checked against each rank's `param_slice_mappings`;
   expert ids global), and the step count.
2. Token experts go to the local layout, then to this model's layout (this rank's experts) - the conversion
   fine-tuning uses (`convert.to_model_layout`). Every key and shape must match the model built for this run;
   a changed model is refused before anything is loaded, naming the tensor, both shapes and the config keys that
   differ (`refuse_changed_model`, also run before DeepSpeed's own loader on a plain resume).
3. The module takes the full weights (16-bit runs: the masters rounded); this rank's fp32 master slice and Adam
   state are written through DeepSpeed's fragment API (`safe_set_full_fp32_param`,
   `safe_set_full_optimizer_state`; deepspeed/utils/tensor_fragment.py) after the base optimizer's state is
   created with the saved step count. So a bf16 run continues from its exact fp32 masters.

What does not carry over: the fp16 loss scale (bf16/fp32 runs have none), and the data stream: it continues at
the saved number of samples (`data_position` = samples seen / samples per rank and micro-batch), drawing a fresh
deterministic stream for the new layout rather than replaying the old one. ZeRO-0 and ZeRO-3 checkpoints (or runs)
cannot be re-sharded here: `ElasticResumeError` names the supported path, fine-tuning with `--load all` (weights
re-sharded, fresh optimizer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nestor_ds.checkpoint.convert import deepspeed_to_local_state, to_model_layout
from nestor_ds.checkpoint.fp32_master import read_fp32_master_state, read_optimizer_moments
from nestor_ds.checkpoint.layout import CONSOLIDATED_STATES, MODEL_STATES, CheckpointError, read_run_config
from nestor_ds.checkpoint.safe_load import gather_deepspeed_state, safe_torch_load
from nestor_ds.compat import (
    DEEPSPEED_MODEL_STATE_KEYS,
    EXPERT_KEY,
    GLOBAL_SAMPLES,
    GLOBAL_STEPS,
    MODULE,
    OPTIM_FILE_RE,
    has_hp_mapping,
    link_hp_fragments,
    set_full_fp32_param,
    set_full_optimizer_state,
)
from nestor_ds.log import get_logger

log = get_logger(__name__)


class ElasticResumeError(CheckpointError):
    """The checkpoint cannot be continued on this layout; str() names the supported path."""


@dataclass(frozen=True)
class RunLayout:
    """What a resume must fit: this run's parallel layout and model config (``ModelConfig.to_dict()``)."""

    world_size: int
    ep_size: int
    zero_stage: int
    model: Mapping[str, Any]
    expert_order: str | None = None  # train.expert_order: re-order the token experts of the tag it was computed from


def saved_layout(tag_dir: Path) -> tuple[int, int]:
    """(world size, ep_size) of the run that saved `tag_dir` (its nestor_config.json; 1, 1 when not recorded)."""
    cfg = read_run_config(tag_dir)
    return int(cfg.get("world_size", 1)), int(cfg.get("ep_size", 1))


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def config_changes(saved_model: Mapping[str, Any], model: Mapping[str, Any]) -> str:
    """'model.width 16 -> 32, ...' for the model-config keys that differ (ep_size aside), or ''."""
    a, b = _flat(saved_model), _flat(model)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != "moe.ep_size")
    return ", ".join(f"model.{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys)


def _shape_error(tag_dir: Path, key: str, saved: Any, now: Any, changes: str) -> ElasticResumeError:
    return ElasticResumeError(
        f"{tag_dir}: the model changed since this checkpoint: '{key}' is {saved} in the checkpoint and {now} in "
        f"the model built now ({changes or 'no model-config key differs'}); resume with the saved model config, "
        "or start a new run from these weights with `python -m nestor_ds.finetune --pretrained "
        f"{tag_dir} --load all`"
    )


def refuse_changed_model(tag_dir: Path, module: torch.nn.Module, model_cfg: Mapping[str, Any]) -> None:
    """Before DeepSpeed loads a tag saved on this same layout: the saved module state (memory-mapped: cheap) must
    have exactly `module`'s keys, token experts aside (their own files), with the same shapes. The saved state is
    rank 0's module file, or for ZeRO-3 (which saves partitions) the full weights gathered at save time; ZeRO-3
    parameters of `module` are compared by their full shape (`ds_shape`)."""
    saved = _saved_shapes(tag_dir)
    if saved is None:
        return  # nothing readable to compare with: DeepSpeed's loader reports it
    own = {k: tuple(v.shape) for k, v in module.state_dict().items() if EXPERT_KEY not in k or k in saved}
    own.update({k: tuple(p.ds_shape) for k, p in module.named_parameters() if hasattr(p, "ds_shape") and k in own})
    for key in sorted(set(saved) | set(own)):
        a, b = saved.get(key, "absent"), own.get(key, "absent")
        if a != b:
            changes = config_changes(read_run_config(tag_dir)["model"], model_cfg)
            raise _shape_error(tag_dir, key, a, b, changes)


def _saved_shapes(tag_dir: Path) -> dict[str, tuple[int, ...]] | None:
    if (tag_dir / MODEL_STATES).is_file():
        state = safe_torch_load(tag_dir / MODEL_STATES, mmap=True).get(MODULE) or {}
    elif (tag_dir / CONSOLIDATED_STATES).is_file():
        state = safe_torch_load(tag_dir / CONSOLIDATED_STATES, mmap=True)
    else:
        return None
    return {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}


def check_reshardable(tag_dir: Path, zero_stage: int, layout: tuple[int, int], saved: tuple[int, int]) -> None:
    """Raise ElasticResumeError unless both the checkpoint and this run are ZeRO-1/2 (what can be re-sharded)."""
    how = (
        f"resuming {tag_dir} (world size {saved[0]}, ep_size {saved[1]}) on world size {layout[0]}, ep_size {layout[1]}"
    )
    fix = (
        f"run with the saved layout (world size {saved[0]}, moe.ep_size {saved[1]}), or start from these weights "
        f"with a fresh optimizer: python -m nestor_ds.finetune --pretrained {tag_dir} --load all"
    )
    if zero_stage not in (1, 2):
        raise ElasticResumeError(f"{how} needs ZeRO stage 1 or 2 in this run (it has {zero_stage}); {fix}")
    if not any(OPTIM_FILE_RE.match(f.name) for f in tag_dir.iterdir()):
        why = f"{tag_dir} holds no ZeRO-1/2 optimizer partitions (a ZeRO-0 or ZeRO-3 checkpoint)"
        raise ElasticResumeError(f"{how}: {why}; {fix}")


def _targets(
    tag_dir: Path, module: torch.nn.Module, orders: Mapping[str, Sequence[int]] | None = None
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """({"param": weights, "<state key>": moments}, scalar optimizer state), each in `module`'s layout; with
    `orders`, every token MoE's experts re-ordered in the weights and the moments alike (nestor_ds.moe.placement)."""
    from nestor_ds.moe.placement import reorder_local_state

    saved_module = gather_deepspeed_state(tag_dir)
    master = read_fp32_master_state(tag_dir, saved_module)
    moments, scalars = read_optimizer_moments(tag_dir)

    def local(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        state = deepspeed_to_local_state(state)
        return to_model_layout(module, reorder_local_state(state, orders) if orders else state)

    out = {"param": local(master)}
    for key, tensors in moments.items():
        out[key] = local(_zeros_where_missing(tensors, master))
    return out, scalars


def _zeros_where_missing(partial: Mapping[str, torch.Tensor], full: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """`partial` (optimized tensors only) completed with zeros where `full` has a tensor it lacks (buffers, frozen
    parameters), so the layout conversions see every key they expect."""
    return {k: partial[k] if k in partial else torch.zeros_like(v, dtype=torch.float32) for k, v in full.items()}


def load_resharded(
    engine: Any, tag_dir: Path, model_cfg: Mapping[str, Any], orders: Mapping[str, Sequence[int]] | None = None
) -> dict[str, Any]:
    """Collective-free: load `tag_dir` into this rank's freshly initialised ZeRO-1/2 engine whatever world size and
    ep_size saved it, token experts re-ordered by `orders` if given. Returns the client state (our keys of the saved
    model-state file)."""
    module = engine.module
    targets, scalars = _targets(tag_dir, module, orders)
    own = module.state_dict()
    changes = config_changes(read_run_config(tag_dir)["model"], model_cfg)
    for key, value in own.items():
        got = targets["param"].get(key)
        if got is None or tuple(got.shape) != tuple(value.shape):
            raise _shape_error(tag_dir, key, "absent" if got is None else tuple(got.shape), tuple(value.shape), changes)
    extra = sorted(set(targets["param"]) - set(own))
    if extra:
        raise _shape_error(tag_dir, extra[0], "saved", "absent", changes)

    optimizer = engine.optimizer
    base = optimizer.optimizer  # torch's optimizer over the flat fp32 partitions, one per group
    moments = [k for k in targets if k != "param"]
    with torch.no_grad():
        module.load_state_dict({k: targets["param"][k].to(v.dtype) for k, v in own.items()}, strict=True)
        for group in base.param_groups:  # Adam's state exists only after a step: create it with the saved step count
            for flat in group["params"]:
                base.state[flat] = {k: _scalar_like(v, flat, group) for k, v in scalars.items()}
                base.state[flat].update({k: torch.zeros_like(flat) for k in moments})
        link_hp_fragments(optimizer)  # link the fragments (DeepSpeed does this after a step)
        for name, param in module.named_parameters():
            if not has_hp_mapping(param):
                continue  # frozen, or not in this rank's partition
            set_full_fp32_param(param, targets["param"][name].to(param.device))
            for key in moments:
                set_full_optimizer_state(param, targets[key][name].to(param.device), key)
    states = safe_torch_load(tag_dir / MODEL_STATES, mmap=True)
    client = {k: v for k, v in states.items() if k not in DEEPSPEED_MODEL_STATE_KEYS}
    engine.global_steps = int(client.get("step", states.get(GLOBAL_STEPS, 0)))
    engine.global_samples = int(client.get("samples_seen", states.get(GLOBAL_SAMPLES, 0)))
    log.info(
        "%s (saved on world size %d, ep_size %d): weights, fp32 masters and optimizer state %s re-sharded for "
        "this run's layout",
        tag_dir,
        *saved_layout(tag_dir),
        moments,
    )
    return client


def _scalar_like(saved: Any, flat: torch.Tensor, group: Mapping[str, Any]) -> Any:
    """A scalar optimizer state (Adam's step) as the optimizer keeps it: torch's Adam holds a float32 tensor on the
    CPU, on the parameter's device when fused or capturable."""
    if not torch.is_tensor(saved):
        return saved
    on_device = bool(group.get("fused") or group.get("capturable"))
    return saved.detach().clone().to(flat.device if on_device else "cpu")
