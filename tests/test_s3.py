"""Shards in S3 against a real S3 server (SeaweedFS on 127.0.0.1, tests/s3_server.py): build to S3 with the
manifest last and --verify; the training stream, its resume, its rank/worker split and the evaluation batches over
s3:// equal those of the same shards on local disk; a dropped connection in mid-shard (the server restarted during a
training run) changes nothing; bad endpoint, missing object and denied access are each one line naming the URL.
"""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from nestor_ds.data import DataConfig, TrainStream, build_eval_batches
from nestor_ds.procs import free_port
from nestor_ds.shards import s3
from nestor_ds.shards.build import META_BYTES_ESTIMATE, BuildConfig, build
from nestor_ds.shards.cache import stage
from nestor_ds.shards.cli import main as shards_main
from nestor_ds.shards.schema import DataFormatError
from nestor_ds.synth.layouts import write_dataset

from s3_server import BUCKET, CuttingProxy, SeaweedS3, aws_env, raw_client, s3_env_fixture, s3_server_fixture  # noqa: F401
from shard_fixtures import assert_batches_equal, frame_table, take, window_positions
from train_fixtures import build_tiny_shards, ds_config, launch, tiny_config

pytestmark = pytest.mark.timeout(900)
T_IN, T_AR, RES = 3, 2, 16


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two attempts 50 ms apart: the error tests need the retry policy's outcome, not its 15 s of waiting."""
    monkeypatch.setattr(s3, "ATTEMPTS", 2)
    monkeypatch.setattr(s3, "FIRST_DELAY_S", 0.05)


