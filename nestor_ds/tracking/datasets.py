"""Dataset lineage: the shard datasets of a run as MLflow dataset inputs (the run page's Datasets panel).

Why: a reviewer must see which data a model was trained or evaluated on, and whether two runs used the
same data. Each shard dataset becomes one MLflow dataset whose

- digest is built from its manifest -- the sha256 of every shard of every split, the source file names --
  and its mixture weight, so equal digests mean equal bytes mixed the same way (`digest`);
- source is the shard directory or URL spec (credentials masked);
- profile lists the mixture weight, source files, trajectory counts, frame shape and channel names.

The context tag (`mlflow.data.context`) says what the run did with it: `training` (its own mixture; its
test split is also what in-training evaluation scores), `evaluation` (`nestor_ds/evaluate.py`), or
`pretraining` (a fine-tune's parent data, so a fine-tune shows both). Nothing here reads shard contents:
the manifest already holds the hashes the builder computed. A parent's data specs come from its checkpoint or
export, which may be someone else's file: they are recorded as the saved text, and read (a local manifest only)
when they name a local shard directory here; a `pipe:` command or URL from them is never run or fetched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nestor_ds.redact import mask_secrets

DIGEST_CHARS = 32  # MLflow stores dataset digests in a 36-character column
CONTEXT_TAG = "mlflow.data.context"


def _spec_field(spec: Any, key: str, default: Any = None) -> Any:
    return spec.get(key, default) if isinstance(spec, dict) else getattr(spec, key, default)


def _read_manifest(spec: Any) -> tuple[dict[str, Any] | None, str]:
    """(the dataset's manifest, "") or (None, why not): lineage is best effort, never an error.

    A SavedDatasetSpec (a parent's entry) is opened only when it is a local shard directory here
    (`nestor_ds.data.config.check_saved`); otherwise its saved text is all that is recorded."""
    from nestor_ds.data.config import SavedDatasetSpec, check_saved, spec_manifest

    if isinstance(spec, SavedDatasetSpec):
        try:
            check_saved(spec)
        except ValueError:
            return None, f"not opened: named by {spec.saved_in} and not a local shard directory here (text only)"
    try:
        return spec_manifest(spec), ""
    except Exception:  # noqa: BLE001 - a moved parent dataset, an offline URL: log what the config says
        return None, "unavailable when this run was logged"


def digest(manifest: dict[str, Any] | None, weight: float, path: str) -> str:
    """Hex digest of (every shard's sha256 per split, source files, mixture weight); path only without a manifest."""
    if manifest is not None:
        shards = {
            split: [[s["file"], s["sha256"]] for s in entry.get("shards", [])]
            for split, entry in sorted(manifest.get("splits", {}).items())
        }
        key = {"shards": shards, "sources": manifest.get("sources", []), "weight": float(weight)}
    else:
        key = {"path": path, "weight": float(weight)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:DIGEST_CHARS]


def describe(spec: Any, context: str) -> dict[str, Any]:
    """One JSON-able dataset description (DatasetSpec, or a dict as saved configs hold them) for
    `Tracker.log_inputs`."""
    if isinstance(spec, dict):  # what a saved file holds: read as such (`_read_manifest`)
        from nestor_ds.data.config import saved_dataset_specs

        spec = saved_dataset_specs({"data": {"datasets": [spec]}}, "a saved run config")[0]
    name = str(_spec_field(spec, "name"))
    path = _spec_field(spec, "path")
    weight = float(_spec_field(spec, "weight", 1.0))
    where = mask_secrets(json.dumps(path) if isinstance(path, dict) else str(path))
    manifest, why_not = _read_manifest(spec)
    profile: dict[str, Any] = {"weight": weight}
    if manifest is not None:
        profile.update(
            sources=manifest.get("sources", []),
            trajectories={s: e.get("count", 0) for s, e in manifest.get("splits", {}).items()},
            shards={s: len(e.get("shards", [])) for s, e in manifest.get("splits", {}).items()},
            frame_shape=manifest.get("shape"),
            channels=manifest.get("channels"),
            dtype=manifest.get("dtype"),
        )
    else:
        profile["manifest"] = why_not
    is_local = isinstance(path, str) and "://" not in path and not path.startswith("pipe:")
    source = {"uri": str(Path(path).resolve())} if is_local else {"url": where}
    return {
        "name": name,
        "digest": digest(manifest, weight, where),
        "source_type": "local" if is_local else "url",
        "source": json.dumps(source),
        "profile": json.dumps(profile),
        "context": context,
    }


def describe_all(specs: Iterable[Any], context: str) -> list[dict[str, Any]]:
    return [describe(s, context) for s in specs]


def dataset_inputs(described: list[dict[str, Any]]) -> list[Any]:
    """MLflow `DatasetInput` entities for `MlflowClient.log_inputs`."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [
        DatasetInput(
            Dataset(
                name=d["name"],
                digest=d["digest"],
                source_type=d["source_type"],
                source=d["source"],
                profile=d.get("profile"),
            ),
            tags=[InputTag(CONTEXT_TAG, d["context"])],
        )
        for d in described
    ]


def parent_run_config(pretrained: str) -> dict[str, Any] | None:
    """The run config saved with a pre-trained checkpoint or export (None if it cannot be read)."""
    from nestor_ds.checkpoint.load import read_saved_config

    try:
        return read_saved_config(pretrained)
    except Exception:  # noqa: BLE001 - lineage is best effort
        return None


def log_run_inputs(tracker: Any, cfg: Any, entry: str) -> None:
    """Start of a training run: its mixture (`training`); a fine-tune also its parent's data (`pretraining`).

    The parent's entries come from a file that may be someone else's (a downloaded export): they are
    SavedDatasetSpecs, recorded as the saved text unless they are local shard directories here, and never run or
    fetched (`nestor_ds.data.config.check_saved`)."""
    from nestor_ds.data.config import saved_dataset_specs

    if not tracker.active:
        return
    described = describe_all(cfg.data.datasets, "training")
    if entry == "finetune" and cfg.finetune.pretrained:
        parent = parent_run_config(cfg.finetune.pretrained) or {}
        try:
            described += describe_all(saved_dataset_specs(parent, str(cfg.finetune.pretrained)), "pretraining")
        except (OSError, ValueError, TypeError):  # a path no file system takes (NUL): the fine-tune goes on
            pass
    tracker.log_inputs(merge_contexts(described))


def merge_contexts(described: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (name, digest), contexts joined with "+": MLflow keeps one input per dataset and run, so
    a fine-tune on (exactly) a dataset of its parent shows it once as `training+pretraining`."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for d in described:
        key = (d["name"], d["digest"])
        if key in merged:
            merged[key]["context"] += f"+{d['context']}"
        else:
            merged[key] = dict(d)
    return list(merged.values())
