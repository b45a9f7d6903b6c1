"""Reading checkpoints without unpickling arbitrary objects, and loading their weights strictly.

Why: a checkpoint is untrusted input. DeepSpeed's `.pt` files are read with `torch.load(weights_only=True)`, which
DeepSpeed 0.19.8's model-state files pass as they are (plain dicts, lists, OrderedDicts, tensors, ints, strings);
optimizer-state files need only the few plain DeepSpeed state classes in DEEPSPEED_SAFE_GLOBALS. Exported files
are safetensors with the run config as JSON in the metadata. A DeepSpeed-MoE checkpoint is spread over files
(non-expert weights in `mp_rank_00_model_states.pt`, each token expert in its own
`layer_<L>_expert_<E>_mp_rank_00_model_states.pt`, keys already renamed to the global expert id):
:func:`gather_deepspeed_state` puts them back together; `convert.py` turns them into the `local` layout.
"""

from __future__ import annotations

import importlib
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nestor_ds.checkpoint.layout import (
    CONSOLIDATED_STATES,
    EXPERT_FILE_RE,
    FORMAT_NAME,
    MODEL_STATES,
    CheckpointError,
)
from nestor_ds.compat import DEEPSPEED_SAFE_GLOBALS, MODULE, NUM_EXPERTS, TENSOR_PARALLEL_MODEL_FILES


def _deepspeed_safe_globals() -> list[Any]:
    found = []
    for module, name in DEEPSPEED_SAFE_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return found


def safe_torch_load(path: str | Path, mmap: bool = False) -> Any:
    """torch.load with weights_only=True on CPU; a file that needs arbitrary unpickling is refused.

    Tensors, plain containers and the few DeepSpeed state classes in DEEPSPEED_SAFE_GLOBALS are allowed.
    """
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        detail = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise CheckpointError(
            f"{path}: refused to load: it contains pickled objects other than tensors and plain "
            f"containers (weights_only=True); {detail}"
        ) from None
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({str(err).splitlines()[0]})") from None


def verify_checkpoint_files(tag_dir: str | Path) -> None:
    """Refuse a checkpoint directory any of whose .pt files would need arbitrary unpickling.

    DeepSpeed's own loader (used to resume training) calls torch.load(weights_only=False); running this check
    first means it only ever unpickles what a weights_only load accepts. Files are memory-mapped, so the check
    reads the pickled metadata, not the tensors.
    """
    for f in sorted(Path(tag_dir).glob("*.pt")):
        safe_torch_load(f, mmap=True)


def gather_deepspeed_state(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """Non-expert weights ('module' of mp_rank_00) plus every expert file, in DeepSpeed's naming.

    Checks that no tensor-parallel shards exist (mp_rank > 0), that every MoE layer has all its
    experts 0..E-1 (E from the checkpoint's 'num_experts' list when present) and that no key repeats.
    """
    tag_dir = Path(tag_dir)
    if (tag_dir / CONSOLIDATED_STATES).is_file():  # ZeRO-3 partitions the weights; the engine also saved them whole
        full = safe_torch_load(tag_dir / CONSOLIDATED_STATES)
        if not isinstance(full, Mapping):
            raise CheckpointError(
                f"{tag_dir / CONSOLIDATED_STATES}: expected a dict of tensors, got {type(full).__name__}"
            )
        return dict(full)
    states = safe_torch_load(tag_dir / MODEL_STATES)
    if not isinstance(states, dict) or not isinstance(states.get(MODULE), Mapping):
        raise CheckpointError(f"{tag_dir / MODEL_STATES}: missing key 'module' (not a DeepSpeed model-state file)")
    if any(tag_dir.glob(TENSOR_PARALLEL_MODEL_FILES)):
        raise CheckpointError(f"{tag_dir}: tensor-parallel shards (mp_rank > 0) are not supported")
    out: dict[str, torch.Tensor] = dict(states[MODULE])

    experts: dict[int, dict[int, Path]] = {}
    for f in sorted(tag_dir.iterdir()):
        m = EXPERT_FILE_RE.match(f.name)
        if m:
            layer, expert, mp = (int(g) for g in m.groups())
            if mp != 0:
                raise CheckpointError(f"{f}: tensor-parallel expert shards (mp_rank > 0) are not supported")
            experts.setdefault(layer, {})[expert] = f
    declared = states.get(NUM_EXPERTS)
    if isinstance(declared, list) and len(declared) != len(experts) and not (len(experts) == 0 and not declared):
        raise CheckpointError(
            f"{tag_dir}: 'num_experts' lists {len(declared)} MoE layer(s) but expert files exist for {len(experts)}"
        )
    for layer, files in sorted(experts.items()):
        want = declared[layer] if isinstance(declared, list) else len(files)
        missing = sorted(set(range(want)) - set(files))
        if missing:
            raise CheckpointError(
                f"{tag_dir}: MoE layer {layer} is missing expert file(s) for expert id(s) {missing} "
                f"(expected layer_{layer}_expert_<0..{want - 1}>_mp_rank_00_model_states.pt)"
            )
        for expert in sorted(files):
            part = safe_torch_load(files[expert])
            if not isinstance(part, Mapping):
                raise CheckpointError(f"{files[expert]}: expected a dict of tensors, got {type(part).__name__}")
            for key, value in part.items():
                if key in out:
                    raise CheckpointError(f"{files[expert]}: key '{key}' appears twice in the checkpoint")
                out[key] = value
    return out


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict) with one-line errors that name the key and both shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} key(s) the model needs are missing, e.g. '{missing[0]}' "
            f"{tuple(own[missing[0]].shape)} (model config does not match the weights?)"
        )
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} key(s) the model does not have, e.g. '{unexpected[0]}' "
            f"{tuple(state[unexpected[0]].shape)} (model config does not match the weights?)"
        )
    for key, want in own.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{source}: key '{key}' has shape {tuple(got.shape)} in the checkpoint but "
                f"{tuple(want.shape)} in the model built from its config"
            )
    model.load_state_dict(state, strict=True)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, run config) from an exported file; refuses files without our metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
    if meta.get("format") != FORMAT_NAME or "nestor_config" not in meta:
        raise CheckpointError(f"{path}: metadata key 'nestor_config' missing (not exported by nestor_ds.checkpoint)")
    return state, json.loads(meta["nestor_config"])
