"""The fp32 master weights of a ZeRO-1/2 checkpoint tag, named like the module state DeepSpeed saves.

Why: under `ds_configs/*_bf16.json` DeepSpeed keeps the module in bf16; the fp32 master copy, the weights the
optimizer actually updates, exists only in the ZeRO optimizer files. Export, fine-tuning and evaluation read the
module state, so without this a fine-tune of a bf16 run starts from bf16-rounded weights.

What DeepSpeed 0.19.8 stores (engine `_save_zero_checkpoint`, `zero/stage_1_and_2.py` and `bf16_optimizer.py`
`state_dict`, `utils/zero_to_fp32.py`):
- `[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, one per data-parallel rank r (prefix `bf16_` when bf16
  is on), key `optimizer_state_dict`: `single_partition_of_fp32_groups[i]` is rank r's slice of optimizer group
  i's flat fp32 vector; `partition_count[i]` the ranks it is split over; `param_alignment_paddings[i]` the gap
  after each parameter (absent or zeros here); `param_slice_mappings[i]` {rank-local name: fragment_address}
  for the parameters overlapping that slice; `base_optimizer_state['param_groups'][i]` has `moe` and `name`.
- `mp_rank_00_model_states.pt` (written by rank 0): `param_shapes[i]` {name: shape} in the flat order of group i,
  with rank 0's own (rank-local) names; `shared_params` {alias: source}; `buffer_names`.
- DeepSpeed-MoE expert groups (`moe: True`, named `ep_size_<ep>`) are split over the expert-data-parallel group
  only: expert-parallel rank e (e = r % ep, consecutive ranks form an expert-parallel group) concatenates the
  slices of ranks e, e+ep, e+2ep, ...; the names carry local expert ids, which the expert files
  (`layer_<L>_expert_<E>_mp_rank_00_model_states.pt`) renamed to global ids E = e * num_local + local, so the
  same renaming is applied here. Each rank's `param_slice_mappings` then confirm every derived name and offset.
ZeRO-0 (bf16: `FP16_UnfusedOptimizer.fp32_groups`, per-parameter tensors but no names) and ZeRO-3
(`fp32_flat_groups`) are not read: `gather_fp32_master_state` returns None and logs why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from nestor_ds.checkpoint.layout import CONSOLIDATED_STATES, MODEL_STATES, CheckpointError
from nestor_ds.checkpoint.safe_load import gather_deepspeed_state, safe_torch_load
from nestor_ds.compat import (
    ALIGNMENT_PADDINGS,
    BASE_OPTIMIZER_STATE,
    EXPERT_ID_RE,
    EXPERT_OPTIM_FILES,
    FP32_PARTITIONS,
    OPTIM_FILE_RE,
    OPTIMIZER_STATE_DICT,
    PARAM_SHAPES,
    PARTITION_COUNT,
    SHARED_PARAMS,
    SLICE_MAPPINGS,
    ZERO3_MODEL_FILES,
    ZERO_STAGE,
    expert_group_name,
)
from nestor_ds.log import get_logger

log = get_logger(__name__)


class NoMasterWeights(CheckpointError):
    """The tag holds no fp32 master copy this module can read (ZeRO-0, ZeRO-3); str() says which and why."""


def gather_fp32_master_state(
    tag_dir: str | Path, module: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor] | None:
    """Full fp32 master weights of a ZeRO-1/2 tag in the module state's naming, or None (reason logged).

    Keys and shapes are exactly those of `gather_deepspeed_state` (module + expert files). Keys the optimizer
    does not hold (buffers, frozen parameters) keep the module's value, floating ones converted to fp32. A tag
    that has master weights but does not read consistently raises CheckpointError (never a silent fallback).
    `module`: the tag's `gather_deepspeed_state`, when the caller already read it.
    """
    try:
        return read_fp32_master_state(tag_dir, module)
    except NoMasterWeights as why:
        log.info("no fp32 master weights, using the module state: %s", why)
        return None


def read_fp32_master_state(
    tag_dir: str | Path, module: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """As `gather_fp32_master_state`, but raises NoMasterWeights with the reason instead of returning None."""
    tag_dir = Path(tag_dir)
    ranks = _optimizer_states(tag_dir)
    states = safe_torch_load(tag_dir / MODEL_STATES, mmap=True)
    shapes = states.get(PARAM_SHAPES) if isinstance(states, dict) else None
    if not isinstance(shapes, list):
        raise CheckpointError(f"{tag_dir / MODEL_STATES}: no 'param_shapes' beside ZeRO optimizer files")
    if len(shapes) != len(ranks[0][FP32_PARTITIONS]):
        raise CheckpointError(
            f"{tag_dir}: 'param_shapes' lists {len(shapes)} parameter group(s) but the optimizer "
            f"files hold {len(ranks[0][FP32_PARTITIONS])}"
        )
    master: dict[str, torch.Tensor] = {}
    for group, group_shapes in enumerate(shapes):
        for name, tensor in _group_master(tag_dir, ranks, group, group_shapes).items():
            if name in master:
                raise CheckpointError(f"{tag_dir}: parameter '{name}' appears in two optimizer groups")
            master[name] = tensor
    module = gather_deepspeed_state(tag_dir) if module is None else module
    return _complete(tag_dir, master, module, states.get(SHARED_PARAMS) or {})


def read_optimizer_moments(tag_dir: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Full per-parameter optimizer state of a ZeRO-1/2 tag: ({state key: {name: tensor}}, {key: scalar state}).

    Tensor states laid out like the fp32 partition (Adam's `exp_avg`, `exp_avg_sq`) are cut per parameter exactly as
    the masters are (names: the module state's, expert ids global); DeepSpeed pads the last rank's moments to the
    partition size, the padding is dropped. Scalar states (Adam's `step`) are the same in every group and rank
    (checked) and returned once. Raises NoMasterWeights for ZeRO-0/3 tags."""
    tag_dir = Path(tag_dir)
    ranks = _optimizer_states(tag_dir)
    shapes = safe_torch_load(tag_dir / MODEL_STATES, mmap=True).get(PARAM_SHAPES)
    if not isinstance(shapes, list):
        raise CheckpointError(f"{tag_dir / MODEL_STATES}: no 'param_shapes' beside ZeRO optimizer files")
    group_states = [[_base_state(tag_dir, r, osd, g) for g in range(len(shapes))] for r, osd in enumerate(ranks)]
    first = group_states[0][0]
    keys = [k for k, v in first.items() if torch.is_tensor(v) and v.dim() == 1]
    scalars = {k: v for k, v in first.items() if k not in keys}
    for r, groups in enumerate(group_states):
        for g, st in enumerate(groups):
            same = {k: v for k, v in st.items() if k not in keys}
            if set(st) != set(first) or any(_differs(same[k], v) for k, v in scalars.items()):
                raise CheckpointError(
                    f"{tag_dir}: rank {r} group {g} holds optimizer state {sorted(st)} / {same}, rank 0 group 0 "
                    f"{sorted(first)} / {scalars}"
                )
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for key in keys:

        def partition(r: int, group: int, key: str = key) -> torch.Tensor:
            return group_states[r][group][key][: ranks[r][FP32_PARTITIONS][group].numel()]

        moments[key] = {}
        for group, group_shapes in enumerate(shapes):
            moments[key].update(_group_master(tag_dir, ranks, group, group_shapes, partition))
    return moments, scalars


