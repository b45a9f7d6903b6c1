"""Configuration of the data pipeline: which shard datasets, how they are mixed and cut into windows.

Defaults live here, next to the code they configure (`stream.py`, `evalset.py`). `validate()` checks the
config against the built shards (manifest.json) so that a bad path or a window longer than the data fails
at start-up with one clear line instead of deep inside a DataLoader worker.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nestor_ds.shards.schema import MANIFEST_NAME, read_manifest
from nestor_ds.shards.urls import check_path, default_manifest, is_url_spec, read_manifest_at, shard_urls, split_spec


def load_manifest(path: str | Path) -> dict:
    """The validated manifest.json of a built shard directory (the directory or the file itself).

    Raises schema.DataFormatError (a ValueError) naming the file and the bad key.
    """
    p = Path(path)
    return read_manifest(p.parent if p.name == MANIFEST_NAME else p)


def spec_manifest(spec: DatasetSpec) -> dict:
    """The validated manifest of a dataset: `spec.manifest` if given (local path, http(s) URL or pipe:
    command), else `<path>/manifest.json` for a directory or the default of a URL spec (urls.default_manifest).

    Raises ValueError naming the dataset when a URL spec has no manifest location.
    """
    location = spec.manifest
    if location is None and not is_url_spec(spec.path):
        return load_manifest(spec.path)
    location = location or default_manifest(spec.path)
    if location is None:
        raise ValueError(
            f"dataset {spec.name}: path {spec.path!r} is a URL spec whose manifest cannot be "
            f"located; set `manifest:` (a path, an http(s) URL or a pipe: command)"
        )
    return read_manifest_at(location)


@dataclass
class DatasetSpec:
    """One built shard dataset in the training mixture.

    `weight` is the relative probability that a batch element is drawn from this dataset;
    `rollout_steps` is how many autoregressive steps the evaluator scores on its test split
    (DPOT, arXiv:2403.03542; the evaluation pass itself yields all frames after T_in).

    `path` is a built shard directory, or a WebDataset URL spec of the training shards
    (`pipe:...`, `http(s)://...`, `s3://...`, `gs://...`, or a brace pattern of local files), or a
    mapping `{train: URLSPEC, test: URLSPEC}` when the test split is read from URLs too
    (docs/data_pipeline.md, "Shards behind URLs and multi-node"). `manifest` locates manifest.json:
    default `<path>/manifest.json` for a directory and `<dirname of the first training URL>/manifest.json`
    for a URL spec whose first URL is a local file or http(s); pipe:/s3:/gs: specs must set it.
    """

    name: str
    path: str | dict[str, str]
    weight: float = 1.0
    rollout_steps: int = 10
    manifest: str | None = None


@dataclass
class DataConfig:
    """The `data` section of a run config.

    steps_per_epoch is fixed (batches per rank per epoch) rather than derived from the data size:
    every rank then runs the same number of steps and DeepSpeed's collectives never wait on a rank
    whose data ran out.
    """

    datasets: list[DatasetSpec] = field(default_factory=list)
    t_in: int = 10  # past frames fed to the model
    t_ar: int = 1  # next frames to predict (training target length)
    resolution: int = 128  # every dataset is resized (bilinear) to resolution x resolution
    channels: int = 4  # channels are zero-padded to this many, with a mask
    windows_per_trajectory: int = 4  # random windows cut from each decoded trajectory
    shuffle_buffer: int = 64  # windows held per dataset per worker for shuffling
    normalize: bool = False  # (v - mean) / std with the manifest's training-split stats
    num_workers: int = 0  # DataLoader workers per rank (0: main process, or 2 with pinned memory on
    # GPU machines: stream.py)
    steps_per_epoch: int = 100  # batches per rank per epoch
    on_bad_sample: str = "error"  # a window with NaN/Inf: "error" (stop, naming dataset/shard/key) or "skip"
    # (zeroed and masked out of the loss, logged, counted as train/skipped_samples)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Build from plain dicts (YAML); unknown keys and wrong types are errors so typos do not pass silently."""
        from nestor_ds.typed_config import build_dataclass

        return build_dataclass(cls, d, "data")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, check_files: bool = True) -> None:
        """Raise ValueError with one clear line for the first problem found.

        With check_files, every dataset path must hold a manifest.json whose frame count fits a
        window (t_in + t_ar <= T), whose channel count fits `channels`, and that lists training shards.
        """
        if not self.datasets:
            raise ValueError("data.datasets: empty; list at least one built shard directory")
        self._check_numbers()
        names = [s.name for s in self.datasets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"data.datasets: duplicate name(s) {dupes}")
        for i, spec in enumerate(self.datasets):
            where = f"data.datasets[{i}] ({spec.name})"
            _check_spec(spec, where)
            if check_files:
                self._check_shards(spec, where)

    def _check_numbers(self) -> None:
        """The scalar options: counts >= 1, num_workers >= 0, a known on_bad_sample."""
        positive = (
            "t_in",
            "t_ar",
            "resolution",
            "channels",
            "windows_per_trajectory",
            "shuffle_buffer",
            "steps_per_epoch",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name}: must be an integer >= 1, got {value!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"data.num_workers: must be an integer >= 0, got {self.num_workers!r}")
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(f"data.on_bad_sample: must be 'error' or 'skip', got {self.on_bad_sample!r}")

    def _check_shards(self, spec: DatasetSpec, where: str) -> None:
        """The dataset's manifest against this config, and its shards: listed files exist, URLs match."""
        remote = is_url_spec(spec.path)
        if not remote and not Path(spec.path).is_dir():
            raise ValueError(f"{where}: path {spec.path} does not exist (build it with nestor_ds.shards)")
        try:
            manifest = spec_manifest(spec)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        self._check_shape(spec, manifest, where)
        train = manifest["splits"].get("train", {})
        if not train.get("shards"):
            raise ValueError(f"{where}: no training shards listed in the manifest of {spec.path}")
        if remote:  # shard URLs must match the manifest; reachability is checked when read
            for split in ("train", "test"):
                if split_spec(spec.path, split):
                    shard_urls(split_spec(spec.path, split), manifest, split, where)
            return
        for shard in train["shards"]:
            if not (Path(spec.path) / shard["file"]).is_file():
                raise ValueError(f"{where}: shard {spec.path}/{shard['file']} listed in the manifest is missing")

    def _check_shape(self, spec: DatasetSpec, manifest: dict, where: str) -> None:
        """Windows must fit the manifest's T frames and its channels data.channels; short rollouts are warned."""
        t, _, _, c = manifest["shape"]
        if self.t_in + self.t_ar > t:
            raise ValueError(
                f"{where}: t_in + t_ar = {self.t_in + self.t_ar} > T = {t} frames "
                f"(shape {manifest['shape']} in the manifest of {spec.path})"
            )
        if c > self.channels:
            raise ValueError(f"{where}: {c} channels {manifest['channels']} > data.channels = {self.channels}")
        if spec.rollout_steps > t - self.t_in:
            logging.getLogger("nestor_ds.data").warning(
                "%s: rollout_steps = %d but only T - t_in = %d - %d frames follow the input window: rollouts "
                "are scored over %d steps",
                where,
                spec.rollout_steps,
                t,
                self.t_in,
                t - self.t_in,
            )


def _check_spec(spec: DatasetSpec, where: str) -> None:
    """One dataset entry on its own: weight, rollout_steps, path and manifest types."""
    if not (isinstance(spec.weight, (int, float)) and spec.weight > 0):
        raise ValueError(f"{where}: weight must be > 0, got {spec.weight!r}")
    if not isinstance(spec.rollout_steps, int) or spec.rollout_steps < 1:
        raise ValueError(f"{where}: rollout_steps must be an integer >= 1, got {spec.rollout_steps!r}")
    check_path(spec.path, where)
    if spec.manifest is not None and not isinstance(spec.manifest, str):
        raise ValueError(f"{where}: manifest must be a path or URL string, got {spec.manifest!r}")
