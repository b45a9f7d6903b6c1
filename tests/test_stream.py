"""Training stream and evaluation pass on tiny shards built by the real builder."""

from __future__ import annotations

import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nestor_ds.data import DataConfig, DatasetSpec, TrainStream, build_eval_batches, load_manifest, read_trajectories
from nestor_ds.data.stream import slot_shares
from nestor_ds.shards.tar import iter_shard_samples, read_fields

from shard_fixtures import (
    RES,
    T_AR,
    T_IN,
    assert_batches_equal,
    build_dataset,
    frame_table,
    stream_datasets,
    take,
    window_positions,
)
from shard_fixtures import stream_config as make_cfg


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    return stream_datasets(tmp_path_factory.mktemp("shards"))


def frame_index(shard_dir: Path) -> tuple[dict[bytes, tuple[int, int]], list[int]]:
    """Map each stored frame's bytes to (trajectory position in the train split, t); and position -> shard."""
    shard_of = []
    for s, shard in enumerate(load_manifest(shard_dir)["splits"]["train"]["shards"]):
        shard_of += [s] * shard["count"]
    return frame_table(shard_dir), shard_of


def windows_of(batch: dict, d: int, c: int, table: dict) -> list[int]:
    return window_positions(batch, d, table, T_IN + T_AR, channels=c)


def test_shapes_dtypes_mask_and_padding(dirs):
    batch = take(TrainStream(make_cfg(dirs), micro_batch=8), 1)[0]
    assert batch["x"].shape == (8, RES, RES, T_IN, 4) and batch["x"].dtype == torch.float32
    assert batch["y"].shape == (8, RES, RES, T_AR, 4) and batch["y"].dtype == torch.float32
    assert batch["channel_mask"].dtype == torch.bool and batch["dataset_id"].dtype == torch.long
    real = torch.tensor([4, 2])[batch["dataset_id"]]
    assert torch.equal(batch["channel_mask"].sum(1), real)
    for key in ("x", "y"):
        padded = batch[key].masked_select(~batch["channel_mask"][:, None, None, None, :])
        assert padded.numel() > 0 and (padded == 0).all()


def test_windows_are_consecutive_stored_frames(dirs):
    table, _ = frame_index(dirs["cfd"])
    n = sum(len(windows_of(b, 0, 4, table)) for b in take(TrainStream(make_cfg(dirs), 4), 10))
    assert n > 0


def test_mixture_follows_weights(dirs):
    stream = TrainStream(make_cfg(dirs, weights=(1.0, 3.0), steps_per_epoch=50), micro_batch=16)
    ids = torch.cat([b["dataset_id"] for b in take(stream, 150)])
    counts = torch.bincount(ids, minlength=2).double()
    expected = ids.numel() * torch.tensor([0.25, 0.75], dtype=torch.float64)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 15.0, (counts, expected)  # 1 dof: p ~ 1e-4


@pytest.mark.parametrize("n, slots", [(8, 4), (7, 4), (3, 4), (1, 3), (5, 5)])
def test_slot_shares_disjoint_and_complete(n, slots):
    counts = [5] * n
    perm = np.random.default_rng(0).permutation(n)
    seen = [
        (i, p)
        for k in range(slots)
        for i, mod, res in slot_shares(counts, perm, k, slots)
        for p in range(res, counts[i], mod)
    ]
    assert len(seen) == len(set(seen)) == sum(counts)
    if n >= slots:  # whole shards: each read by exactly one slot
        owners = [i for k in range(slots) for i, _, _ in slot_shares(counts, perm, k, slots)]
        assert sorted(owners) == list(range(n))


def test_rank_worker_split_over_an_epoch(dirs):
    """2 ranks x 2 workers on 8 shards: within an epoch each shard is read by exactly one (rank, worker)."""
    table, shard_of = frame_index(dirs["cfd"])
    cfg = make_cfg(dirs, steps_per_epoch=40)
    cfg.datasets = cfg.datasets[:1]
    shards: dict[tuple[int, int], set[int]] = {}
    for rank in range(2):
        stream = TrainStream(cfg, micro_batch=4, rank=rank, world_size=2, seed=5)
        for w in range(2):
            for batch in itertools.islice(stream.steps(0, w, 2), 20):  # all of epoch 0 for worker w
                shards.setdefault((rank, w), set()).update(shard_of[p] for p in windows_of(batch, 0, 4, table))
    owned = [s for v in shards.values() for s in v]
    assert len(owned) == len(set(owned)), shards
    assert set(owned) == set(range(8))


