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

from nestor_ds.errors import UserError
from nestor_ds.redact import mask_secrets
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

    Raises ValueError naming the dataset when a URL spec has no manifest location, or when the spec was read from
    a saved file and is not a local shard directory (`check_saved`: nothing from a checkpoint is run or fetched).
    """
    check_saved(spec)
    location = spec.manifest
    if location is None and not is_url_spec(spec.path):
        return load_manifest(spec.path)
    location = location or default_manifest(spec.path)
    if location is None:
        raise UserError(
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

    name: str  # the dataset's name in metrics (eval/<name>/...), logs and expert-usage tables; unique in the mixture
    # a built shard directory, a WebDataset URL spec of the training shards, or {train: URLSPEC, test: URLSPEC}
    path: str | dict[str, str]
    weight: float = 1.0  # relative probability that a batch element is drawn from this dataset
    rollout_steps: int = 10  # autoregressive steps the evaluator scores on the test split
    # where manifest.json is (path, http(s) URL or pipe: command); null: <path>/manifest.json, or beside the first
    # training URL of a URL spec (pipe:, s3:// and gs:// specs must set it)
    manifest: str | None = None


@dataclass
class SavedDatasetSpec(DatasetSpec):
    """A dataset entry read from a file this process did not write from the user's own config: the run config
    inside a checkpoint, an export or an MLflow artifact (`saved_in` names that file).

    Why a type of its own: a saved `path` or `manifest` may be a `pipe:` command or a URL, and such a file may come
    from someone else (a downloaded model), so opening it would run that command or fetch from that host on this
    machine. `spec_manifest` -- through which every reader of a dataset's manifest and shards passes
    (`DatasetInfo.from_spec`, `DataConfig.validate`, dataset lineage) -- refuses such a spec unless it is a local
    shard directory that exists (`check_saved`). Never built from YAML: only `saved_dataset_specs` makes them.
    """

    saved_in: str = ""


def saved_dataset_specs(run_cfg: Any, saved_in: str) -> list[SavedDatasetSpec]:
    """The `data.datasets` entries of a saved run config (checkpoint, export, MLflow artifact), as
    SavedDatasetSpec: the saved strings kept as text, never opened here. Entries that are not a mapping with a
    name and a path are skipped (a run config from another version, or a crafted one)."""
    data = run_cfg.get("data") if isinstance(run_cfg, dict) else None
    entries = data.get("datasets") if isinstance(data, dict) else None
    out = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or "path" not in entry:
            continue
        path = entry["path"]
        if isinstance(path, dict):
            path = {str(k): str(v) for k, v in path.items()}
        weight, steps, manifest = entry.get("weight", 1.0), entry.get("rollout_steps", 10), entry.get("manifest")
        out.append(
            SavedDatasetSpec(
                name=str(entry.get("name") or f"dataset{len(out)}"),
                path=path if isinstance(path, dict) else str(path),
                weight=float(weight) if isinstance(weight, (int, float)) and weight > 0 else 1.0,
                rollout_steps=steps if isinstance(steps, int) and steps >= 1 else 10,
                manifest=None if manifest is None else str(manifest),
                saved_in=saved_in,
            )
        )
    return out


def check_saved(spec: DatasetSpec) -> None:
    """Refuse to open a SavedDatasetSpec that is not a local shard directory (with, if set, a local manifest file):
    a `pipe:` command, a URL, a brace pattern or a mapping of them from a saved file is never run or fetched.

    Raises UserError (a ValueError; one line, naming the file it was saved in) that tells the user to pass --data.
    """
    if not isinstance(spec, SavedDatasetSpec):
        return  # the user's own config or command line

    def local(p: Any) -> bool:
        return isinstance(p, str) and not is_url_spec(p) and "://" not in p

    path_ok = local(spec.path) and Path(spec.path).is_dir()
    manifest_ok = spec.manifest is None or (local(spec.manifest) and Path(spec.manifest).is_file())
    if path_ok and manifest_ok:
        return
    if not path_ok:
        problem = f"path {spec.path!r} " + (
            "is not a local shard directory here" if local(spec.path) else "is a URL spec (it could run or fetch)"
        )
    else:
        problem = f"manifest {spec.manifest!r} " + (
            "is not a local file here" if local(spec.manifest) else "is a URL or command (it could run or fetch)"
        )
    raise UserError(
        mask_secrets(
            f"dataset {spec.name}: {problem}, saved in {spec.saved_in}; data named by a checkpoint or export is "
            f"never opened unless it is a local shard directory: pass --data SHARD_DIR"
        )
    )


@dataclass
class DataConfig:
    """The `data` section of a run config.

    steps_per_epoch is fixed (batches per rank per epoch) rather than derived from the data size:
    every rank then runs the same number of steps and DeepSpeed's collectives never wait on a rank
    whose data ran out.
    """

    datasets: list[DatasetSpec] = field(default_factory=list)  # the training mixture, one entry per shard dataset
    t_in: int = 10  # past frames fed to the model
    t_ar: int = 1  # next frames to predict (training target length)
    resolution: int = 128  # every dataset is resized (bilinear) to resolution x resolution
    channels: int = 4  # channels are zero-padded to this many, with a mask
    windows_per_trajectory: int = 4  # random windows cut from each decoded trajectory
    shuffle_buffer: int = 64  # windows held per dataset per worker for shuffling
    normalize: bool = False  # (v - mean) / std with the manifest's training-split stats
    # a local directory where each shard behind a URL (s3://, http(s)://, gs://, pipe:) is downloaded whole once, then
    # read memory-mapped like a local shard (docs/data_pipeline.md, "Shard staging cache"); null: streamed every read
    shard_cache: str | None = None
    # bound on the shards staged in data.shard_cache, in GB (10^9 bytes): least recently used shards no process of the
    # node reads are deleted after each download to fit (docs/data_pipeline.md, "Shard staging cache"); null: no bound
    shard_cache_max_gb: float | None = None
    device_windows: bool = False  # send each trajectory to the device once, as stored (fp16 shards: half the bytes),
    # and cut its windows there (same batches; 1/windows_per_trajectory of the host-to-device bytes:
    # docs/data_pipeline.md, "Loader capacity")
    num_workers: int = 0  # DataLoader workers per rank (0: main process, or 2 with pinned memory on
    # GPU machines: stream.py)
    steps_per_epoch: int = 100  # batches per rank per epoch
    on_bad_sample: str = "error"  # a window with NaN/Inf: "error" (stop, naming dataset/shard/key) or "skip"
    # (zeroed and masked out of the loss, logged, counted as train/skipped_samples)
    verify_shards: bool = True  # compare each local (or staged) training shard with its manifest sha256 once per
    # process before its first use; false skips that full read (0.7-0.8 CPU-ns per byte: on a corpus each process
    # reads about once, more CPU than the loader itself) and a changed byte then trains silently
    # (docs/data_pipeline.md, "Loader capacity")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Build from plain dicts (YAML); unknown keys and wrong types are errors so typos do not pass silently."""
        from nestor_ds.typed_config import build_dataclass

        return build_dataclass(cls, d, "data")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def shard_cache_max_bytes(self) -> int | None:
        """data.shard_cache_max_gb in bytes (None: no bound)."""
        return None if self.shard_cache_max_gb is None else int(self.shard_cache_max_gb * 1e9)

    def validate(self, check_files: bool = True) -> None:
        """Raise ValueError with one clear line for the first problem found.

        With check_files, every dataset path must hold a manifest.json whose frame count fits a
        window (t_in + t_ar <= T), whose channel count fits `channels`, and that lists training shards.
        """
        if not self.datasets:
            raise UserError("data.datasets: empty; list at least one built shard directory")
        self._check_numbers()
        names = [s.name for s in self.datasets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UserError(f"data.datasets: duplicate name(s) {dupes}")
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
                raise UserError(f"data.{name}: must be an integer >= 1, got {value!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise UserError(f"data.num_workers: must be an integer >= 0, got {self.num_workers!r}")
        if self.shard_cache is not None and (not isinstance(self.shard_cache, str) or not self.shard_cache):
            raise UserError(f"data.shard_cache: a directory path or null, got {self.shard_cache!r}")
        bound = self.shard_cache_max_gb
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0):
            raise UserError(f"data.shard_cache_max_gb: a number of GB > 0 or null (no bound), got {bound!r}")
        if self.on_bad_sample not in ("error", "skip"):
            raise UserError(f"data.on_bad_sample: must be 'error' or 'skip', got {self.on_bad_sample!r}")

    def _check_shards(self, spec: DatasetSpec, where: str) -> None:
        """The dataset's manifest against this config, and its shards: listed files exist, URLs match."""
        remote = is_url_spec(spec.path)
        if not remote and not Path(spec.path).is_dir():
            raise UserError(f"{where}: path {spec.path} does not exist (build it with nestor_ds.shards)")
        try:
            manifest = spec_manifest(spec)
        except ValueError as err:
            raise UserError(f"{where}: {err}") from None
        self._check_shape(spec, manifest, where)
        train = manifest["splits"].get("train", {})
        if not train.get("shards"):
            raise UserError(f"{where}: no training shards listed in the manifest of {spec.path}")
        if remote:  # shard URLs must match the manifest; reachability is checked when read
            for split in ("train", "test"):
                if split_spec(spec.path, split):
                    shard_urls(split_spec(spec.path, split), manifest, split, where)
            return
        for shard in train["shards"]:
            if not (Path(spec.path) / shard["file"]).is_file():
                raise UserError(f"{where}: shard {spec.path}/{shard['file']} listed in the manifest is missing")

    def _check_shape(self, spec: DatasetSpec, manifest: dict, where: str) -> None:
        """Windows must fit the manifest's T frames and its channels data.channels; short rollouts are warned."""
        t, _, _, c = manifest["shape"]
        if self.t_in + self.t_ar > t:
            raise UserError(
                f"{where}: t_in + t_ar = {self.t_in + self.t_ar} > T = {t} frames "
                f"(shape {manifest['shape']} in the manifest of {spec.path})"
            )
        if c > self.channels:
            raise UserError(f"{where}: {c} channels {manifest['channels']} > data.channels = {self.channels}")
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
        raise UserError(f"{where}: weight must be > 0, got {spec.weight!r}")
    if not isinstance(spec.rollout_steps, int) or spec.rollout_steps < 1:
        raise UserError(f"{where}: rollout_steps must be an integer >= 1, got {spec.rollout_steps!r}")
    try:
        check_path(spec.path, where)
    except ValueError as err:  # shards.urls checks the shape of the user's path spec: its errors are about that input
        raise UserError(str(err)) from None
    if spec.manifest is not None and not isinstance(spec.manifest, str):
        raise UserError(f"{where}: manifest must be a path or URL string, got {spec.manifest!r}")
