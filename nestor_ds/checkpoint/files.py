"""Checkpoint export and inference loading: DeepSpeed checkpoint directory -> one safetensors file -> model.

Why this module exists: a DeepSpeed-MoE checkpoint is spread over files (non-expert weights in
`mp_rank_00_model_states.pt`, each token expert in its own `layer_<L>_expert_<E>_mp_rank_00_model_states.pt`
written by whichever expert-parallel rank held it, keys already renamed to the global expert id) and
its MoE weights are in the expert-parallel per-expert layout (DeepSpeed-MoE names). Inference wants one file in
the single-process `local` layout (grouped [E, F, D] weights), ep_size 1, loadable without DeepSpeed.

Safety: nothing here unpickles arbitrary objects. DeepSpeed's `.pt` files are read with
`torch.load(weights_only=True)`, which DeepSpeed 0.19.8's model-state files pass as they are (plain
dicts, lists, OrderedDicts, tensors, ints, strings; no `add_safe_globals` needed). Optimizer-state
files are never read. Exported files are safetensors with the run config as JSON in the metadata.

Layout of a checkpoint root (written by `nestor_ds/checkpoint/save_resume.py`): `latest` (text: newest tag),
`<tag>/mp_rank_00_model_states.pt`, `<tag>/layer_*_expert_*_mp_rank_00_model_states.pt`,
`<tag>/*optim_states.pt`, `<tag>/nestor_config.json` (resolved run config + world_size, ep_size),
`<tag>/COMPLETE`.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch

CONFIG_FILE = "nestor_config.json"
COMPLETE_MARKER = "COMPLETE"  # written last by the engine, after every rank finished saving
MODEL_STATES = "mp_rank_00_model_states.pt"
CONSOLIDATED_STATES = "consolidated_model_states.pt"  # ZeRO-3 only: full weights gathered at save time (engine)
EXPERT_FILE_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
DS_GATE_SUFFIX = "moe.deepspeed_moe.gate.wg.weight"  # marks an expert-parallel token MoE (nestor_ds/moe/expert_parallel.py)
FORMAT_NAME = "nestor-ds-local"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """Bad or unsafe checkpoint; str() is one line naming the file (and key / shapes where relevant)."""


# --------------------------------------------------------------------------- reading DeepSpeed files


# DeepSpeed's optimizer-state files pickle a few of its own small classes besides tensors and containers.
# These (plain state holders, no code run on load) are the only globals a checkpoint may contain.
DEEPSPEED_SAFE_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def _deepspeed_safe_globals() -> list[Any]:
    import importlib

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
        raise CheckpointError(f"{path}: refused to load: it contains pickled objects other than tensors and plain "
                              f"containers (weights_only=True); {detail}") from None
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


def resolve_checkpoint(path: str | Path) -> Path:
    """A .safetensors file, a tag directory, or a checkpoint root (its `latest` tag) -> the file or tag dir."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointError(f"{p}: expected a .safetensors file or a DeepSpeed checkpoint directory")
        return p
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such file or directory")
    def is_tag(d: Path) -> bool:
        return (d / MODEL_STATES).is_file() or (d / CONSOLIDATED_STATES).is_file()

    if is_tag(p):
        return p
    complete = sorted(d for d in p.glob("step_*") if (d / COMPLETE_MARKER).is_file() and is_tag(d))
    if complete:  # DeepSpeed moves `latest` before our COMPLETE marker: a save cut short must not be used
        return complete[-1]
    latest = p / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not is_tag(p / tag):
            raise CheckpointError(f"{latest}: names tag '{tag}' but {p / tag} holds neither {MODEL_STATES} nor "
                                  f"{CONSOLIDATED_STATES}")
        return p / tag
    raise CheckpointError(f"{p}: not a checkpoint (no {MODEL_STATES}, no 'latest' file)")


def read_run_config(tag_dir: Path) -> dict[str, Any]:
    """The resolved run config saved beside the weights (needs at least the key 'model')."""
    f = tag_dir / CONFIG_FILE
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (not a NESTOR-DS checkpoint? the model config is needed to rebuild it)")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{f}: not valid JSON ({err})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{f}: missing key 'model' (the ModelConfig as a dict)")
    return cfg