def test_short_epochs_reach_every_trajectory_of_a_big_shard(tmp_path, monkeypatch):
    """One shard of 24 training trajectories and epochs of 2 steps (far shorter than a pass): every epoch builds its
    sources afresh, and each must start its shard at a seeded position, or the later trajectories are never read
    (before the fix: only the first few of the shard ever were)."""
    big = build_dataset(tmp_path, "big", n=30, t=8, res=RES, c=4, per_shard=30, test_fraction=0.2, seed=3)
    cfg = DataConfig.from_dict(
        {
            "datasets": [{"name": "big", "path": str(big), "weight": 1.0}],
            "t_in": T_IN,
            "t_ar": T_AR,
            "resolution": RES,
            "channels": 4,
            "steps_per_epoch": 2,
            "shuffle_buffer": 4,
            "windows_per_trajectory": 2,
        }
    )
    seen: list[str] = []
    assemble = TrainStream.assemble

    def recording(self, windows):
        seen.extend(traj.key for _, traj, _ in windows)
        return assemble(self, windows)

    monkeypatch.setattr(TrainStream, "assemble", recording)
    stream = TrainStream(cfg, micro_batch=2, rank=0, world_size=1, seed=0)
    assert sum(n for _, n in stream.infos[0].train) == 24
    take(stream, 200)
    counts = {key: seen.count(key) for key in set(seen)}
    assert len(counts) == 24, sorted(counts)
    assert max(counts.values()) < 3 * len(seen) / 24, counts  # no few favourites: all within 3x of the mean


