"""What tools/soak_restart.py compares with the uninterrupted reference: every tensor of a checkpoint tag, bit for
bit, and every metrics.jsonl row.

Why its own module: the passing bar of both soak modes lives here, apart from how the runs are driven.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from nestor_ds import compat


def rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows (a torn last line, from a kill in mid-write, is skipped as the resume would drop it)."""
    out = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def flat_tensors(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    """Every tensor inside a loaded checkpoint file, keyed by its path in the nesting (dicts, lists, tuples)."""
    import torch

    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            flat_tensors(v, f"{prefix}/{k}", out)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            flat_tensors(v, f"{prefix}/{i}", out)


def tag_tensors(tag: Path) -> dict[str, Any]:
    """Every tensor of every .pt file of a checkpoint tag (module, expert files, ZeRO partitions with the fp32
    masters and Adam's moments), read with the project's safe loader (weights_only, DeepSpeed's few state classes)."""
    from nestor_ds.checkpoint.safe_load import safe_torch_load

    out: dict[str, Any] = {}
    for f in sorted(tag.glob("*.pt")):
        flat_tensors(safe_torch_load(f), f.name, out)
    return out


def compare_tags(ref: Path, other: Path) -> dict[str, Any]:
    """Bitwise comparison of two tags, tensor by tensor (the model's weights counted apart from optimizer state).

    The client state's ``rng`` record is reported apart and not part of ``bit_identical``: it is kept for inspection
    only and never restored (``save_resume.rng_state``: every draw is seeded per step), and its numpy and Python
    states are those of the saving process, unseeded (two uninterrupted runs differ there too)."""
    import torch

    a, b = tag_tensors(ref), tag_tensors(other)
    differ_all = [k for k in a if k in b and not (a[k].shape == b[k].shape and torch.equal(a[k], b[k]))]
    differ = [k for k in differ_all if "/rng/" not in k]
    worst = 0.0
    for k in a:
        if "/rng/" not in k and k in b and a[k].shape == b[k].shape and a[k].is_floating_point():
            worst = max(worst, (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0)

    def optimizer_file(name: str) -> bool:  # ZeRO's optimizer partitions (fp32 masters, Adam), experts' too
        return bool(compat.OPTIM_FILE_RE.match(name)) or fnmatch.fnmatch(name, compat.EXPERT_OPTIM_FILES)

    weights = [k for k in a if not optimizer_file(k.split("/")[0]) and "/rng/" not in k]
    return {
        "tensors": len(a),
        "weight_tensors": len(weights),  # module and expert files; the rest: ZeRO partitions (masters, Adam)
        "missing_or_extra": sorted(set(a) ^ set(b))[:10],
        "differing": differ[:10],
        "n_differing": len(differ),
        "rng_record_differing": [k for k in differ_all if "/rng/" in k],
        "max_abs_diff": worst,
        "bit_identical": bool(a) and set(a) == set(b) and not differ,
    }


def compare_rows(ref: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics.jsonl against the reference: the same steps, each non-timing value's relative difference."""
    worst, losses_equal = 0.0, len(ref) == len(other)
    for r, o in zip(ref, other, strict=False):
        losses_equal = losses_equal and r.get("train/loss") == o.get("train/loss")
        for k, v in r.items():
            if k == "step" or k.startswith("perf/") or not isinstance(v, int | float):
                continue
            w = o.get(k)
            if not isinstance(w, int | float):
                worst = float("inf")
            else:
                worst = max(worst, abs(v - w) / max(abs(v), 1e-30))
    return {
        "rows": [len(ref), len(other)],
        "steps_equal": [r["step"] for r in ref] == [o["step"] for o in other],
        "losses_bit_identical": losses_equal,
        "max_rel_diff": worst,
    }
