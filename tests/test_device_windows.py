"""Device windowing (`TrainStream.packed_batches` + `WindowCutter`) gives the batches of the host path, bit for bit.

Why it exists: cutting windows on the host copies t_in + t_ar frames per window; sending each trajectory once and
cutting on the device moves T / windows_per_trajectory frames per window (docs/data_pipeline.md, "Loader capacity"),
and a float16 shard is sent as stored (half the bytes) and converted on the device.
The device here is the CPU: the cut code is the same on a GPU.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from nestor_ds.data import DataConfig, TrainStream
from nestor_ds.data.device_windows import finite_frames
from nestor_ds.shards import schema
from nestor_ds.shards.tar import iter_shard_samples

from shard_fixtures import assert_batches_equal, build_dataset, stream_datasets, take
from shard_fixtures import stream_config as make_cfg


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    return stream_datasets(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def dirs16(tmp_path_factory) -> dict[str, Path]:
    """The stream tests' mixture stored as float16: "cfd" at the run resolution, "grp" resized and padded."""
    root = tmp_path_factory.mktemp("shards16")
    return {
        "cfd": build_dataset(root, "cfd", n=8, t=10, res=16, c=4, per_shard=2, seed=1, dtype="float16"),
        "grp": build_dataset(root, "grp", n=6, t=9, res=8, c=2, per_shard=3, seed=2, dtype="float16"),
    }


def cut(stream: TrainStream, n: int, start: int = 0) -> tuple[list[dict], int]:
    """The first n device-windowed batches from `start`, and the trajectories still cached after them."""
    cutter = stream.cutter("cpu")
    out = [cutter(p) for p in itertools.islice(stream.packed_batches(start), n)]
    return out, len(cutter.cache)


@pytest.mark.parametrize("normalize", [False, True])
def test_device_windows_equal_host_batches(dirs: dict[str, Path], normalize: bool) -> None:
    cfg = make_cfg(dirs, normalize=normalize)
    host = take(TrainStream(cfg, 4, seed=5), 20)  # 3+ epochs of 6 steps
    device, cached = cut(TrainStream(cfg, 4, seed=5), 20)
    assert_batches_equal(device, host)
    # bounded: what a shuffle buffer of 8 windows (2 per trajectory) can hold per dataset, plus the one being read
    assert cached <= 2 * (8 + 1)


@pytest.mark.parametrize("start", [1, 6, 7, 13])
def test_device_windows_resume(dirs: dict[str, Path], start: int) -> None:
    cfg = make_cfg(dirs)
    full = take(TrainStream(cfg, 4, seed=9), 16)
    assert_batches_equal(cut(TrainStream(cfg, 4, seed=9), 16 - start, start)[0], full[start:])


def test_device_windows_with_dataloader_workers(dirs: dict[str, Path]) -> None:
    cfg = make_cfg(dirs, num_workers=2, steps_per_epoch=5)
    full = take(TrainStream(cfg, 4, seed=2), 12)
    assert_batches_equal(cut(TrainStream(cfg, 4, seed=2), 12)[0], full)
    assert_batches_equal(cut(TrainStream(cfg, 4, seed=2), 5, 7)[0], full[7:])


def test_each_trajectory_is_sent_once_per_epoch(dirs: dict[str, Path]) -> None:
    """Fewer bytes: one trajectory per windows_per_trajectory windows, not t_in + t_ar frames per window."""
    cfg = make_cfg(dirs, windows_per_trajectory=4, steps_per_epoch=1000)
    packed = list(itertools.islice(TrainStream(cfg, 4, seed=1).packed_batches(), 40))
    keys = torch.cat([p["new_keys"] for p in packed]).tolist()
    assert len(keys) == len(set(keys))
    used = torch.cat([p["key"] for p in packed]).tolist()
    assert set(used) <= set(keys) and len(keys) < len(used) / 2
    released = torch.cat([p["release"] for p in packed]).tolist()
    assert len(released) == len(set(released)) and set(released) <= set(keys)