def test_deterministic_and_seed_dependent(dirs):
    cfg = make_cfg(dirs)
    a = take(TrainStream(cfg, 4, seed=3), 8)
    assert_batches_equal(a, take(TrainStream(cfg, 4, seed=3), 8))
    b = take(TrainStream(cfg, 4, seed=4), 8)
    assert not all(torch.equal(p["x"], q["x"]) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("start", [1, 5, 6, 7, 13])
def test_resume_equals_tail(dirs, start):
    cfg = make_cfg(dirs)  # 6 steps per epoch: starts inside, at and after epoch boundaries
    full = take(TrainStream(cfg, 4, seed=9), 16)
    assert_batches_equal(take(TrainStream(cfg, 4, seed=9), 16 - start, start), full[start:])


def test_workers_match_round_robin_and_resume(dirs):
    cfg = make_cfg(dirs, num_workers=2, steps_per_epoch=5)
    stream = TrainStream(cfg, 4, seed=2)
    full = take(stream, 12)
    # DataLoader round-robin == interleaving the two workers' step sequences in-process.
    w0, w1 = stream.steps(0, 0, 2), stream.steps(0, 1, 2)
    assert_batches_equal(full, [next(w0) if i % 2 == 0 else next(w1) for i in range(12)])
    assert_batches_equal(take(stream, 5, start=7), full[7:])


def test_equal_batch_counts_per_rank_with_unequal_data(dirs):
    """3 shards over 2 ranks (one rank has twice the data): both run 3 full epochs, nothing runs out."""
    cfg = make_cfg(dirs, steps_per_epoch=7)
    cfg.datasets = cfg.datasets[1:]
    counts = [
        sum(1 for _ in itertools.islice(TrainStream(cfg, 4, rank=r, world_size=2).batches(), 21)) for r in range(2)
    ]
    assert counts == [21, 21]


def test_normalisation_uses_manifest_stats(dirs):
    raw = take(TrainStream(make_cfg(dirs), 8, seed=1), 3)
    norm = take(TrainStream(make_cfg(dirs, normalize=True), 8, seed=1), 3)
    stats = [load_manifest(p)["stats"] for p in dirs.values()]
    for r, n in zip(raw, norm, strict=True):
        for b, d in enumerate(r["dataset_id"].tolist()):
            c = len(stats[d]["mean"])
            mean, std = torch.tensor(stats[d]["mean"]), torch.tensor(stats[d]["std"])
            for key in ("x", "y"):
                torch.testing.assert_close(n[key][b, ..., :c], (r[key][b, ..., :c] - mean) / std)
                assert (n[key][b, ..., c:] == 0).all()


def test_eval_pass_complete_disjoint_and_resized(dirs):
    cfg = make_cfg(dirs)
    spec = cfg.datasets[1]  # 8x8 -> 16, 2 -> 4 channels
    stored = [f for f, _ in read_trajectories(spec.path, "test")]
    batches = list(build_eval_batches(spec, cfg, dataset_id=1, batch_size=3, windows="first"))
    assert [b["traj_index"].tolist() for b in batches] == [[0, 1]]
    b = batches[0]
    assert b["x"].shape == (2, RES, RES, T_IN, 4) and b["y"].shape == (2, RES, RES, 12 - T_IN, 4)
    assert (b["dataset_id"] == 1).all() and b["channel_mask"].sum(1).tolist() == [2, 2]
    for i, fields in enumerate(stored):
        want = F.interpolate(
            torch.from_numpy(fields).permute(0, 3, 1, 2),
            size=(RES, RES),
            mode="bilinear",
            align_corners=False,
            antialias=False,
        ).permute(2, 3, 0, 1)  # [X, Y, T, c]
        torch.testing.assert_close(b["x"][i, ..., :2], want[:, :, :T_IN])
        torch.testing.assert_close(b["y"][i, ..., :2], want[:, :, T_IN:])
        assert (b["x"][i, ..., 2:] == 0).all()
    # ranks: disjoint, complete, and deterministic
    spec = cfg.datasets[0]
    per_rank = [
        [
            i
            for bt in build_eval_batches(spec, cfg, 0, 1, rank=r, world_size=3, windows="first")
            for i in bt["traj_index"].tolist()
        ]
        for r in range(3)
    ]
    assert sorted(sum(per_rank, [])) == list(range(4)) and len(set(sum(per_rank, []))) == 4
    one = list(build_eval_batches(spec, cfg, 0, 2, windows="first"))
    assert_batches_equal(one, list(build_eval_batches(spec, cfg, 0, 2, windows="first")))
    stored = [f for f, _ in read_trajectories(spec.path, "test")]
    assert torch.equal(one[1]["x"][0], torch.from_numpy(stored[2][:T_IN]).permute(1, 2, 0, 3))
    assert len(list(build_eval_batches(spec, cfg, 0, 2, max_trajectories=3, windows="first"))) == 2


def test_eval_normalisation(dirs):
    cfg = make_cfg(dirs, normalize=True)
    spec = cfg.datasets[0]
    stats = load_manifest(spec.path)["stats"]
    fields = next(read_trajectories(spec.path, "test"))[0]
    b = next(build_eval_batches(spec, cfg, 0, 1))
    want = (torch.from_numpy(fields) - torch.tensor(stats["mean"])) / torch.tensor(stats["std"])
    torch.testing.assert_close(b["y"][0], want[T_IN:].permute(1, 2, 0, 3))


def test_reader_handles_pax_and_gnu_tars(tmp_path):
    """Long keys make tarfile emit pax / GNU long-name headers; both must give the same members."""
    data = np.arange(2 * 3 * 3 * 1, dtype=np.float32).reshape(2, 3, 3, 1)
    npy = tmp_path / "a.npy"
    np.save(npy, data, allow_pickle=False)
    key = "k" * 120
    import os

    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"s{fmt}.tar"
        name = key if fmt != tarfile.USTAR_FORMAT else "short"
        with tarfile.open(path, "w", format=fmt) as tar:
            tar.add(npy, arcname=f"{name}.fields.npy")
            tar.add(npy, arcname=f"{name}2.fields.npy")
        fd = os.open(path, os.O_RDONLY)
        try:
            samples = list(iter_shard_samples(fd, str(path)))
            assert [k for k, _ in samples] == [name, name + "2"]
            np.testing.assert_array_equal(read_fields(fd, *samples[1][1]["fields.npy"], "t"), data)
        finally:
            os.close(fd)


def test_validate_messages(dirs, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        DataConfig(datasets=[DatasetSpec("a", str(tmp_path / "nope"))]).validate()
    with pytest.raises(ValueError, match=r"t_in \+ t_ar = 15 > T = 14"):
        make_cfg(dirs, t_in=14, t_ar=1).validate()
    with pytest.raises(ValueError, match="weight must be > 0"):
        make_cfg(dirs, weights=(1.0, 0.0)).validate()
    with pytest.raises(ValueError, match="unknown key"):
        DataConfig.from_dict({"datasets": [], "input_noise": 0.1})
    with pytest.raises(ValueError, match="channels"):
        make_cfg(dirs, channels=2).validate()


def test_a_shard_shorter_than_its_manifest_is_an_error_not_a_hang(tmp_path):
    """A shard replaced after the build (here by an empty tar) must stop the stream with a message naming it
    (caught by the once-per-process sha256 check; the sample count check remains for shards behind URLs)."""
    dirs = {"a": build_dataset(tmp_path, "a", n=4, t=8, res=8, c=1, per_shard=2)}
    tarfile.open(dirs["a"] / "train-000000.tar", "w").close()
    stream = TrainStream(make_cfg(dirs, weights=(1.0,)), micro_batch=2, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match=r"train-000000\.tar: sha256 \w+\.\.\. but the manifest says"):
        take(stream, 3)


def test_verify_shards_false_skips_the_sha256_pass(tmp_path):
    """The trade-off of data.verify_shards: false: no hash pass before a shard's first use, so a changed payload
    byte (here a flipped low mantissa bit: still finite, no NaN check can see it) trains silently."""
    dirs = {"a": build_dataset(tmp_path, "a", n=4, t=8, res=8, c=1, per_shard=2, test_fraction=0.0)}
    shard = dirs["a"] / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    with open(shard, "rb") as f:
        _, members = next(iter_shard_samples(f.fileno(), str(shard)))
    offset, size = members["fields.npy"]
    data[offset + size - 4] ^= 1  # the last value of the first trajectory, least significant byte
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train-000000\.tar: sha256 \w+\.\.\. but the manifest says"):
        take(TrainStream(make_cfg(dirs, weights=(1.0,)), micro_batch=2, seed=0), 3)
    batches = take(TrainStream(make_cfg(dirs, weights=(1.0,), verify_shards=False), micro_batch=2, seed=0), 3)
    assert all(torch.isfinite(b["x"]).all() for b in batches)
