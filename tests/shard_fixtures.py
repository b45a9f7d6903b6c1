"""Tiny shard datasets for data-pipeline tests, built with the real builder from raw HDF5 files.

Raw files follow the public layouts (docs/data_format.md) so the shards go through the same code
path as real data: h5py file -> nestor_ds.shards.build.build -> shard directory + manifest.json.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from nestor_ds.shards.build import META_BYTES_ESTIMATE, BuildConfig, build


def random_fields(n: int, t: int, res: int, c: int, seed: int) -> np.ndarray:
    """[R, T, X, Y, C] float32 with distinct per-channel scales (so normalisation is visible)."""
    rng = np.random.default_rng(seed)
    scale = np.arange(1, c + 1, dtype=np.float32)
    return (rng.standard_normal((n, t, res, res, c)).astype(np.float32) * scale + 3.0 * scale).astype(np.float32)


def write_pdebench_cfd(path: Path, fields_RTXYC: np.ndarray) -> None:
    """PDEBench 2D CFD layout: Vx, Vy, density, pressure each [R, T, X, Y]; t-coordinate has T + 1 entries."""
    n, t, x, y, c = fields_RTXYC.shape
    assert c == 4
    with h5py.File(path, "w") as f:
        for k, name in enumerate(("Vx", "Vy", "density", "pressure")):
            f.create_dataset(name, data=fields_RTXYC[..., k])
        f.create_dataset("x-coordinate", data=np.linspace(0, 1, x, dtype=np.float32))
        f.create_dataset("y-coordinate", data=np.linspace(0, 1, y, dtype=np.float32))
        f.create_dataset("t-coordinate", data=np.linspace(0, 1, t + 1, dtype=np.float32))
        f.attrs.update({"eta": 0.1, "zeta": 0.1, "M": 1.0})


def write_pdebench_groups(path: Path, fields_RTXYC: np.ndarray) -> None:
    """PDEBench groups layout: one group per trajectory with `data` [T, X, Y, C]."""
    with h5py.File(path, "w") as f:
        for i, traj in enumerate(fields_RTXYC):
            g = f.create_group(f"{i:04d}")
            g.create_dataset("data", data=traj)


def build_dataset(
    root: Path,
    name: str,
    n: int,
    t: int,
    res: int,
    c: int,
    per_shard: int,
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a raw file (CFD layout when c == 4, else groups) and build shards of `per_shard` trajectories."""
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    fields = random_fields(n, t, res, c, seed)
    src = raw / f"{name}.h5"
    (write_pdebench_cfd if c == 4 else write_pdebench_groups)(src, fields)
    sample_bytes = t * res * res * c * np.dtype(dtype).itemsize + META_BYTES_ESTIMATE
    out = root / name
    build(
        BuildConfig(
            inputs=[str(src)],
            out=str(out),
            layout="pdebench-cfd" if c == 4 else "pdebench-groups",
            name=name,
            test_fraction=test_fraction,
            dtype=dtype,
            progress=False,
            shard_size_mb=(per_shard * sample_bytes + 0.5) / 2**20,
        )
    )
    return out


def take(stream, n: int, start: int = 0) -> list[dict]:
    """The first ``n`` batches of ``stream.batches(start)``."""
    import itertools

    return list(itertools.islice(stream.batches(start), n))


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    """Two batch lists are identical, key by key, to the bit."""
    import torch

    assert len(a) == len(b)
    for i, (p, q) in enumerate(zip(a, b, strict=True)):
        assert p.keys() == q.keys()
        for k in p:
            assert torch.equal(p[k], q[k]), f"batch {i} key {k} differs"


def frame_table(shard_dir) -> dict:
    """Each stored frame's bytes of the train split -> (trajectory position, t) (`read_trajectories` order)."""
    import numpy as np

    from nestor_ds.data import read_trajectories

    table = {}
    for p, (fields, _) in enumerate(read_trajectories(shard_dir, "train")):
        for t in range(fields.shape[0]):
            table[np.ascontiguousarray(fields[t]).tobytes()] = (p, t)
    return table


def window_positions(batch: dict, d: int, table: dict, length: int, channels: int | None = None) -> list[int]:
    """Trajectory positions of dataset d's batch elements; asserts each window is ``length`` consecutive stored
    frames of one trajectory (real channels only: ``channels``, or the element's channel mask)."""
    import numpy as np
    import torch

    found = []
    for b in torch.nonzero(batch["dataset_id"] == d).flatten().tolist():
        c = channels if channels is not None else int(batch["channel_mask"][b].sum())
        frames = torch.cat([batch["x"][b], batch["y"][b]], dim=2)[..., :c].permute(2, 0, 1, 3).numpy()
        hits = [table[np.ascontiguousarray(f).tobytes()] for f in frames]
        p, t0 = hits[0]
        assert hits == [(p, t0 + k) for k in range(length)]
        found.append(p)
    return found


# the two-dataset mixture of the stream tests (tests/test_stream.py, tests/test_device_windows.py)
T_IN, T_AR, RES = 3, 2, 16


def stream_datasets(root: Path) -> dict[str, Path]:
    """Two datasets built by the real builder: "cfd" with 4 channels at the run resolution (16 train trajectories in 8
    shards, 4 test) and "grp" with 2 channels at 8x8 (resized to 16 and padded to 4; 8 train in 3 shards, 2 test)."""
    return {
        "cfd": build_dataset(root, "cfd", n=20, t=14, res=RES, c=4, per_shard=2, seed=1),
        "grp": build_dataset(root, "grp", n=10, t=12, res=8, c=2, per_shard=3, seed=2),
    }


def stream_config(dirs: dict[str, Path], weights: tuple[float, ...] = (1.0, 3.0), **kw: object):
    """A small DataConfig over `dirs` (name -> shard dir) with the stream tests' sizes; `kw` overrides."""
    from nestor_ds.data import DataConfig

    d = {
        "datasets": [{"name": n, "path": str(p), "weight": w} for (n, p), w in zip(dirs.items(), weights)],
        "t_in": T_IN,
        "t_ar": T_AR,
        "resolution": RES,
        "channels": 4,
        "steps_per_epoch": 6,
        "shuffle_buffer": 8,
        "windows_per_trajectory": 2,
    }
    d.update(kw)
    return DataConfig.from_dict(d)
