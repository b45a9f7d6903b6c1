"""Training stream and evaluation pass over shards behind URLs (pipe: commands and a local HTTP server).

The shards are built by the real builder from a simulated FNO-layout file, one trajectory per shard, and
read through webdataset URL specs; everything is compared against the same shards read as a local directory
and against `read_trajectories` (plain tarfile).
"""

from __future__ import annotations

import functools
import http.server
import itertools
import os
import threading
from pathlib import Path

import pytest
import torch

from nestor_ds.data import DataConfig, TrainStream, build_eval_batches
from nestor_ds.shards.build import META_BYTES_ESTIMATE, BuildConfig, build
from nestor_ds.shards.schema import DataFormatError
from nestor_ds.synth.layouts import write_dataset

from shard_fixtures import assert_batches_equal, frame_table, take, window_positions

T_IN, T_AR, RES = 3, 2, 16


def build_ns(root: Path, name: str, res: int, per_shard: int, seed: int) -> Path:
    """6 simulated Navier-Stokes trajectories (T=14) -> 4 train + 2 test, `per_shard` trajectories a shard."""
    src = write_dataset("ns", "fno-mat", root / f"{name}.mat", n=6, res=res, steps=14, seed=seed)
    sample_bytes = 14 * res * res * 1 * 4 + META_BYTES_ESTIMATE  # the builder's own size estimate
    build(
        BuildConfig(
            inputs=[str(src)],
            out=str(root / name),
            name=name,
            test_fraction=0.34,
            progress=False,
            shard_size_mb=(per_shard * sample_bytes + 0.5) / 2**20,
        )
    )
    return root / name


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("url_shards")
    out = {
        "ns": build_ns(root, "ns", RES, per_shard=1, seed=0),  # 4 train shards, 2 test shards
        "ns8": build_ns(root, "ns8", 8, per_shard=2, seed=1),
    }  # 8x8 (resized), 2 train shards of 2
    assert len(list(out["ns"].glob("train-*.tar"))) == 4 and len(list(out["ns"].glob("test-*.tar"))) == 2
    assert len(list(out["ns8"].glob("train-*.tar"))) == 2
    return out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def http_base(data) -> str:
    """http://127.0.0.1:PORT serving the shard root (a free port, a daemon thread)."""
    handler = functools.partial(_QuietHandler, directory=str(data["ns"].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    old = os.environ.get("no_proxy")
    os.environ["no_proxy"] = "127.0.0.1"  # curl and urllib must not send loopback requests to a proxy
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    if old is None:
        os.environ.pop("no_proxy", None)
    else:
        os.environ["no_proxy"] = old


def pipe_spec(d: Path, split: str = "train", n: int = 4) -> str:
    return f"pipe:cat {d}/{split}-{{000000..{n - 1:06d}}}.tar"


def make_cfg(datasets: list[dict], **kw) -> DataConfig:
    d = {
        "datasets": datasets,
        "t_in": T_IN,
        "t_ar": T_AR,
        "resolution": RES,
        "channels": 2,
        "steps_per_epoch": 5,
        "shuffle_buffer": 6,
        "windows_per_trajectory": 2,
    }
    d.update(kw)
    return DataConfig.from_dict(d)


def trajectory_of_windows(batches: list[dict], d: int, shard_dir: Path) -> list[int]:
    """Train-split positions of the windows of dataset d (stored at the run resolution)."""
    table = frame_table(shard_dir)
    return [p for batch in batches for p in window_positions(batch, d, table, T_IN + T_AR)]


def test_pipe_urls_give_the_local_batches(data):
    d = data["ns"]
    url = make_cfg([{"name": "ns", "path": pipe_spec(d), "manifest": str(d / "manifest.json")}])
    local = make_cfg([{"name": "ns", "path": str(d)}])
    got = take(TrainStream(url, micro_batch=4, seed=3), 8)
    assert_batches_equal(got, take(TrainStream(local, micro_batch=4, seed=3), 8))
    b = got[0]
    assert b["x"].shape == (4, RES, RES, T_IN, 2) and b["y"].shape == (4, RES, RES, T_AR, 2)
    assert b["channel_mask"].tolist() == [[True, False]] * 4 and (b["x"][..., 1] == 0).all()
    # 8 batches x 4 windows = 32 windows of a 4-trajectory split: every trajectory shows up
    assert sorted(set(trajectory_of_windows(got, 0, d))) == [0, 1, 2, 3]


def test_http_urls_with_default_manifest_and_normalisation(data, http_base):
    d = data["ns"]
    spec = f"{http_base}/ns/train-{{000000..000003}}.tar"  # manifest: <dirname>/manifest.json over http
    for normalize in (False, True):
        url = make_cfg([{"name": "ns", "path": spec}], normalize=normalize)
        local = make_cfg([{"name": "ns", "path": str(d)}], normalize=normalize)
        got = take(TrainStream(url, 3, seed=1), 6)
        assert_batches_equal(got, take(TrainStream(local, 3, seed=1), 6))
        if not normalize:
            assert len(trajectory_of_windows(got, 0, d)) == 18


def test_local_brace_pattern(data):
    d = data["ns"]
    url = make_cfg([{"name": "ns", "path": f"{d}/train-{{000000..000003}}.tar"}])
    assert_batches_equal(
        take(TrainStream(url, 2, seed=7), 4),
        take(TrainStream(make_cfg([{"name": "ns", "path": str(d)}]), 2, seed=7), 4),
    )


def test_mixture_of_url_and_local_datasets(data, http_base):
    mixed = make_cfg(
        [
            {"name": "ns", "path": f"{http_base}/ns/train-{{000000..000003}}.tar", "weight": 1.0},
            {"name": "ns8", "path": str(data["ns8"]), "weight": 2.0},
        ]
    )
    local = make_cfg(
        [
            {"name": "ns", "path": str(data["ns"]), "weight": 1.0},
            {"name": "ns8", "path": str(data["ns8"]), "weight": 2.0},
        ]
    )
    got = take(TrainStream(mixed, 6, seed=2), 6)
    assert_batches_equal(got, take(TrainStream(local, 6, seed=2), 6))
    ids = torch.cat([b["dataset_id"] for b in got])
    assert set(ids.tolist()) == {0, 1}
    assert trajectory_of_windows(got, 0, data["ns"])


def test_ranks_and_workers_split_shards_like_the_local_path(data):
    """2 ranks x 2 workers: URL batches equal the local ones, and within an epoch the (rank, worker) slots
    read disjoint trajectories (4 whole shards; 2 shards of 2 shared by sample position)."""
    ns = data["ns"]
    for d, n in ((ns, 4), (data["ns8"], 2)):
        url = make_cfg(
            [{"name": "x", "path": pipe_spec(d, n=n), "manifest": str(d / "manifest.json")}], steps_per_epoch=8
        )
        local = make_cfg([{"name": "x", "path": str(d)}], steps_per_epoch=8)
        owners: dict[int, set[tuple[int, int]]] = {}
        for rank in range(2):
            u = TrainStream(url, 2, rank=rank, world_size=2, seed=5)
            v = TrainStream(local, 2, rank=rank, world_size=2, seed=5)
            for w in range(2):
                got = list(itertools.islice(u.steps(0, w, 2), 4))  # all of epoch 0 for logical worker w
                assert_batches_equal(got, list(itertools.islice(v.steps(0, w, 2), 4)))
                if d == ns:
                    for p in trajectory_of_windows(got, 0, d):
                        owners.setdefault(p, set()).add((rank, w))
        if d == ns:
            assert all(len(slots) == 1 for slots in owners.values()) and len(owners) == 4, owners


@pytest.mark.parametrize("start", [2, 5, 7])
def test_resume_over_urls_equals_tail(data, start):
    d = data["ns"]
    url = make_cfg(
        [
            {"name": "ns", "path": pipe_spec(d), "manifest": str(d / "manifest.json")},
            {"name": "ns8", "path": pipe_spec(data["ns8"], n=2), "manifest": str(data["ns8"] / "manifest.json")},
        ]
    )
    full = take(TrainStream(url, 4, seed=9), 10)
    assert_batches_equal(take(TrainStream(url, 4, seed=9), 10 - start, start), full[start:])


def test_dataloader_workers_over_http(data, http_base):
    spec = f"{http_base}/ns/train-{{000000..000003}}.tar"
    url = make_cfg([{"name": "ns", "path": spec}], num_workers=2)
    local = make_cfg([{"name": "ns", "path": str(data["ns"])}], num_workers=2)
    assert_batches_equal(take(TrainStream(url, 2, seed=4), 6, start=3), take(TrainStream(local, 2, seed=4), 6, start=3))


@pytest.mark.parametrize("via", ["pipe", "http"])
def test_eval_over_urls_equals_local(data, http_base, via):
    d = data["ns"]
    if via == "pipe":
        path = {"train": pipe_spec(d), "test": pipe_spec(d, "test", 2)}
        extra = {"manifest": str(d / "manifest.json")}
    else:
        path = {
            "train": f"{http_base}/ns/train-{{000000..000003}}.tar",
            "test": f"{http_base}/ns/test-{{000000..000001}}.tar",
        }
        extra = {}
    url = make_cfg([{"name": "ns", "path": path, **extra}], normalize=True)
    local = make_cfg([{"name": "ns", "path": str(d)}], normalize=True)
    url.validate()
    for kw in (
        {"batch_size": 3},
        {"batch_size": 1, "rank": 1, "world_size": 2},
        {"batch_size": 2, "max_trajectories": 1},
    ):
        got = list(build_eval_batches(url.datasets[0], url, 0, **kw))
        assert_batches_equal(got, list(build_eval_batches(local.datasets[0], local, 0, **kw)))
    got = list(build_eval_batches(url.datasets[0], url, 0, batch_size=4, windows="first"))
    assert got[0]["traj_index"].tolist() == [0, 1] and got[0]["y"].shape == (2, RES, RES, 14 - T_IN, 2)
    # and the training stream of the mapping form reads its train URLs
    assert_batches_equal(take(TrainStream(url, 2, seed=0), 2), take(TrainStream(local, 2, seed=0), 2))


def test_url_errors(data, http_base):
    d = data["ns"]
    manifest = str(d / "manifest.json")
    with pytest.raises(ValueError, match="do not match the manifest"):  # range misses a shard
        make_cfg([{"name": "ns", "path": pipe_spec(d, n=3), "manifest": manifest}]).validate()
    with pytest.raises(ValueError, match="set `manifest:`"):
        make_cfg([{"name": "ns", "path": pipe_spec(d)}]).validate()
    with pytest.raises(ValueError, match="is not a URL spec"):
        make_cfg([{"name": "ns", "path": {"train": str(d)}}]).validate()
    with pytest.raises(ValueError, match="gives no test URLs"):
        cfg = make_cfg([{"name": "ns", "path": pipe_spec(d), "manifest": manifest}])
        list(build_eval_batches(cfg.datasets[0], cfg, 0, batch_size=1))
    with pytest.raises(ValueError, match="missing/manifest.json: cannot read manifest"):
        make_cfg([{"name": "ns", "path": f"{http_base}/missing/train-{{000000..000003}}.tar"}]).validate()
    # a shard that the server does not have: curl fails, the error names the URL
    bad = make_cfg(
        [
            {
                "name": "ns",
                "path": f"{http_base}/missing/train-{{000000..000003}}.tar",
                "manifest": f"{http_base}/ns/manifest.json",
            }
        ]
    )
    with pytest.raises(DataFormatError, match="missing/train-00000"):
        take(TrainStream(bad, 2), 1)
