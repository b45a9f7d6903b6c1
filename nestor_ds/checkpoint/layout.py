"""Where things are in a checkpoint: file names, markers, the error type, and which tag a path means.

Layout of a checkpoint root (written by ``nestor_ds/checkpoint/save_resume.py``): ``latest`` (DeepSpeed's text
pointer, moved before our marker: not trusted), ``nestor_latest`` (our pointer: the tag the run continues from),
``<tag>/mp_rank_00_model_states.pt``, ``<tag>/layer_*_expert_*_mp_rank_00_model_states.pt``,
``<tag>/*optim_states.pt``, ``<tag>/nestor_config.json`` (resolved run config + world_size, ep_size),
``<tag>/COMPLETE``. Why its own module: the writer (``save_resume``), the safe reader (``safe_load``) and the
exporter (``export``) share these names and must not import each other for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nestor_ds.compat import EXPERT_FILE_RE, MODEL_STATES  # noqa: F401  (DeepSpeed's names, re-exported)
from nestor_ds.errors import UserError

CONFIG_FILE = "nestor_config.json"
COMPLETE_MARKER = "COMPLETE"  # written last by the engine, after every rank finished saving
POINTER = "nestor_latest"  # the tag a run continues from (rewritten after every save and resume; a rollback moves it)
CONSOLIDATED_STATES = "consolidated_model_states.pt"  # ZeRO-3 only: full weights gathered at save time (engine)
FORMAT_NAME = "nestor-ds-local"
FORMAT_VERSION = "1"


class CheckpointError(UserError):
    """Bad or unsafe checkpoint; str() is one line naming the file (and key / shapes where relevant)."""


def _is_tag(d: Path) -> bool:
    """Whether ``d`` is one saved tag (holds the model-state file, or the ZeRO-3 consolidated weights)."""
    return (d / MODEL_STATES).is_file() or (d / CONSOLIDATED_STATES).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A .safetensors file, a tag directory, or a checkpoint root -> the file or tag dir.

    On a root: the tag the run's own pointer (``nestor_latest``) names when it is complete -- a run rolled back
    with ``--resume .../step_N`` continues from (and exports) that tag, not the highest step -- else the highest
    complete step, else DeepSpeed's ``latest``.
    """
    p = Path(path)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointError(f"{p}: expected a .safetensors file or a DeepSpeed checkpoint directory")
        return p
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such file or directory")
    if _is_tag(p):
        return p
    pointed = _pointed_tag(p)
    if pointed is not None:
        return pointed
    complete = sorted(d for d in p.glob("step_*") if (d / COMPLETE_MARKER).is_file() and _is_tag(d))
    if complete:  # DeepSpeed moves `latest` before our COMPLETE marker: a save cut short must not be used
        return complete[-1]
    latest = p / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not _is_tag(p / tag):
            raise CheckpointError(
                f"{latest}: names tag '{tag}' but {p / tag} holds neither {MODEL_STATES} nor {CONSOLIDATED_STATES}"
            )
        return p / tag
    raise CheckpointError(f"{p}: not a checkpoint (no {MODEL_STATES}, no 'latest' file)")


def _pointed_tag(root: Path) -> Path | None:
    """The complete tag ``root/nestor_latest`` names, or None (no pointer, or it names an incomplete tag)."""
    try:
        tag = (root / POINTER).read_text().strip()
    except OSError:
        return None
    d = root / tag
    return d if tag and (d / COMPLETE_MARKER).is_file() and _is_tag(d) else None


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