@pytest.fixture(scope="module")
def raw_ns(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 simulated Navier-Stokes trajectories (T=14) in the FNO layout."""
    root = tmp_path_factory.mktemp("s3_raw")
    return write_dataset("ns", "fno-mat", root / "ns.mat", n=6, res=RES, steps=14, seed=0)


def build_args(raw: Path, out: str, *extra: str) -> list[str]:
    """One trajectory per shard: 4 train and 2 test shards, so ranks and workers get shards of their own."""
    size = (14 * RES * RES * 4 + META_BYTES_ESTIMATE + 0.5) / 2**20
    return [
        "--input",
        str(raw),
        "--out",
        out,
        "--name",
        "ns",
        "--test-fraction",
        "0.34",
        "--shard-size-mb",
        str(size),
        "--no-progress",
        *extra,
    ]


def objects(prefix: str) -> dict[str, bytes]:
    """name -> bytes of every object under s3://BUCKET/prefix/ (read with a client of the test's own)."""
    c = raw_client(s3.client().meta.endpoint_url)
    listed = c.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"].rsplit("/", 1)[1]: c.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}


def one_line(capsys: pytest.CaptureFixture, rc: int) -> str:
    """The CLI's error output, which must be exactly one line, with exit status 1."""
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_build_to_s3_verify_interrupted_upload_and_rerun(s3_env, raw_ns, tmp_path, capsys, monkeypatch):
    """The uploaded objects are the local build's bytes; --verify passes; an upload interrupted after two shards
    leaves no manifest, and the rerun sends only what is missing; a changed shard fails --verify (one line), and
    --overwrite puts it right."""
    url = f"s3://{BUCKET}/build/ns"
    assert shards_main(build_args(raw_ns, str(tmp_path / "local"))) == 0
    assert shards_main(build_args(raw_ns, url)) == 0
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    assert objects("build/ns") == local and len(local) == 7  # 4 train + 2 test shards + manifest
    capsys.readouterr()
    assert shards_main(["--verify", url, "--no-progress"]) == 0
    assert f"ok: {url}" in capsys.readouterr().out
    err = one_line(capsys, shards_main(build_args(raw_ns, url)))
    assert url in err and "pass --overwrite" in err

    # interrupted: the third upload dies (the manifest would be the seventh)
    url2 = f"s3://{BUCKET}/build/ns-interrupted"
    real_upload, calls = s3.upload, []

    def dying_upload(path, target, metadata=None):
        calls.append(target)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_upload(path, target, metadata)

    monkeypatch.setattr(s3, "upload", dying_upload)
    with pytest.raises(KeyboardInterrupt):
        build(BuildConfig(inputs=[str(raw_ns)], **_cfg(url2)))
    monkeypatch.setattr(s3, "upload", real_upload)
    assert sorted(objects("build/ns-interrupted")) == ["train-000000.tar", "train-000001.tar"]  # and no manifest
    with pytest.raises(ValueError, match="ns-interrupted/manifest.json: cannot read manifest .cannot read: no such"):
        DataConfig.from_dict(
            {
                "datasets": [{"name": "ns", "path": url2 + "/train-{000000..000003}.tar"}],
                "t_in": T_IN,
                "t_ar": T_AR,
                "resolution": RES,
                "channels": 2,
            }
        ).validate()
    capsys.readouterr()
    assert shards_main(build_args(raw_ns, url2)) == 0  # finishes without --overwrite: there was no manifest
    assert objects("build/ns-interrupted") == local

    # a changed shard: --verify names it; --overwrite replaces it (and only it is sent again)
    raw_client(s3.client().meta.endpoint_url).put_object(
        Bucket=BUCKET, Key="build/ns/train-000001.tar", Body=_flip(local["train-000001.tar"], 3000)
    )
    capsys.readouterr()
    err = one_line(capsys, shards_main(["--verify", url, "--no-progress"]))
    assert err.startswith(f"build_shards: error: {url}/train-000001.tar: sha256"), err
    assert shards_main(build_args(raw_ns, url, "--overwrite")) == 0
    assert objects("build/ns") == local
    assert shards_main(["--verify", url, "--no-progress"]) == 0


def _flip(data: bytes, at: int) -> bytes:
    """`data` with one byte changed (inside the first trajectory's fields.npy)."""
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def _cfg(out: str) -> dict:
    size = (14 * RES * RES * 4 + META_BYTES_ESTIMATE + 0.5) / 2**20
    return {"out": out, "name": "ns", "test_fraction": 0.34, "shard_size_mb": size, "progress": False}


@pytest.fixture(scope="module")
def ns_both(s3_server, raw_ns, tmp_path_factory) -> tuple[Path, str]:
    """The same shards in a local directory and under s3://BUCKET/stream/ns."""
    local = tmp_path_factory.mktemp("s3_stream") / "ns"
    build(BuildConfig(inputs=[str(raw_ns)], **_cfg(str(local))))
    c = raw_client(s3_server.endpoint)
    for p in sorted(local.iterdir()):
        c.put_object(Bucket=BUCKET, Key=f"stream/ns/{p.name}", Body=p.read_bytes())
    return local, f"s3://{BUCKET}/stream/ns"


def restart_when_held(proxy: CuttingProxy, server: SeaweedS3, wait_s: float) -> threading.Thread:
    """A thread that, once `proxy` holds a response in mid-body, stops and restarts `server` and then lets the held
    connection close: the reader sees its body end early and must resume from a restarted server."""

    def restart_in_mid_body() -> None:
        if proxy.held.wait(wait_s):
            server.stop()
            server.start()
            proxy.release()

    restarter = threading.Thread(target=restart_in_mid_body, daemon=True)
    restarter.start()
    return restarter


def make_cfg(path, **kw) -> DataConfig:
    d = {
        "datasets": [{"name": "ns", "path": path}],
        "t_in": T_IN,
        "t_ar": T_AR,
        "resolution": RES,
        "channels": 2,
        "steps_per_epoch": 8,
        "shuffle_buffer": 6,
        "windows_per_trajectory": 2,
        "normalize": True,
    }
    d.update(kw)
    return DataConfig.from_dict(d)


def s3_spec(url: str) -> dict[str, str]:
    return {"train": f"{url}/train-{{000000..000003}}.tar", "test": f"{url}/test-{{000000..000001}}.tar"}


def test_stream_ranks_workers_resume_and_eval_over_s3_equal_local(s3_env, ns_both):
    """2 ranks x 2 logical workers, 2 DataLoader worker processes, a resume inside an epoch, and the evaluation
    batches of 2 ranks: over s3:// (manifest found beside the shards) exactly the batches of the local directory."""
    local_dir, url = ns_both
    remote, local = make_cfg(s3_spec(url)), make_cfg(str(local_dir))
    remote.validate()
    for rank in range(2):
        u = TrainStream(remote, 2, rank=rank, world_size=2, seed=5)
        v = TrainStream(local, 2, rank=rank, world_size=2, seed=5)
        for w in range(2):
            assert_batches_equal(
                list(itertools.islice(u.steps(0, w, 2), 4)), list(itertools.islice(v.steps(0, w, 2), 4))
            )
    # DataLoader worker processes (forked after this process made its S3 client: each makes its own)
    workers = take(TrainStream(make_cfg(s3_spec(url), num_workers=2), 2, seed=1), 4)
    assert_batches_equal(workers, take(TrainStream(make_cfg(str(local_dir), num_workers=2), 2, seed=1), 4))
    full = take(TrainStream(local, 3, seed=9), 12)
    assert_batches_equal(take(TrainStream(remote, 3, seed=9), 7, 5), full[5:])  # resumed at step 5 (and epoch 1)
    for rank in range(2):
        kw = {"batch_size": 1, "rank": rank, "world_size": 2}
        got = list(build_eval_batches(remote.datasets[0], remote, 0, **kw))
        assert {int(b["traj_index"][0]) for b in got} == {rank}  # test trajectories 0 and 1, one per rank
        assert_batches_equal(got, list(build_eval_batches(local.datasets[0], local, 0, **kw)))


def test_s3_errors_are_one_line(s3_env, ns_both, fast_retries, capsys, monkeypatch):
    """Bad endpoint (after the retries), missing object, wrong secret: one line naming the s3:// URL from the CLI
    and from the training stream; the secret never appears."""
    _, url = ns_both
    err = one_line(capsys, shards_main(["--verify", f"s3://{BUCKET}/nothing-here", "--no-progress"]))
    assert f"s3://{BUCKET}/nothing-here/manifest.json" in err and "no such object (NoSuchKey)" in err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-42")
    err = one_line(capsys, shards_main(["--verify", url, "--no-progress"]))
    assert f"{url}/manifest.json" in err and "access denied (SignatureDoesNotMatch)" in err
    assert "wrong-secret-42" not in err
    with pytest.raises(ValueError, match="access denied") as denied:
        make_cfg(s3_spec(url)).validate()
    assert len(str(denied.value).splitlines()) == 1
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env["AWS_SECRET_ACCESS_KEY"])
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    err = one_line(capsys, shards_main(["--verify", url, "--no-progress"]))
    assert f"{url}/manifest.json" in err and "after 2 attempts" in err and dead in err
    # the stream: a shard missing behind a good manifest is named when it is read
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env["AWS_ENDPOINT_URL"])
    spec = {"train": f"s3://{BUCKET}/stream/ns/train-{{000000..000003}}.tar"}
    cfg = make_cfg(spec, datasets=[{"name": "ns", "path": spec, "manifest": f"{url}/manifest.json"}])
    c = raw_client(s3_env["AWS_ENDPOINT_URL"])
    kept = c.get_object(Bucket=BUCKET, Key="stream/ns/train-000002.tar")["Body"].read()
    c.delete_object(Bucket=BUCKET, Key="stream/ns/train-000002.tar")
    try:
        with pytest.raises(DataFormatError) as missing:
            take(TrainStream(cfg, 2, seed=0), 8)
    finally:
        c.put_object(Bucket=BUCKET, Key="stream/ns/train-000002.tar", Body=kept)
    text = str(missing.value)
    assert text.startswith(f"{url}/train-000002.tar: ") and "NoSuchKey" in text and len(text.splitlines()) == 1