def gather_deepspeed_state(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """Non-expert weights ('module' of mp_rank_00) plus every expert file, in DeepSpeed's naming.

    Checks that no tensor-parallel shards exist (mp_rank > 0), that every MoE layer has all its
    experts 0..E-1 (E from the checkpoint's 'num_experts' list when present) and that no key repeats.
    """
    tag_dir = Path(tag_dir)
    if (tag_dir / CONSOLIDATED_STATES).is_file():  # ZeRO-3 partitions the weights; the engine also saved them whole
        full = safe_torch_load(tag_dir / CONSOLIDATED_STATES)
        if not isinstance(full, Mapping):
            raise CheckpointError(f"{tag_dir / CONSOLIDATED_STATES}: expected a dict of tensors, got {type(full).__name__}")
        return dict(full)
    states = safe_torch_load(tag_dir / MODEL_STATES)
    if not isinstance(states, dict) or not isinstance(states.get("module"), Mapping):
        raise CheckpointError(f"{tag_dir / MODEL_STATES}: missing key 'module' (not a DeepSpeed model-state file)")
    if any(tag_dir.glob("mp_rank_0[1-9]*_model_states.pt")):
        raise CheckpointError(f"{tag_dir}: tensor-parallel shards (mp_rank > 0) are not supported")
    out: dict[str, torch.Tensor] = dict(states["module"])

    experts: dict[int, dict[int, Path]] = {}
    for f in sorted(tag_dir.iterdir()):
        m = EXPERT_FILE_RE.match(f.name)
        if m:
            layer, expert, mp = (int(g) for g in m.groups())
            if mp != 0:
                raise CheckpointError(f"{f}: tensor-parallel expert shards (mp_rank > 0) are not supported")
            experts.setdefault(layer, {})[expert] = f
    declared = states.get("num_experts")
    if isinstance(declared, list) and len(declared) != len(experts) and not (len(experts) == 0 and not declared):
        raise CheckpointError(f"{tag_dir}: 'num_experts' lists {len(declared)} MoE layer(s) but expert files exist "
                              f"for {len(experts)}")
    for layer, files in sorted(experts.items()):
        want = declared[layer] if isinstance(declared, list) else len(files)
        missing = sorted(set(range(want)) - set(files))
        if missing:
            raise CheckpointError(f"{tag_dir}: MoE layer {layer} is missing expert file(s) for expert id(s) {missing} "
                                  f"(expected layer_{layer}_expert_<0..{want - 1}>_mp_rank_00_model_states.pt)")
        for expert in sorted(files):
            part = safe_torch_load(files[expert])
            if not isinstance(part, Mapping):
                raise CheckpointError(f"{files[expert]}: expected a dict of tensors, got {type(part).__name__}")
            for key, value in part.items():
                if key in out:
                    raise CheckpointError(f"{files[expert]}: key '{key}' appears twice in the checkpoint")
                out[key] = value
    return out


# --------------------------------------------------------------------------- layout conversion


def deepspeed_to_local_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every expert-parallel token-MoE sub-state (found by its gate key) -> the LocalTokenMoE layout.

    The name mapping is the MoE part's (`nestor_ds.moe.expert_parallel.local_state_from_expert_parallel`);
    the checkpoint's expert keys already carry global ids, so each layer's sub-state is one
    "ep_size 1" DeepSpeed state. Keys outside token MoEs pass through unchanged.
    """
    from nestor_ds.moe.expert_parallel import local_state_from_expert_parallel

    megablocks = next((k for k in state if ".dmoe." in k), None)
    if megablocks is not None:
        raise CheckpointError(f"key '{megablocks}': checkpoints of the megablocks backend cannot be converted to the "
                              f"local layout yet (export, evaluation and fine-tuning need deepspeed or local runs)")
    prefixes = sorted(k[: -len(DS_GATE_SUFFIX)] for k in state if k.endswith(DS_GATE_SUFFIX))
    out = {k: v for k, v in state.items() if not any(k.startswith(p) for p in prefixes)}
    for prefix in prefixes:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        local = local_state_from_expert_parallel(sub)
        n_experts = local["experts.w1_EFD"].shape[0]
        consumed = {DS_GATE_SUFFIX} | {k for k in sub if k.startswith("shared.")} | {
            k for k in sub if re.match(r"^moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.w[123]\.weight$", k)
            and int(k.split(".")[4]) < n_experts}
        left = sorted(set(sub) - consumed)
        if left:
            raise CheckpointError(f"token MoE '{prefix.rstrip('.')}': key(s) not converted to the local layout: {left[:4]} "
                                  "(expert ids not contiguous from 0, or a layout this exporter does not know)")
        out.update({prefix + k: v for k, v in local.items()})
    return out


def inference_model_config(run_cfg: Mapping[str, Any], overrides: Mapping[str, Any] | None = None):
    """ModelConfig for single-process inference: local MoE backend, ep_size 1, dropless tokens."""
    from nestor_ds.model.config import ModelConfig

    model = copy.deepcopy(dict(run_cfg["model"]))
    model.update(overrides or {})
    moe = dict(model.get("moe") or {})
    moe.update(backend="local", ep_size=1, routing="dropless", capacity_factor=None)
    model["moe"] = moe
    if model.get("attention") == "flash":  # inference runs in fp32, where flash-attn has no kernel
        model["attention"] = "auto"
    try:
        return ModelConfig.from_dict(model).validate()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"model config in the checkpoint: {err}") from None


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict) with one-line errors that name the key and both shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} key(s) the model needs are missing, e.g. '{missing[0]}' "
                              f"{tuple(own[missing[0]].shape)} (model config does not match the weights?)")
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} key(s) the model does not have, e.g. '{unexpected[0]}' "
                              f"{tuple(state[unexpected[0]].shape)} (model config does not match the weights?)")
    for key, want in own.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: key '{key}' has shape {tuple(got.shape)} in the checkpoint but "
                                  f"{tuple(want.shape)} in the model built from its config")
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- safetensors


def save_safetensors(state: Mapping[str, torch.Tensor], run_cfg: Mapping[str, Any], out: str | Path,
                     source: str = "") -> Path:
    """Write weights + run config (metadata 'nestor_config', and `<out>.json` beside it)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}  # no shared storage
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "nestor_config": json.dumps(run_cfg),
            "source": source}
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out)
    out.with_suffix(".json").write_text(json.dumps(run_cfg, indent=2))
    return out


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


