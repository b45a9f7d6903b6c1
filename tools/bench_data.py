#!/usr/bin/env python
"""Loader capacity: what one CPU core of the training stream delivers, and what one GPU needs of it.

Why: a GPU step built for nestor-ti at 15% MFU eats about 4,700 windows/s, afno-ti at 20% MFU about 17,000;
if the loader needs more cores or host-to-device bandwidth than a GPU node has per GPU, the loader and not
the GPU sets the speed (issue 27, section 4; results in docs/data_pipeline.md, "Loader capacity").

One run measures, on the same data (--trajectories random trajectories, --frames x --res x --res x 4
channels), with torch threads 1 and num_workers 0 (one core), for fp32 and fp16 shards, read locally and
from an S3 server (SeaweedFS `weed mini` on 127.0.0.1, started and stopped here; skipped with --no-s3):
  host     TrainStream.batches(): windows cut, resized, padded and normalised on the host (today's path);
           the batch x + y is what crosses to the device
  device   TrainStream.packed_batches(): the host sends each trajectory once, as stored (fp16 shards: half the
           bytes), and the windows are cut on the device (WindowCutter); host cost = the packed stream plus one
           copy of each sent trajectory into fresh memory, timed alone; bytes = trajectories sent per window;
           the cut itself (device work on a GPU) is timed in a pass of its own, on this CPU
--sweep-windows 6,8,11 measures the device path again on the local shards at each windows-per-trajectory count.
The sha256 rate of the shards gives the cores that `check_shard_once` (data.verify_shards) costs when a process
reads each trajectory about once.
Rates are windows per CPU-second of this process (time.process_time: the loader's own cores, whatever else
the shared machine runs; the S3 server's CPU is not counted, it is the storage side) and per wall second.
From them: cores_needed = target windows/s / windows per CPU-second, h2d_bytes_per_s = target x bytes per
window. Targets: nestor-ti 4,700/s (issue 27); afno-ti = 0.20 x 989e12 / (3 x forward FLOPs per sample)
(H100 bf16 dense peak, 20% MFU, FLOPs from nestor_ds.model.flops).

--compare adds the older comparison (random-access HDF5 reads as DPOT does, and a sequential read of the
tar files, cold and warm; docs/benchmarks.md, "Data loader").

Data (both parts): the tool writes its own, a PDEBench-CFD-like HDF5 file (Vx, Vy, density, pressure, each
[R, T, X, Y] float32) and the same trajectories as shards built by the real builder. --compare, cold
(files evicted from the page cache before each pass) and warm:
  sequential  read every tar file front to back in 8 MiB chunks: the disk ceiling
  stream      TrainStream batches (t_in past + t_ar next frames, --windows windows per trajectory)
  h5py        the same number of random windows read as u[i, t:t + t_in + t_ar] per channel from the
              HDF5 file (file kept open per worker), written into the same batch layout
Both loaders run with the same --workers (torch DataLoader processes) and produce identical batch
tensors [B, X, Y, T, C]. With --json the last output line is one JSON object.

    OMP_NUM_THREADS=1 python -m tools.bench_data --json --repeats 3 --sweep-windows 6,8,11 [--compare]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from nestor_ds.data import TrainStream, load_manifest
from nestor_ds.shards.cache import stage
from nestor_ds.shards.schema import sha256_file
from nestor_ds.shards.urls import expand
from tools.bench_data_compare import compare, evict
from tools.bench_data_files import CHANNELS, Seaweed, stream_cfg, write_data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trajectories", type=int, default=64, help="trajectories in the data set (default 64)")
    p.add_argument("--frames", type=int, default=21, help="frames per trajectory (default 21)")
    p.add_argument("--res", type=int, default=128, help="grid size X = Y (default 128)")
    p.add_argument("--windows", type=int, default=4, help="windows per trajectory (default 4)")
    p.add_argument("--t-in", type=int, default=10, help="input frames per window (default 10)")
    p.add_argument("--t-ar", type=int, default=1, help="target frames per window (default 1)")
    p.add_argument("--batch", type=int, default=4, help="micro-batch size (default 4)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for both loaders (default 0)")
    p.add_argument("--shards", type=int, default=8, help="training shards (default 8)")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed passes per figure: median, min and max reported (default 3)"
    )
    p.add_argument(
        "--sweep-windows",
        default="",
        help="comma-separated windows per trajectory (e.g. 6,8,11): the device path on the local shards again at each",
    )
    p.add_argument("--no-s3", action="store_true", help="skip the S3 measurements")
    p.add_argument("--compare", action="store_true", help="also the h5py and sequential-read comparison (cold, warm)")
    p.add_argument("--dir", default=None, help="work directory (default: a fresh temporary one, removed after)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    try:
        args.sweep = [int(n) for n in args.sweep_windows.split(",") if n.strip()]
    except ValueError:
        p.error(f"--sweep-windows: comma-separated integers, got {args.sweep_windows!r}")
    if any(n < 1 for n in args.sweep):
        p.error(f"--sweep-windows: counts must be >= 1, got {args.sweep}")
    if args.t_in + args.t_ar > args.frames:
        p.error(f"--t-in + --t-ar = {args.t_in + args.t_ar} > --frames = {args.frames}")
    if args.trajectories < args.shards or args.shards < max(1, args.workers):
        p.error(
            f"need --trajectories >= --shards >= --workers (got {args.trajectories}, {args.shards}, {args.workers})"
        )
    return args


# ------------------------------------------------------------------------------------------ capacity


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def capacity_pass(
    path: str, args: argparse.Namespace, n_batches: int, with_host: bool = True, cache: Path | None = None
) -> dict[str, float]:
    """Timed passes of each path on one data source (after an untimed warm-up pass of each, which also pays
    for imports, the S3 client, the shards' sha256 check and, with a shard `cache`, the downloads into it): windows
    per CPU-second and per wall second, bytes per window. `with_host=False`: the device path only (the sweep)."""
    cfg = stream_cfg(path, args, n_batches)
    cfg.shard_cache = None if cache is None else str(cache)
    n_windows = n_batches * args.batch

    def host() -> tuple[float, float]:
        stream = TrainStream(cfg, micro_batch=args.batch, seed=0)
        c0, w0 = time.process_time(), time.perf_counter()
        for batch in itertools.islice(stream.batches(), n_batches):
            assert batch["x"].shape[0] == args.batch
        return time.process_time() - c0, time.perf_counter() - w0

    def device() -> tuple[float, float, float, int]:
        """The host side alone, as on a GPU node where the cut's memory traffic is the GPU's (interleaved with a cut
        on this CPU, it evicts the host side's caches and fragments its heap), then the cut in a pass of its own."""
        stream = TrainStream(cfg, micro_batch=args.batch, seed=0)
        host_cpu, sent = 0.0, 0
        w0 = time.perf_counter()
        packed_batches = stream.packed_batches()
        for _ in range(n_batches):
            c0 = time.process_time()
            packed = next(packed_batches)
            # the one copy each sent trajectory costs the host on the way to a GPU (into pinned or shared memory;
            # the stream hands out views of the mapped shard), charged to the host here: into fresh memory
            copies = [t.clone() for t in packed["new_data"]]
            host_cpu += time.process_time() - c0
            sent += sum(t.numel() * t.element_size() for t in copies)
        packed_batches.close()
        return host_cpu, time.perf_counter() - w0, cut(), sent

    def cut() -> float:
        """CPU seconds of `WindowCutter` over one pass of packed batches (device work on a GPU)."""
        stream = TrainStream(cfg, micro_batch=args.batch, seed=0)
        cutter = stream.cutter("cpu")  # on a GPU node: the GPU
        cut_cpu = 0.0
        packed_batches = stream.packed_batches()
        for packed in itertools.islice(packed_batches, n_batches):
            c0 = time.process_time()
            batch = cutter(packed)
            cut_cpu += time.process_time() - c0
            assert batch["x"].shape[0] == args.batch
        packed_batches.close()
        return cut_cpu

    if with_host:
        host()
    device()
    out: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        if with_host:
            cpu, wall = host()
            out.setdefault("host_windows_per_cpu_s", []).append(n_windows / cpu)
            out.setdefault("host_windows_per_s", []).append(n_windows / wall)
        d_cpu, d_wall, cut_cpu, sent = device()
        for key, value in (
            ("device_host_windows_per_cpu_s", n_windows / d_cpu),
            ("device_cut_windows_per_cpu_s", n_windows / cut_cpu),
            ("device_bytes_per_window", sent / n_windows),
        ):
            out.setdefault(key, []).append(value)
    res: dict[str, float] = {}
    for key, values in out.items():
        st = _stats(values)
        res[key] = st["median"]
        if key != "device_bytes_per_window":
            res[f"{key}_min"], res[f"{key}_max"] = st["min"], st["max"]
    # the one-core rate a GPU's loader gets from each path: the host work only (the cut runs on the GPU)
    if with_host:
        res["device_vs_host"] = res["device_host_windows_per_cpu_s"] / res["host_windows_per_cpu_s"]
    return res


H100_BF16_DENSE_FLOPS = 989e12  # H100 SXM bf16 dense peak
TARGETS_MFU = {"nestor-ti": 0.15, "afno-ti": 0.20}
NESTOR_TI_TARGET = 4700.0  # windows/s, issue 27 (15% MFU of nestor-ti's training FLOPs, rounded there)


def targets() -> dict[str, dict[str, float]]:
    """Windows/s one GPU eats at each preset's MFU target: MFU x 989e12 / (3 x forward FLOPs per sample)."""
    from nestor_ds.model.flops import account
    from nestor_ds.model.presets import get_preset

    out = {}
    for name, mfu in TARGETS_MFU.items():
        train_flops = 3 * account(get_preset(name)).flops_per_sample
        derived = mfu * H100_BF16_DENSE_FLOPS / train_flops
        out[name] = {
            "mfu": mfu,
            "train_flops_per_sample": train_flops,
            "derived_windows_per_s": derived,
            "windows_per_s": NESTOR_TI_TARGET if name == "nestor-ti" else derived,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # one loader core
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    n_batches = args.trajectories * args.windows // args.batch
    tg = targets()
    res: dict = {"targets": tg}
    try:
        h5, shards32 = write_data(work, args)
        _, shards16 = write_data(work, args, "float16")
        # read back from disk as a training run reads built shards: the page cache the builder's small writes leave
        # behind maps in 4 KiB pages, readahead's in large folios (measured: 4-6x the page faults per window)
        evict([*shards32.glob("*.tar"), *shards16.glob("*.tar")])
        sources = {"local_fp32": str(shards32), "local_fp16": str(shards16)}
        rates: dict[str, dict[str, float]] = {}
        if args.no_s3:
            for name, path in sources.items():
                rates[name] = capacity_pass(path, args, n_batches)
        else:
            with Seaweed(work / "seaweed") as s3:
                sources["s3_fp32"] = s3.upload(shards32, "fp32")
                sources["s3_fp16"] = s3.upload(shards16, "fp16")
                for name, path in sources.items():
                    rates[name] = capacity_pass(path, args, n_batches)
                for dtype in STORED_BYTES:  # staged whole in a local cache once, then mapped (data.shard_cache)
                    url = sources[f"s3_{dtype}"]
                    rates[f"s3_{dtype}_cached"] = capacity_pass(url, args, n_batches, cache=work / f"cache_{dtype}")
                staged = sources["s3_fp16"], shards16, work / "cache_timed"
                res["s3_stage_bytes_per_cpu_s"] = stage_rate(*staged, args.repeats)
        res["sha256_bytes_per_cpu_s"] = sha_rate = hash_rate(shards32, args.repeats)
        res["sweep"] = {str(n): sweep_pass(sources, args, n, tg, sha_rate) for n in args.sweep}
        if args.compare:
            res["compare"] = compare(h5, shards32, args)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    res.update(derive(rates, args, tg, res["sha256_bytes_per_cpu_s"]))
    report(res)
    if args.json:
        print(json.dumps(res))
    return 0


STORED_BYTES = {"fp32": 4, "fp16": 2}  # bytes per stored value of each shard dtype


def steady_device_bytes(args: argparse.Namespace, windows: int, dtype: str) -> float:
    """Bytes per window the device path sends in steady state: each trajectory once, as stored, for its windows
    (also the shard bytes read, and hashed once by the sha256 check, per window). A short pass measures more
    (trajectories whose windows are still in the shuffle buffer when it ends): rates[*] has that."""
    return args.frames * args.res * args.res * len(CHANNELS) * STORED_BYTES[dtype] / windows


def sweep_pass(
    sources: dict[str, str], args: argparse.Namespace, windows: int, tg: dict, sha_rate: float
) -> dict[str, dict]:
    """The device path on the local fp32 and fp16 shards at `windows` windows per trajectory: rates, and the cores
    and host-to-device bytes per second each target needs (and the cores of the sha256 check on a corpus read once)."""
    a = argparse.Namespace(**{**vars(args), "windows": windows})
    out = {}
    for dtype in STORED_BYTES:
        r = capacity_pass(sources[f"local_{dtype}"], a, args.trajectories * windows // args.batch, with_host=False)
        per_window = steady_device_bytes(args, windows, dtype)
        r["steady_device_bytes_per_window"] = per_window
        r["cores_needed"] = {t: tg[t]["windows_per_s"] / r["device_host_windows_per_cpu_s"] for t in tg}
        r["h2d_bytes_per_s"] = {t: tg[t]["windows_per_s"] * per_window for t in tg}
        r["verify_cores_read_once"] = {t: tg[t]["windows_per_s"] * per_window / sha_rate for t in tg}
        out[f"local_{dtype}"] = r
    return out


def stage_rate(spec: str, shards: Path, cache: Path, repeats: int) -> float:
    """Bytes per CPU-second of staging shard URLs into a cache (download by the resuming S3 reader, sha256 against
    the manifest of the local copy `shards`, write, fsync): the one-time cost of data.shard_cache per shard and node,
    median of `repeats` fresh caches."""
    digests = {s["file"]: s["sha256"] for s in load_manifest(shards)["splits"]["train"]["shards"]}
    rates = []
    for i in range(repeats):
        c0, size = time.process_time(), 0
        for url in expand(spec):
            size += stage(url, cache / str(i), digests[url.rsplit("/", 1)[1]])[0].stat().st_size
        rates.append(size / (time.process_time() - c0))
    return statistics.median(rates)


def hash_rate(shards: Path, repeats: int) -> float:
    """sha256 bytes per CPU-second of `check_shard_once`'s hash (schema.sha256_file) over the shard files, median of
    `repeats` passes (page cache warm)."""
    files = sorted(shards.glob("*.tar"))
    size = sum(f.stat().st_size for f in files)
    rates = []
    for _ in range(repeats):
        c0 = time.process_time()
        for f in files:
            sha256_file(f)
        rates.append(size / (time.process_time() - c0))
    return statistics.median(rates)


def derive(rates: dict[str, dict[str, float]], args: argparse.Namespace, tg: dict, sha_rate: float) -> dict:
    """The figures derived from the measured rates: cores per GPU for each source and path, host-to-device bytes per
    second for each path (the device path's for fp32 and fp16 shards), and the cores the sha256 check costs when
    each process reads every trajectory about once (a corpus larger than a process re-reads)."""
    host_bytes = (args.t_in + args.t_ar) * args.res * args.res * len(CHANNELS) * 4  # x + y of one window, fp32
    device_bytes = {dtype: steady_device_bytes(args, args.windows, dtype) for dtype in STORED_BYTES}
    n_windows = args.trajectories * args.windows // args.batch * args.batch
    return {
        "rates": rates,
        "host_bytes_per_window": host_bytes,
        "device_bytes_per_window": device_bytes,
        "cores_needed": {
            t: {
                f"{src}_{path}": tg[t]["windows_per_s"]
                / r[f"{path}_windows_per_cpu_s" if path == "host" else "device_host_windows_per_cpu_s"]
                for src, r in rates.items()
                for path in ("host", "device")
            }
            for t in tg
        },
        "h2d_bytes_per_s": {
            t: {"host": tg[t]["windows_per_s"] * host_bytes}
            | {f"device_{dtype}": tg[t]["windows_per_s"] * b for dtype, b in device_bytes.items()}
            for t in tg
        },
        "verify_cores_read_once": {
            t: {dtype: tg[t]["windows_per_s"] * b / sha_rate for dtype, b in device_bytes.items()} for t in tg
        },
        "trajectories": args.trajectories,
        "frames": args.frames,
        "res": args.res,
        "channels": len(CHANNELS),
        "windows_per_trajectory": args.windows,
        "t_in": args.t_in,
        "t_ar": args.t_ar,
        "batch": args.batch,
        "workers": args.workers,
        "repeats": args.repeats,
        "windows_per_pass": n_windows,
        "trajectory_mb": args.frames * args.res * args.res * len(CHANNELS) * 4 / 2**20,
        "torch_threads": torch.get_num_threads(),
    }


def report(res: dict) -> None:
    """The human-readable table: one row per source, then cores and bytes per GPU per target."""
    print(
        f"one core, windows per CPU-second (median [min-max] of {res['repeats']}); {res['res']}x{res['res']}, "
        f"{res['t_in']}+{res['t_ar']} frames, {res['channels']} channels, {res['windows_per_trajectory']} windows "
        f"per trajectory"
    )
    print(f"{'source':11s} {'host path':>22s} {'device path (host)':>22s} {'ratio':>6s} {'cut (CPU)':>10s} wall win/s")
    for src, r in res["rates"].items():
        h, d = "host_windows_per_cpu_s", "device_host_windows_per_cpu_s"
        print(
            f"{src:11s} {r[h]:7.0f} [{r[h + '_min']:5.0f}-{r[h + '_max']:5.0f}] "
            f"{r[d]:9.0f} [{r[d + '_min']:5.0f}-{r[d + '_max']:5.0f}] {r['device_vs_host']:5.1f}x "
            f"{r['device_cut_windows_per_cpu_s']:10.0f} {r['host_windows_per_s']:9.0f}"
        )
    dev = res["device_bytes_per_window"]
    print(
        f"bytes per window to the device: host path {res['host_bytes_per_window'] / 1e6:.2f} MB, device path "
        f"{dev['fp32'] / 1e6:.2f} MB from fp32 shards, {dev['fp16'] / 1e6:.2f} MB from fp16 (T / windows per "
        f"trajectory frames as stored; in this short pass: "
        + ", ".join(f"{src} {r['device_bytes_per_window'] / 1e6:.2f}" for src, r in res["rates"].items())
        + ")"
    )
    for t, tg in res["targets"].items():
        print(
            f"{t}: {tg['windows_per_s']:.0f} windows/s per GPU ({tg['mfu']:.0%} MFU of 989 TFLOP/s / "
            f"{tg['train_flops_per_sample'] / 1e9:.2f} GFLOP per sample = {tg['derived_windows_per_s']:.0f})"
        )
        print("  cores: " + ", ".join(f"{k} {v:.1f}" for k, v in res["cores_needed"][t].items()))
        print("  host-to-device GB/s: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in res["h2d_bytes_per_s"][t].items()))
        print(
            "  + sha256 check, each trajectory read once per process: "
            + ", ".join(f"{k} {v:.1f} cores" for k, v in res["verify_cores_read_once"][t].items())
        )
    print(f"sha256 of the shards: {res['sha256_bytes_per_cpu_s'] / 1e9:.2f} GB per CPU-second")
    if "s3_stage_bytes_per_cpu_s" in res:
        print(f"staging S3 shards into the cache: {res['s3_stage_bytes_per_cpu_s'] / 1e9:.2f} GB per CPU-second")
    for n, by_src in res["sweep"].items():
        for src, r in by_src.items():
            d = "device_host_windows_per_cpu_s"
            print(
                f"device path, {n} windows per trajectory, {src}: {r[d]:.0f} [{r[d + '_min']:.0f}-{r[d + '_max']:.0f}] "
                "windows per CPU-second; "
                + ", ".join(
                    f"{t} {r['cores_needed'][t]:.1f} cores, {r['h2d_bytes_per_s'][t] / 1e9:.1f} GB/s"
                    for t in res["targets"]
                )
            )
    if "compare" in res:
        c = res["compare"]
        print(f"compare (best of {res['repeats']}): {'cold':>12s} {'warm':>12s}")
        print(
            f"{'sequential':12s} {c['sequential_bytes_per_s'] / 1e6:9.0f} MB/s "
            f"{c['sequential_bytes_per_s_warm'] / 1e6:7.0f} MB/s"
        )
        for name in ("stream", "h5py"):
            print(f"{name:12s} {c[f'{name}_windows_per_s']:8.1f} win/s {c[f'{name}_windows_per_s_warm']:6.1f} win/s")
        print(f"{'ratio':12s} {c['ratio_vs_h5py']:11.2f}x {c['ratio_vs_h5py_warm']:11.2f}x   (stream / h5py)")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError) as err:  # bad input or disk trouble: one line, non-zero exit
        print(f"bench_data: error: {err}", file=sys.stderr)
        sys.exit(2)
