"""Checkpoints in DeepSpeed's layout, with our client state, completion markers and pruning.

Layout (``<output_dir>/<run>/checkpoints``)::

    latest                         DeepSpeed's pointer to the newest tag
    step_00000100/                 one tag per save
        mp_rank_00_model_states.pt            non-expert weights + client state (DeepSpeed)
        layer_<L>_expert_<E>_mp_rank_00_model_states.pt   token experts, global ids (DeepSpeed-MoE)
        *_optim_states.pt                     ZeRO optimizer partitions (DeepSpeed)
        nestor_config.json                    resolved run config + world/ep sizes (ours, for export/fine-tune)
        consolidated_model_states.pt          ZeRO-3 only: the full weights, gathered at save time
        COMPLETE                              written last, after every rank finished writing (ours)

A tag without ``COMPLETE`` (a save cut short by preemption) is never resumed from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

# file names shared with the reader (nestor_ds/checkpoint_io.py)
from nestor_ds.checkpoint_io import COMPLETE_MARKER, CONFIG_FILE  # noqa: E402


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """RNG states as tensors/lists only, so the checkpoint loads with ``weights_only=True``.

    Recorded for inspection; a resume does not need them: every draw of a step is seeded from
    (seed, purpose, rank, step) by the trainer, so the resumed steps draw the same numbers anyway."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype("int64")), "pos": int(np_state[2])},
        "python": list(random.getstate()[1]),
    }


def save_checkpoint(engine: Any, root: Path, step: int, client_state: dict[str, Any], run_config: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls it. Rank 0 writes our files and prunes old tags afterwards."""
    tag = tag_for(step)
    root.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=True)
    if engine.zero_optimization_stage() == 3:
        # ZeRO-3 files hold partitions only: also gather the full weights (collective) for export and fine-tuning
        from nestor_ds.checkpoint_io import CONSOLIDATED_STATES

        engine.save_16bit_model(str(root / tag), CONSOLIDATED_STATES)
    if dist.is_initialized():
        dist.barrier()
    tag_dir = root / tag
    if dist.get_rank() == 0:
        (tag_dir / CONFIG_FILE).write_text(json.dumps(run_config, indent=2))
        (tag_dir / COMPLETE_MARKER).write_text(f"{step}\n")
        prune(root, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return tag_dir


def complete_tags(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    tags = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / COMPLETE_MARKER).is_file()]
    return sorted(tags, key=lambda p: p.name)


def prune(root: Path, keep_last: int) -> None:
    for old in complete_tags(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume_dir(resume: Optional[str], checkpoint_root: Path) -> Optional[Path]:
    """``auto`` -> newest complete tag under this run's checkpoints (None if there is none); else a path:
    a checkpoint root (its newest complete tag) or a tag directory."""
    if resume is None:
        return None
    if resume == "auto":
        tags = complete_tags(checkpoint_root)
        return tags[-1] if tags else None
    p = Path(resume)
    if (p / COMPLETE_MARKER).is_file():
        return p
    tags = complete_tags(p)
    if tags:
        return tags[-1]
    raise FileNotFoundError(f"--resume {resume}: no complete checkpoint there (expected a tag directory with {COMPLETE_MARKER} or a directory of step_* tags)")


def load_checkpoint(engine: Any, tag_dir: Path) -> dict[str, Any]:
    """Load weights, optimizer state and our client state into a freshly initialised engine.

    DeepSpeed unpickles with weights_only=False; every file is first checked to load with weights_only=True.
    """
    from nestor_ds.checkpoint_io import verify_checkpoint_files

    verify_checkpoint_files(tag_dir)
    path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    return client_state or {}