def _base_state(tag_dir: Path, rank: int, osd: Mapping[str, Any], group: int) -> dict[str, Any]:
    """Rank `rank`'s base-optimizer state of group `group` (torch's state_dict form: state keyed by the group's one
    flat parameter, or DeepSpeed's elastic form: a list with one state per group)."""
    base = osd.get(BASE_OPTIMIZER_STATE)
    if isinstance(base, list) and group < len(base):
        return dict(base[group])
    if isinstance(base, dict) and "state" in base and group < len(base.get("param_groups", [])):
        index = base["param_groups"][group]["params"][0]
        if index in base["state"]:
            return dict(base["state"][index])
    raise CheckpointError(f"{tag_dir}: rank {rank} has no base optimizer state for group {group} (no optimizer step?)")


def _differs(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return not torch.equal(torch.as_tensor(a).float(), torch.as_tensor(b).float())
    return a != b


def _optimizer_states(tag_dir: Path) -> list[dict[str, Any]]:
    """Every rank's `optimizer_state_dict`, rank order; NoMasterWeights when the tag is not ZeRO-1/2."""
    if (tag_dir / CONSOLIDATED_STATES).is_file() or any(tag_dir.glob(ZERO3_MODEL_FILES)):
        raise NoMasterWeights(f"{tag_dir}: a ZeRO-3 checkpoint (its fp32 partitions, 'fp32_flat_groups', are not read)")
    files = {int(m.group(2)): f for f in tag_dir.iterdir() if (m := OPTIM_FILE_RE.match(f.name))}
    if not files:
        if any(tag_dir.glob(EXPERT_OPTIM_FILES)) or (tag_dir / MODEL_STATES).is_file():
            raise NoMasterWeights(
                f"{tag_dir}: no ZeRO optimizer files (ZeRO-0: a bf16/fp16 run keeps its fp32 copies "
                "in 'fp32_groups' of the optimizer state, without parameter names)"
            )
        raise CheckpointError(f"{tag_dir}: not a DeepSpeed checkpoint tag (no {MODEL_STATES})")
    if sorted(files) != list(range(len(files))):
        raise CheckpointError(f"{tag_dir}: optimizer files for ranks {sorted(files)}; expected 0..{len(files) - 1}")
    out = []
    for rank in range(len(files)):  # memory-mapped: Adam's moments, 2/3 of each file, are never read
        osd = safe_torch_load(files[rank], mmap=True).get(OPTIMIZER_STATE_DICT)
        if not isinstance(osd, dict):
            raise CheckpointError(f"{files[rank]}: missing key 'optimizer_state_dict'")
        if FP32_PARTITIONS not in osd:
            raise NoMasterWeights(
                f"{files[rank]}: no 'single_partition_of_fp32_groups' (zero_stage "
                f"{osd.get(ZERO_STAGE)}: only ZeRO-1/2 partitions are read)"
            )
        out.append(osd)
    return out


def _expert_layout(tag_dir: Path, ranks: list[dict[str, Any]], group: int) -> int:
    """How many expert-parallel ranks group `group` is spread over (1: a plain data-parallel group)."""
    world, split = len(ranks), ranks[0][PARTITION_COUNT][group]
    if split < 1 or world % split:
        raise CheckpointError(
            f"{tag_dir}: group {group} is split over {split} rank(s), which does not divide the {world} optimizer files"
        )
    ep = world // split
    base = ranks[0].get(BASE_OPTIMIZER_STATE)
    meta = base["param_groups"][group] if isinstance(base, dict) and "param_groups" in base else {}
    if ep > 1 and not meta.get("moe", True):
        raise CheckpointError(
            f"{tag_dir}: group {group} ('{meta.get('name')}') is not a DeepSpeed-MoE group but is "
            f"split over {split} of {world} ranks"
        )
    if ep > 1 and meta.get("name", expert_group_name(ep)) != expert_group_name(ep):
        raise CheckpointError(
            f"{tag_dir}: MoE group {group} is named '{meta['name']}' but is split over {split} of "
            f"{world} ranks (expected ep_size_{ep})"
        )
    return ep


def _global_names(tag_dir: Path, names: list[str], ep_rank: int, ep: int, group: int) -> list[str]:
    """Rank-local expert names -> the expert files' global ids (local + ep_rank * experts per rank and layer)."""
    if ep == 1:
        return names
    local_ids: dict[str, set[int]] = {}
    for name in names:
        m = EXPERT_ID_RE.search(name)
        if m is None:
            raise CheckpointError(
                f"{tag_dir}: expert group {group} holds '{name}', which is not a DeepSpeed-MoE "
                "expert parameter: its copies on the other expert-parallel ranks cannot be named"
            )
        local_ids.setdefault(name[: m.start()], set()).add(int(m.group(2)))
    for prefix, ids in local_ids.items():
        if ids != set(range(len(ids))):
            raise CheckpointError(f"{tag_dir}: MoE '{prefix}' has local expert ids {sorted(ids)} in group {group}")

    def rename(name: str) -> str:
        m = EXPERT_ID_RE.search(name)
        expert = ep_rank * len(local_ids[name[: m.start()]]) + int(m.group(2))
        return f"{name[: m.start()]}{m.group(1)}{expert}.{name[m.end() :]}"

    return [rename(n) for n in names]


def _group_master(
    tag_dir: Path,
    ranks: list[dict[str, Any]],
    group: int,
    shapes: Mapping[str, Any],
    partition: Callable[[int, int], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Group `group`'s parameters from the slices of every rank, one expert-parallel rank at a time. `partition(rank,
    group)` gives a rank's flat slice (default: the fp32 masters; Adam's moments are laid out the same way)."""
    ep = _expert_layout(tag_dir, ranks, group)
    if partition is None:
        partition = lambda r, g: ranks[r][FP32_PARTITIONS][g]  # noqa: E731
    names = list(shapes)
    paddings = ranks[0].get(ALIGNMENT_PADDINGS)
    paddings = paddings[group] if paddings else [0] * len(names)
    if len(paddings) != len(names):
        raise CheckpointError(
            f"{tag_dir}: group {group}: {len(paddings)} alignment paddings for {len(names)} parameters"
        )
    out: dict[str, torch.Tensor] = {}
    for ep_rank in range(ep):
        members = list(range(ep_rank, len(ranks), ep))
        parts = [partition(r, group) for r in members]
        flat = torch.cat([p.reshape(-1) for p in parts])
        starts = [sum(p.numel() for p in parts[:k]) for k in range(len(parts))]
        offset, placed = 0, {}
        for name, shape, pad in zip(names, shapes.values(), paddings):
            numel = int(torch.Size(shape).numel())
            if offset + numel > flat.numel():
                raise CheckpointError(
                    f"{tag_dir}: group {group} ends at {flat.numel()} values, before parameter "
                    f"'{name}' {tuple(shape)} (param_shapes do not match the optimizer files)"
                )
            placed[name] = (offset, numel)
            offset += numel + pad
        for k, r in enumerate(members):
            _check_slice_mapping(tag_dir, r, group, ranks[r], placed, starts[k], parts[k].numel())
        for local, name in zip(names, _global_names(tag_dir, names, ep_rank, ep, group)):
            start, numel = placed[local]
            out[name] = flat[start : start + numel].view(tuple(shapes[local])).clone()
    return out


def _check_slice_mapping(
    tag_dir: Path,
    rank: int,
    group: int,
    osd: Mapping[str, Any],
    placed: Mapping[str, tuple[int, int]],
    start: int,
    size: int,
) -> None:
    """The rank's own record of which parameter sits where in its slice must agree with the derived layout."""
    mappings = osd.get(SLICE_MAPPINGS)
    if not isinstance(mappings, list) or group >= len(mappings):
        return  # older DeepSpeed: param_shapes alone
    want = {
        name: (max(o, start) - start, min(o + n, start + size) - max(o, start))
        for name, (o, n) in placed.items()
        if o < start + size and o + n > start
    }
    got = {name: (int(a.start), int(a.numel)) for name, a in mappings[group].items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:2]
        raise CheckpointError(
            f"rank {rank} of {tag_dir}: group {group}: param_slice_mappings disagree with "
            f"param_shapes (name, (start, numel)) e.g. {diff}"
        )


def _complete(
    tag_dir: Path, master: dict[str, torch.Tensor], module: Mapping[str, torch.Tensor], shared: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Every module key, in module order: the master copy where there is one, else the module value in fp32."""
    extra = sorted(set(master) - set(module))
    if extra:
        raise CheckpointError(
            f"{tag_dir}: the optimizer holds {len(extra)} parameter(s) the module state lacks, e.g. '{extra[0]}'"
        )
    out = {}
    for key, value in module.items():
        got = master.get(key, master.get(shared.get(key, "")))
        if got is None:
            out[key] = value.float() if value.is_floating_point() else value
            continue
        if got.shape != value.shape:
            raise CheckpointError(
                f"{tag_dir}: '{key}' is {tuple(got.shape)} in the optimizer files but "
                f"{tuple(value.shape)} in the module state"
            )
        out[key] = got
    return out
