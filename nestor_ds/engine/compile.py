"""Regional torch.compile and CUDA graphs, applied to a built model from outside it (torchtitan's habit).

Why regional: compiling each block separately (torchtitan's ``apply_compile`` compiles every transformer block
on its own) keeps compile time proportional to one block, reuses the code of identical blocks, and leaves
the glue between them eager. ``nn.Module.compile()`` compiles a module in place, so ``state_dict`` keys do not
change (no ``_orig_mod.`` prefix): DeepSpeed checkpoints, export and fine-tune loading work unchanged. The model
is compiled before ``deepspeed.initialize``; compilation is lazy, so it traces the weights DeepSpeed has cast
(bf16) at the first step.

Regions:
- AFNO baseline: the encoder, each AFNO block, the head, each with ``fullgraph=True``.
- NESTOR with static routing: the encoder, each NESTOR block (``fullgraph=True``; under expert parallelism too: the
  token exchange is a functional collective, which Dynamo traces), the head.
- NESTOR with dropless routing: the group sizes are read on the host and shapes depend on the data, so the
  NESTOR blocks stay eager; the encoder, the head and the shared AFNO blocks inside them are compiled.
Evaluation runs the regions eagerly (:func:`eager_for_evaluation`): it routes dropless and uses other batch sizes.

CUDA graphs (``train.cuda_graphs``): the regions are compiled with ``mode="reduce-overhead"`` (CUDA graph trees:
each region's forward and backward replayed as graphs). They need a CUDA device and static shapes (static routing
or the AFNO baseline); otherwise the run continues without them and says why in exactly one log line. DeepSpeed's
gradient hooks and optimizer step run between the graphs, outside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nestor_ds.log import get_logger

log = get_logger(__name__)


@dataclass
class CompilePlan:
    """What :func:`apply_compile` did: the compiled regions (module names) and whether CUDA graphs are on."""

    regions: list[str] = field(default_factory=list)
    cuda_graphs: bool = False
    cuda_graphs_off_reason: str | None = None
    fullgraph: bool = True

    def step_begin(self) -> None:
        """Call at the start of every training micro-step: tells CUDA graph trees that the previous step's outputs
        are no longer needed (otherwise a replay would overwrite tensors that are still referenced)."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()


def static_routing(model: nn.Module) -> bool:
    """True when the model's training shapes do not depend on the data: the AFNO baseline, or NESTOR with static
    routing at both levels (model.image_routing and model.moe.routing; evaluation routes dropless, see
    :func:`eager_for_evaluation`)."""
    cfg = model.cfg
    return cfg.arch == "afno" or (cfg.image_routing == "static" and cfg.moe.routing == "static")


def compile_regions(model: nn.Module, static: bool) -> list[tuple[str, nn.Module]]:
    """(name, module) of the regions to compile, in model order (see the module docstring)."""
    from nestor_ds.model.afno import AFNOBlock

    named = dict(model.named_modules())
    out: list[tuple[str, nn.Module]] = [("encoder", named["encoder"])]
    blocks = named["blocks"]
    if static:
        out += [(f"blocks.{i}", b) for i, b in enumerate(blocks)]
    else:
        out += [(f"blocks.{n}", m) for n, m in blocks.named_modules() if isinstance(m, AFNOBlock)]
    out.append(("head", named["head"]))
    # not the dataset head: a bare nn.Sequential's forward lives in torch's own files, which Dynamo does not trace
    # as a top-level frame ("fullgraph=True found no compiled frames"); it is three small matmuls on [B, D]
    return out


def eager_for_evaluation(plan: CompilePlan):
    """Context for evaluation passes: the compiled regions run eagerly (``torch.compiler.set_stance``).

    Evaluation routes dropless (a sample's prediction must not depend on its batch), which a fullgraph region
    cannot trace, and its batch sizes differ from training's (each would be a recompile)."""
    import contextlib

    return torch.compiler.set_stance("force_eager") if plan.regions else contextlib.nullcontext()


def cuda_graphs_blocker(device: torch.device, static: bool) -> str | None:
    """Why CUDA graphs cannot be used here, or None."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, this run is on {device.type}"
    if not static:
        return "routing is dropless (data-dependent shapes, group sizes read on the host)"
    return None


def apply_compile(model: nn.Module, compile_: bool, cuda_graphs: bool, device: torch.device) -> CompilePlan:
    """Compile ``model``'s regions in place (nothing when ``compile_`` is False). Logs one line per decision."""
    plan = CompilePlan()
    if not compile_:
        return plan
    static = static_routing(model)
    if cuda_graphs:
        plan.cuda_graphs_off_reason = cuda_graphs_blocker(device, static)
        plan.cuda_graphs = plan.cuda_graphs_off_reason is None
        if not plan.cuda_graphs:
            log.info("train.cuda_graphs: off, %s", plan.cuda_graphs_off_reason)
    mode = "reduce-overhead" if plan.cuda_graphs else None
    for name, module in compile_regions(model, static):
        module.compile(fullgraph=True, mode=mode)
        plan.regions.append(name)
    log.info(
        "train.compile: %d regions compiled (%s)%s",
        len(plan.regions),
        ", ".join(plan.regions),
        ", CUDA graphs on" if plan.cuda_graphs else "",
    )
    return plan
