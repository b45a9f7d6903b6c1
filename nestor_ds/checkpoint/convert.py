"""DeepSpeed-MoE checkpoint state -> the single-process `local` layout, and the ModelConfig to load it into.

Why: a DeepSpeed-MoE checkpoint holds its token experts in the expert-parallel per-expert layout (DeepSpeed-MoE
names); inference, export and fine-tuning want the `local` layout (grouped [E, F, D] weights), ep_size 1, loadable
without DeepSpeed.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import torch

from nestor_ds.checkpoint.layout import CheckpointError
from nestor_ds.errors import UserError

# marks an expert-parallel token MoE (nestor_ds/moe/expert_parallel.py)
DS_GATE_SUFFIX = "moe.deepspeed_moe.gate.wg.weight"


def deepspeed_to_local_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every expert-parallel token-MoE sub-state (found by its gate key) -> the LocalTokenMoE layout.

    The name mapping is the MoE part's (`nestor_ds.moe.expert_parallel.local_state_from_expert_parallel`);
    the checkpoint's expert keys already carry global ids, so each layer's sub-state is one
    "ep_size 1" DeepSpeed state. Keys outside token MoEs pass through unchanged.
    """
    from nestor_ds.moe.expert_parallel import local_state_from_expert_parallel

    megablocks = next((k for k in state if ".dmoe." in k), None)
    if megablocks is not None:
        raise CheckpointError(
            f"key '{megablocks}': checkpoints of the megablocks backend cannot be converted to the "
            f"local layout yet (export, evaluation and fine-tuning need deepspeed or local runs)"
        )
    prefixes = sorted(k[: -len(DS_GATE_SUFFIX)] for k in state if k.endswith(DS_GATE_SUFFIX))
    out = {k: v for k, v in state.items() if not any(k.startswith(p) for p in prefixes)}
    for prefix in prefixes:
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        local = local_state_from_expert_parallel(sub)
        n_experts = local["experts.w1_EFD"].shape[0]
        consumed = (
            {DS_GATE_SUFFIX}
            | {k for k in sub if k.startswith("shared.")}
            | {
                k
                for k in sub
                if re.match(r"^moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.w[123]\.weight$", k)
                and int(k.split(".")[4]) < n_experts
            }
        )
        left = sorted(set(sub) - consumed)
        if left:
            raise CheckpointError(
                f"token MoE '{prefix.rstrip('.')}': key(s) not converted to the local layout: "
                f"{left[:4]} "
                "(expert ids not contiguous from 0, or a layout this exporter does not know)"
            )
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


def to_model_layout(model: torch.nn.Module, local_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Token-MoE tensors of the local layout -> the layout of ``model``'s MoE modules (this rank's experts), so a
    state of any saved world size / ep_size loads into a model built for this one (fine-tuning, elastic resume)."""
    from nestor_ds.moe.expert_parallel import ExpertParallelTokenMoE, expert_parallel_state_from_local

    state = dict(local_state)
    for name, module in model.named_modules():
        if type(module).__name__ == "MegaBlocksTokenMoE":
            raise UserError(
                f"{name}: loading pre-trained weights into the megablocks backend is not supported yet; "
                f"fine-tune with model.moe.backend=local"
            )
        if not isinstance(module, ExpertParallelTokenMoE):
            continue
        prefix = name + "."
        sub = {k[len(prefix) :]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        if not sub:
            continue
        converted = expert_parallel_state_from_local(sub, ep_rank=module.ep_rank, ep_size=module.ep_size)
        state.update({prefix + k: v for k, v in converted.items()})
    return state