@pytest.mark.parametrize("normalize", [False, True])
def test_float16_shards_are_sent_as_stored_and_cut_alike(dirs16: dict[str, Path], normalize: bool) -> None:
    """A float16 shard crosses as float16 (half the bytes of float32) and the cut batches equal the host path's,
    which converts to float32 in numpy: the conversion is exact wherever it runs. Resume included."""
    cfg = make_cfg(dirs16, normalize=normalize, steps_per_epoch=5)
    host = take(TrainStream(cfg, 4, seed=3), 12)
    packed = list(itertools.islice(TrainStream(cfg, 4, seed=3).packed_batches(), 12))
    sent = [t for p in packed for t in p["new_data"]]
    assert sent and all(t.dtype == torch.float16 for t in sent)
    cutter = TrainStream(cfg, 4, seed=3).cutter("cpu")
    assert_batches_equal([cutter(p) for p in packed], host)
    assert_batches_equal(cut(TrainStream(cfg, 4, seed=3), 5, 7)[0], host[7:])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_finite_frames_flags_exactly_the_frames_with_nan_or_inf(dtype: type) -> None:
    """Against np.isfinite, on the values the cheap checks could get wrong: the largest finite values (their float32
    sum overflows), subnormals, -0, signed Inf and NaN payloads."""
    finfo = np.finfo(dtype)
    frames = np.ones((7, 4, 4, 2), dtype=dtype)
    frames[1] = finfo.max  # finite, but no finite sum in its own dtype
    frames[2, 0, 0, 0], frames[2, 1, 1, 1] = finfo.smallest_subnormal, -0.0
    frames[3, 3, 3, 1] = np.inf
    frames[4, 0, 2, 0] = -np.inf
    frames[5, 2, 2, 0] = np.nan
    bits = frames.view(np.uint16 if dtype == np.float16 else np.uint32)
    bits[6, 1, 1, 1] = 0x7C01 if dtype == np.float16 else 0x7F800001  # a NaN with the smallest payload
    expect = np.isfinite(frames).reshape(7, -1).all(axis=1)
    assert expect.tolist() == [True, True, True, False, False, False, False]
    assert finite_frames(frames).tolist() == expect.tolist()
    assert finite_frames(frames[:3]) is None  # all finite: no per-window check needed


def _poison_frame0(shard_dir: Path) -> None:
    """NaN in frame 0 of every trajectory of train shard 0 (in the stored dtype), manifest digest updated (bad data,
    not corruption)."""
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    shard = shard_dir / manifest["splits"]["train"]["shards"][0]["file"]
    fd = os.open(shard, os.O_RDWR)
    try:
        for key, members in iter_shard_samples(fd, str(shard)):
            off, size = members["fields.npy"]
            dtype, _, start = schema.parse_npy_header(np.frombuffer(os.pread(fd, 256, off), dtype=np.uint8), key)
            os.pwrite(fd, np.array(np.nan, dtype=dtype).tobytes(), off + start)
    finally:
        os.close(fd)
    manifest["splits"]["train"]["shards"][0]["sha256"] = schema.sha256_file(shard)
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bad_windows_are_skipped_or_raised_alike(tmp_path: Path, dtype: str) -> None:
    d = build_dataset(tmp_path, "bad", n=6, t=8, res=8, c=4, per_shard=3, test_fraction=0.0, seed=3, dtype=dtype)
    _poison_frame0(d)
    data = {"datasets": [{"name": "bad", "path": str(d)}], "t_in": 2, "t_ar": 1, "resolution": 8, "channels": 4}
    data.update(steps_per_epoch=4, shuffle_buffer=4, windows_per_trajectory=3, normalize=True)
    cfg = DataConfig.from_dict({**data, "on_bad_sample": "skip"})
    host = take(TrainStream(cfg, 4, seed=0), 10)
    assert sum(int(b["skipped"].sum()) for b in host) > 0
    assert_batches_equal(cut(TrainStream(cfg, 4, seed=0), 10)[0], host)
    strict = DataConfig.from_dict(data)
    with pytest.raises(schema.DataFormatError, match="NaN/Inf") as host_err:
        take(TrainStream(strict, 4, seed=0), 10)
    with pytest.raises(schema.DataFormatError, match="NaN/Inf") as dev_err:
        cut(TrainStream(strict, 4, seed=0), 10)
    assert str(dev_err.value) == str(host_err.value)


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory) -> dict[str, Path]:
    """Two tiny datasets for the trainer's tiny config (T = 14, 16x16, 2 and 1 channels), stored as float16."""
    root = tmp_path_factory.mktemp("tiny16")
    return {
        "a16": build_dataset(
            root, "a16", n=6, t=14, res=16, c=2, per_shard=2, test_fraction=0.34, seed=4, dtype="float16"
        ),
        "b16": build_dataset(
            root, "b16", n=6, t=14, res=16, c=1, per_shard=3, test_fraction=0.34, seed=5, dtype="float16"
        ),
    }


