"""The composed run configuration the engine trains from: one dataclass per YAML section, plus the run's ep_size.

Why in the engine: the engine is the one reader of every section (data, model, optimizer, loss, loop, tracking,
fine-tuning), and the sections it composes all sit below it (``nestor_ds.data``, ``nestor_ds.model``,
``nestor_ds.tracking`` and the engine's own ``optim`` / ``loss`` / ``train_config`` / ``transfer``). Reading YAML,
merging the model section and ``--set`` overrides live one level up, in ``nestor_ds.config``, which the entries use;
the engine never imports it, so the packages form no cycle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from nestor_ds.data.config import DataConfig
from nestor_ds.data.stream import effective_workers
from nestor_ds.engine.loss import LossConfig
from nestor_ds.engine.optim import OptimConfig
from nestor_ds.engine.train_config import TrainConfig
from nestor_ds.engine.transfer import FinetuneConfig
from nestor_ds.model.config import ModelConfig
from nestor_ds.tracking.tracker import TrackingConfig
from nestor_ds.typed_config import check


@dataclass
class RunConfig:
    """Everything a run needs besides the DeepSpeed JSON."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ep_size: int | str = "auto"  # from model.moe.ep_size in YAML; resolved against the world size at start
    preset: str | None = None  # from model.preset in YAML: the registry entry the model fields override

    def run_name(self, entry: str, given: str | None = None) -> str:
        """``--run-name`` when given, else ``<entry>-<preset or arch>``: the run directory's name under
        ``train.output_dir`` (the trainer and a restarted attempt looking for its checkpoints agree on it)."""
        return given or f"{entry}-{self.preset or self.model.arch}"

    def validate(self) -> None:
        for part in (self.data, self.model, self.optim, self.train, self.finetune):
            if hasattr(part, "validate"):
                part.validate()
        d, m = self.data, self.model
        for key in ("t_in", "t_ar", "resolution"):
            check(
                getattr(d, key) == getattr(m, key),
                f"model.{key}",
                f"= {getattr(m, key)} disagrees with data.{key} = {getattr(d, key)}",
            )
        check(
            d.channels == m.in_channels,
            "model.in_channels",
            f"= {m.in_channels} disagrees with data.channels = {d.channels}",
        )
        check(
            self.ep_size == "auto" or (isinstance(self.ep_size, int) and self.ep_size >= 1),
            "model.moe.ep_size",
            f"must be 'auto' or a positive integer, got {self.ep_size!r}",
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return json.loads(json.dumps(out, default=str))

    def digest(self, legacy: bool = False) -> str:
        """Hash of the science-relevant configuration (stored in checkpoints; resume warns on mismatch).

        ``legacy``: the hash as checkpoints written before the data section left out `SAME_BATCHES` stored it (the
        whole data section, without the keys added since), so resuming one of those with an unchanged configuration
        does not warn."""
        d = self.to_dict()
        for volatile in ("tracking",):
            d.pop(volatile, None)
        # fields that do not change the training trajectory (max_steps does: it shapes the lr schedule)
        # (expert_order: the same function with the experts of each token MoE in another order)
        volatile = ("output_dir", "ckpt_every", "keep_last", "log_every", "stop_at", "threads_per_rank", "expert_order")
        d["train"] = {k: v for k, v in d["train"].items() if k not in volatile and not k.startswith("eval_")}
        if legacy:
            d["data"] = {k: v for k, v in d["data"].items() if k not in ADDED_SINCE_LEGACY_DIGEST}
        else:
            d["data"] = _batch_settings(d["data"])
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# data settings that change how the batches are made, never which: the batches are the same with them on or off
# (device_windows: tests/test_device_windows.py, bit for bit with the CPU as the device; shard_cache: tests/test_s3.py),
# so a run resumed with one of them changed keeps its trajectory (tests/test_device_windows.py)
SAME_BATCHES = ("shard_cache", "shard_cache_max_gb", "verify_shards", "device_windows")
ADDED_SINCE_LEGACY_DIGEST = ("shard_cache", "shard_cache_max_gb", "verify_shards")  # data keys newer than that hash


def _batch_settings(data: dict[str, Any]) -> dict[str, Any]:
    """The data section as far as it decides the batches (`RunConfig.digest`): without `SAME_BATCHES`, and with
    num_workers replaced by the logical worker count that seeds the streams (W = max(1, effective workers), stream.py):
    0 and 1 give the same batches on a CPU machine, 0 and 2 on a GPU one, while any other change of W changes them."""
    kept = {k: v for k, v in data.items() if k not in SAME_BATCHES and k != "num_workers"}
    kept["logical_workers"] = max(1, effective_workers(data["num_workers"]))
    return kept


def format_config(cfg: RunConfig, ds_config: dict[str, Any] | None = None) -> str:
    """Human-readable resolved configuration, printed at start (credentials masked)."""
    from nestor_ds.redact import redact

    text = yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False, default_flow_style=None, width=110)
    if ds_config is not None:
        text += "ds_config:\n" + "".join(f"  {line}\n" for line in json.dumps(ds_config, indent=2).splitlines())
    return text