def test_a_connection_that_stays_down_ends_with_one_line(s3_env, s3_server, ns_both, fast_retries, monkeypatch):
    """Cut in mid-shard and no server behind the proxy any more: after the retries one DataFormatError line naming
    the shard's URL (no tarfile.ReadError)."""
    _, url = ns_both
    proxy = CuttingProxy(s3_server.ports["s3.port"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    proxy.arm(8000)

    def go_down() -> None:
        if proxy.held.wait(60):
            proxy.upstream = free_port()  # every new connection is refused from now on
            proxy.release()

    threading.Thread(target=go_down, daemon=True).start()
    with pytest.raises(DataFormatError) as exc:
        take(TrainStream(make_cfg(s3_spec(url)), 2, seed=0), 8)
    proxy.close()
    text = str(exc.value)
    assert proxy.held.is_set() and len(text.splitlines()) == 1, text
    assert text.startswith(f"{url}/train-0000") and "cannot read at byte " in text and "after 2 attempts" in text
    print(text)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def _final_eval(run_dir: Path) -> dict:
    """The end-of-run evaluation on the test split (run_summary.json): per-dataset metrics, their mean, settings."""
    return json.loads((run_dir / "run_summary.json").read_text())["final_eval"]


def test_training_from_s3_survives_a_server_restart_and_resumes_like_local(s3_server, tmp_path):
    """A 1-rank run on local shards; the same run on s3:// stopped at step 3, then resumed with `--resume auto`
    while the server is stopped and restarted in the middle of a shard's body: every loss and evaluation metric equals
    the local run's."""
    root = tmp_path / "data"
    shards = build_tiny_shards(root)
    c = raw_client(s3_server.endpoint)
    spec = {}
    for name, d in shards.items():
        for p in sorted(d.iterdir()):
            c.put_object(Bucket=BUCKET, Key=f"train/{name}/{p.name}", Body=p.read_bytes())
        spec[name] = {
            "train": f"s3://{BUCKET}/train/{name}/train-000000.tar",
            "test": f"s3://{BUCKET}/train/{name}/test-000000.tar",
        }
    train = {"max_steps": 6, "ckpt_every": 3}
    local_cfg = tiny_config(tmp_path, shards, train=train, tracking={"enabled": False})
    s3_cfg = tiny_config(
        tmp_path,
        shards,
        train=train,
        tracking={"enabled": False},
        data={"datasets": [{"name": n, "path": spec[n], "weight": 1.0, "rollout_steps": 3} for n in shards]},
    )
    ds = ds_config(tmp_path)
    proxy = CuttingProxy(s3_server.ports["s3.port"])
    env = aws_env(proxy.endpoint, tmp_path)

    def run(cfg: Path, name: str, *extra: str):
        proc = launch(
            ["nestor_ds.train", "--ds_config", str(ds), "--config", str(cfg), "--run-name", name, *extra],
            ranks=1,
            cwd=tmp_path,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    run(local_cfg, "local")
    first = run(s3_cfg, "s3", "--set", "train.stop_at=3")
    assert "stopped cleanly at step 3" in first.stderr

    proxy.arm(40_000)  # more than a manifest, less than a training shard

    restarter = restart_when_held(proxy, s3_server, 600)
    second = run(s3_cfg, "s3", "--resume", "auto")
    restarter.join(60)
    proxy.close()
    assert proxy.held.is_set() and "resumed from" in second.stderr
    assert "s3: s3://" in second.stderr and "attempt 2 of" in second.stderr, second.stderr[-3000:]
    local, remote = tmp_path / "runs" / "local", tmp_path / "runs" / "s3"
    assert [step for step, _ in _losses(remote)] == list(range(1, 7))
    assert _losses(remote) == _losses(local)
    assert _final_eval(remote) == _final_eval(local) and _final_eval(local)["datasets"]


def test_shard_cache_downloads_each_shard_once_through_a_restart_and_reads_it_like_local(
    s3_env, s3_server, ns_both, tmp_path, monkeypatch, caplog
):
    """data.shard_cache: each s3:// shard is downloaded whole once (the server stopped and restarted in the middle
    of the first download: the resuming reader finishes it), the cached files are the local build's bytes, the
    batches equal the local directory's (with a resume), a second stream downloads nothing, and a shard whose
    bytes differ from the manifest's sha256 is refused with one line and leaves nothing in the cache."""
    local_dir, url = ns_both
    cache = tmp_path / "cache"
    full = take(TrainStream(make_cfg(str(local_dir)), 3, seed=9), 12)
    proxy = CuttingProxy(s3_server.ports["s3.port"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    cached = make_cfg(s3_spec(url), shard_cache=str(cache))
    stream = TrainStream(cached, 3, seed=9)  # reads the manifest: the cut below falls in a shard's download
    proxy.arm(8000)

    restarter = restart_when_held(proxy, s3_server, 120)
    with caplog.at_level(logging.WARNING, logger="nestor_ds.shards.s3"):
        assert_batches_equal(list(itertools.islice(stream.batches(), 12)), full)
    restarter.join(60)
    assert proxy.held.is_set() and "attempt 2 of" in caplog.text
    files = {p.name.split("-", 1)[1]: p for p in cache.glob("*.tar")}
    assert sorted(files) == [f"train-00000{i}.tar" for i in range(4)]
    assert all(p.read_bytes() == (local_dir / name).read_bytes() for name, p in files.items())
    before = {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in files.items()}
    assert_batches_equal(take(TrainStream(cached, 3, seed=9), 7, 5), full[5:])  # resumed at step 5
    assert {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in files.items()} == before
    proxy.close()

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env["AWS_ENDPOINT_URL"])
    c = raw_client(s3_env["AWS_ENDPOINT_URL"])
    for p in sorted(local_dir.iterdir()):
        body = p.read_bytes()
        c.put_object(
            Bucket=BUCKET, Key=f"stream/ns-flipped/{p.name}", Body=_flip(body, 3000) if "train" in p.name else body
        )
    bad_cache = tmp_path / "bad-cache"
    with pytest.raises(DataFormatError) as changed:
        take(TrainStream(make_cfg(s3_spec(f"s3://{BUCKET}/stream/ns-flipped"), shard_cache=str(bad_cache)), 3), 2)
    text = str(changed.value)
    assert text.startswith(f"s3://{BUCKET}/stream/ns-flipped/train-0000") and "sha256" in text, text
    assert len(text.splitlines()) == 1 and not list(bad_cache.glob("*.tar")) and not list(bad_cache.glob(".*.part"))


def _staged(cache: Path) -> list[str]:
    """The shard file names staged in `cache`, sorted (cache files are `<32 hex>-<shard name>`)."""
    return sorted(p.name.split("-", 1)[1] for p in cache.glob("*.tar"))


def test_shard_cache_bound_evicts_unused_shards_and_batches_stay_those_of_local(s3_env, ns_both, tmp_path, caplog):
    """data.shard_cache_max_gb below one shard, one window per batch, per trajectory and in the shuffle buffer: after
    each download every shard but those in use is evicted (at most three: the buffer's window, the one just read and
    the one handed out last, until the next is drawn), so over three epochs (and a resume) the four shards are
    downloaded again and again, and the batches still equal the local directory's; the shards in use stay, over the
    bound, said in one warning."""
    local_dir, url = ns_both
    bound = min(p.stat().st_size for p in local_dir.glob("train-*.tar")) / 2 / 1e9
    cache = tmp_path / "cache"
    kw = {"shuffle_buffer": 1, "windows_per_trajectory": 1, "normalize": False}
    full = take(TrainStream(make_cfg(str(local_dir), **kw), 1, seed=9), 24)
    table = frame_table(local_dir)
    read = {p for b in full for p in window_positions(b, 0, table, T_IN + T_AR)}
    assert read == {0, 1, 2, 3}  # every shard (one trajectory each) is read
    cached = make_cfg(s3_spec(url), shard_cache=str(cache), shard_cache_max_gb=bound, **kw)
    with caplog.at_level(logging.WARNING, logger="nestor_ds.shards.cache"):
        batches = TrainStream(cached, 1, seed=9).batches()
        for step in range(24):
            assert_batches_equal([next(batches)], full[step : step + 1])
            assert len(_staged(cache)) <= 3, step
        batches.close()
        assert_batches_equal(take(TrainStream(cached, 1, seed=9), 7, 13), full[13:20])  # resumed at step 13
    said = [r.getMessage() for r in caplog.records if "data.shard_cache_max_gb" in r.getMessage()]
    assert len(said) == 1 and f"shard cache {cache}: the shards in use take" in said[0]


def test_shard_cache_never_evicts_a_shard_another_process_or_this_one_uses(s3_env, ns_both, tmp_path):
    """A bound of one and a half shards, shards A..D: A staged and held by another process, B held here; staging C
    evicts B once released, never A; once A's process has exited, staging D evicts A and C."""
    local_dir, url = ns_both
    size = max(p.stat().st_size for p in local_dir.glob("train-*.tar"))
    cache, bound = tmp_path / "cache", int(1.5 * size)
    shas = {
        s["file"]: s["sha256"]
        for s in json.loads((local_dir / "manifest.json").read_text())["splits"]["train"]["shards"]
    }
    a, b, c, d = (f"train-00000{i}.tar" for i in range(4))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SHARD, f"{url}/{a}", str(cache), shas[a], str(bound)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        held_b = stage(f"{url}/{b}", cache, shas[b], bound)
        assert held_b.downloaded and _staged(cache) == [a, b]  # both in use: nothing evicted, over the bound
        held_b.lease.close()
        held_c = stage(f"{url}/{c}", cache, shas[c], bound)
        assert _staged(cache) == [a, c]  # B evicted; A is another process's
        held_c.lease.close()
    finally:
        holder.communicate("", timeout=60)  # stdin closed: the holder exits
    assert holder.returncode == 0
    stage(f"{url}/{d}", cache, shas[d], bound)
    assert _staged(cache) == [d]


# A process of the node using shard argv[1]: staged into cache argv[2] (sha256 argv[3], bound argv[4] bytes), its lease
# held until stdin closes.
HOLD_SHARD = """
import sys
from nestor_ds.shards.cache import stage
staged = stage(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
print("held", flush=True)
sys.stdin.read()
"""


def test_a_resume_downloads_only_the_shards_it_reads(s3_env, ns_both, tmp_path):
    """Resumed at step 10 (one window per batch and per trajectory, a buffer of 2): the fast-forward passes 12
    trajectories, three rounds over the 4 shards, but the resumed batch reads at most 2 (the window it uses and the
    one it draws into the buffer); only those are downloaded, and the batches equal the local directory's, on the
    host path and cut on the device."""
    local_dir, url = ns_both
    kw = {"steps_per_epoch": 100, "shuffle_buffer": 2, "windows_per_trajectory": 1}
    full = take(TrainStream(make_cfg(str(local_dir), **kw), 1, seed=3), 13)
    cache = tmp_path / "cache"
    stream = TrainStream(make_cfg(s3_spec(url), shard_cache=str(cache), **kw), 1, seed=3)
    resumed = stream.batches(10)
    assert_batches_equal([next(resumed)], full[10:11])
    assert 1 <= len(_staged(cache)) <= 2
    assert_batches_equal([next(resumed), next(resumed)], full[11:13])
    # device windowing: the trajectories passed over are sent, when used, from their shard staged then
    cache2 = tmp_path / "cache2"
    stream = TrainStream(make_cfg(s3_spec(url), shard_cache=str(cache2), device_windows=True, **kw), 1, seed=3)
    packed, cutter = stream.packed_batches(10), stream.cutter("cpu")
    assert_batches_equal([cutter(next(packed))], full[10:11])
    assert 1 <= len(_staged(cache2)) <= 2


def test_evaluation_over_s3_reads_the_staged_test_shards(s3_env, ns_both, tmp_path):
    """With data.shard_cache the evaluation pass stages the test shards (downloaded once, then read mapped) and its
    batches equal the local directory's; a second pass downloads nothing."""
    local_dir, url = ns_both
    cache = tmp_path / "cache"
    remote, local = make_cfg(s3_spec(url), shard_cache=str(cache)), make_cfg(str(local_dir))
    expect = list(build_eval_batches(local.datasets[0], local, 0, batch_size=4))
    assert_batches_equal(list(build_eval_batches(remote.datasets[0], remote, 0, batch_size=4)), expect)
    files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("*.tar")}
    assert sorted(n.split("-", 1)[1] for n in files) == ["test-000000.tar", "test-000001.tar"]
    assert all((cache / n).read_bytes() == (local_dir / n.split("-", 1)[1]).read_bytes() for n in files)
    assert_batches_equal(list(build_eval_batches(remote.datasets[0], remote, 0, batch_size=4)), expect)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("*.tar")} == files


def test_free_port_lies_below_the_ephemeral_range_and_binds():
    """The servers the tests start (SeaweedFS opens 12 ports) take ports from `free_port`: outside the kernel's range
    for outgoing connections, which a connection made before the server binds could otherwise take (SeaweedFS's
    volume server failed with "address already in use" that way on a loaded machine)."""
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(24)}
    assert len(ports) > 1 and all(10000 <= p < low for p in ports), sorted(ports)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_shard_cache_names_never_come_from_a_manifest_path():
    """A staged shard's file name is built from the manifest's sha256: a value that is not 64 hex digits (a crafted
    manifest in a bucket: "../../x") is refused in one line naming the URL, never joined into a path."""
    from nestor_ds.shards.cache import cache_name

    url = "s3://b/p/train-000001.tar"
    assert cache_name(url, "ab" * 32) == f"{'ab' * 16}-train-000001.tar"
    assert cache_name(url, None).endswith("-train-000001.tar") and "/" not in cache_name(url, None)
    with pytest.raises(DataFormatError, match="not 64 hex digits") as err:
        cache_name(url, "../../" + "a" * 58)
    assert url in str(err.value)