# the README's afno-ti recommendation (after its presets table; docs/data_pipeline.md, "Loader capacity"): fp16
# shards, data.device_windows: true and data.windows_per_trajectory: 8 (shuffle buffer raised in proportion, as the
# docs say), on afno-tiny shrunk like the other tests' AFNO
AFNO_TI_RECIPE = {
    "model": {"preset": "afno-tiny", "width": 16, "patch_size": 4, "afno_modes": 2, "norm_groups": 4, "head_dim": 8},
    "data": {"windows_per_trajectory": 8, "shuffle_buffer": 16},
}


@pytest.mark.parametrize("recipe", ["nestor-tiny", "afno-ti-readme"])
def test_training_with_device_windows_follows_the_host_path(recipe: str, request, tmp_path: Path) -> None:
    """`data.device_windows: true` through the real entry (trainer, DeviceFeed, resume position): the same loss at
    every step as the host-cut default. "afno-ti-readme" runs the configuration the README recommends for afno-ti
    (float16 shards sent as stored, 8 windows per trajectory) on a tiny AFNO."""
    from train_fixtures import ds_config, launch, tiny_config

    if recipe == "afno-ti-readme":
        shards, sections = request.getfixturevalue("tiny16"), AFNO_TI_RECIPE
        assert all(json.loads((d / "manifest.json").read_text())["dtype"] == "float16" for d in shards.values())
    else:
        shards, sections = request.getfixturevalue("tiny_shards")[1], {}
    losses = {}
    for on in (False, True):
        data = {**sections.get("data", {}), "device_windows": on}
        cfg = tiny_config(tmp_path, shards, **{**sections, "data": data}, tracking={"enabled": False})
        name = f"dw{int(on)}"
        args = ["nestor_ds.train", "--ds_config", str(ds_config(tmp_path)), "--config", str(cfg), "--run-name", name]
        proc = launch(args, ranks=1, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("windows cut on cpu from trajectories sent there once" in proc.stderr) == on
        rows = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        losses[on] = [json.loads(r)["train/loss"] for r in rows]
    assert len(losses[True]) == 6 and losses[True] == losses[False]
    assert all(np.isfinite(losses[True]))


def test_resume_with_settings_that_keep_the_batches_keeps_the_trajectory(tiny_shards, tmp_path: Path) -> None:
    """A run stopped at step 2 and resumed with device windowing, a shard cache and no sha256 pass turned on (the
    batches are the same by design): no "configuration differs" warning, and every loss equals the uninterrupted
    run's. The digest still changes with what does change the batches (the logical worker count, windows)."""
    from nestor_ds.engine.run_config import RunConfig

    from train_fixtures import ds_config, launch, tiny_config

    _, shards = tiny_shards
    train = {"max_steps": 4, "ckpt_every": 2}
    cfg = tiny_config(tmp_path, shards, model=AFNO_TI_RECIPE["model"], train=train, tracking={"enabled": False})

    def run(name: str, *extra: str) -> str:
        args = ["nestor_ds.train", "--ds_config", str(ds_config(tmp_path)), "--config", str(cfg), "--run-name", name]
        proc = launch([*args, *extra], ranks=1, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    run("full")
    assert "stopped cleanly at step 2" in run("cut", "--set", "train.stop_at=2")
    changed = ("data.device_windows=true", f"data.shard_cache={tmp_path / 'cache'}", "data.verify_shards=false")
    resumed = run("cut", "--resume", "auto", *(a for c in changed for a in ("--set", c)))
    assert "resumed from" in resumed and "windows cut on cpu" in resumed
    assert "differs from the checkpoint" not in resumed, resumed[-3000:]
    losses = {
        name: [
            json.loads(r)["train/loss"] for r in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        ]
        for name in ("full", "cut")
    }
    assert len(losses["cut"]) == 4 and losses["cut"] == losses["full"]

    base = RunConfig()
    digest = base.digest()
    for key, value in (("num_workers", 1), ("device_windows", True), ("shard_cache", "/c"), ("verify_shards", False)):
        same = RunConfig()
        setattr(same.data, key, value)
        assert same.digest() == digest, key  # on this CPU machine 0 and 1 workers are one logical worker
    for key, value in (("num_workers", 2), ("windows_per_trajectory", 8)):
        other = RunConfig()
        setattr(other.data, key, value)
        assert other.digest() != digest, key
    # checkpoints written before these settings left the digest stored the whole data section (without the keys added
    # since): the legacy form, which the resume also accepts, still tells device_windows apart and ignores the new keys
    legacy = RunConfig()
    legacy.data.shard_cache, legacy.data.verify_shards = "/c", False
    assert legacy.digest(legacy=True) == base.digest(legacy=True) != legacy.digest()
    legacy.data.device_windows = True
    assert legacy.digest(legacy=True) != base.digest(legacy=True)