# --------------------------------------------------------------------------- public entry points


def load_local_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(local-layout state, run config, source description) from a .safetensors, tag dir or checkpoint root."""
    p = resolve_checkpoint(path)
    if p.is_file():
        state, run_cfg = read_safetensors(p)
        return state, run_cfg, str(p)
    run_cfg = read_run_config(p)
    return deepspeed_to_local_state(gather_deepspeed_state(p)), run_cfg, str(p)


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Gather + convert a DeepSpeed checkpoint and write it as one safetensors file.

    The weights are loaded into a freshly built local model first, so a file that would not load
    is never written.
    """
    state, run_cfg, source = load_local_state(checkpoint)
    from nestor_ds.model import build_model

    load_state_strict(build_model(inference_model_config(run_cfg)), state, source)
    return save_safetensors(state, run_cfg, out, source=source)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    model_overrides: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Eval-mode model (local MoE backend, ep_size 1) from a .safetensors export or a DeepSpeed checkpoint.

    The run config travels with the model as `model.run_config` (a dict: model, data, ...).
    `model_overrides` changes ModelConfig fields that do not touch weights (e.g. {"attention": "sdpa"}).
    """
    from nestor_ds.model import build_model

    state, run_cfg, source = load_local_state(path)
    model = build_model(inference_model_config(run_cfg, model_overrides))
    load_state_strict(model, state, source)
    model.run_config = run_cfg
    return model.to(device).eval()
