#!/usr/bin/env python
"""What MLflow logging costs the training thread: the outbox (`Tracker.log_metrics`) vs a synchronous `log_batch`.

Both write the same per-step metric batch (20 metrics) to the same kind of store, side by side in one process:
`sync` calls `MlflowClient.log_batch` on the calling thread (what the tracker did before the outbox), `outbox`
is `Tracker.log_metrics` (queue put; a background thread sends). Reports the median time per call on the
calling thread and the ratio. A fresh SQLite store in a temp dir, or --tracking-uri for a server.

Then what delivery costs the process, coalesced or not: the same steps logged through a tracker that sends every
call (`tracking.metrics_every_s: 0`) and one with the default interval, each followed by `finish`; process CPU
seconds (all threads: the delivery thread competes with training for cores and the GIL) and requests sent, per
logged step.

    python -m tools.bench_tracking --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="logged steps per variant")
    p.add_argument("--metrics", type=int, default=20, help="metrics per step")
    p.add_argument("--tracking-uri", default=None, help="store (default: a fresh SQLite file in a temp dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    from mlflow.entities import Metric

    from nestor_ds.tracking import Tracker, TrackingConfig

    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        uri = args.tracking_uri or f"sqlite:///{tmp}/mlflow.db"
        cfg = TrackingConfig(tracking_uri=uri, experiment="bench-tracking", system_metrics=False)
        names = [f"train/m{i}" for i in range(args.metrics)]
        times: dict[str, list[float]] = {"sync": [], "outbox": []}
        sync = Tracker(cfg, rank=0, entry="bench", run_name="sync")
        outbox = Tracker(cfg, rank=0, entry="bench", run_name="outbox", buffer_dir=Path(tmp) / "buffer")
        if not (sync.active and outbox.active):
            print("bench_tracking: cannot open MLflow runs", file=sys.stderr)
            return 2
        for step in range(1, args.steps + 1):  # interleaved, so machine load hits both alike
            values = {n: 1.0 / step for n in names}
            t0 = time.perf_counter()
            now = int(time.time() * 1000)
            sync.client.log_batch(sync.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
            times["sync"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            outbox.log_metrics(values, step)
            times["outbox"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        outbox.finish()
        drain_s = time.perf_counter() - t0
        sync.finish()
        delivery = {}
        for label, every in (("every_call", 0.0), ("coalesced", TrackingConfig.metrics_every_s)):
            tracker = Tracker(
                TrackingConfig(
                    tracking_uri=uri, experiment="bench-tracking", system_metrics=False, metrics_every_s=every
                ),
                rank=0,
                entry="bench",
                run_name=label,
            )
            cpu0 = time.process_time()
            for step in range(1, args.steps + 1):
                tracker.log_metrics({n: 1.0 / step for n in names}, step)
            tracker.flush()
            requests = tracker._outbox.sent
            tracker.finish()
            delivery[label] = {"cpu_ms_per_step": (time.process_time() - cpu0) * 1e3 / args.steps, "requests": requests}
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "steps": args.steps,
        "metrics_per_step": args.metrics,
        "store": "sqlite (temp)" if not args.tracking_uri else "given",
        "sync_median_ms": med["sync"] * 1e3,
        "outbox_median_ms": med["outbox"] * 1e3,
        "sync_over_outbox": med["sync"] / med["outbox"],
        "outbox_drain_at_finish_s": drain_s,
        "delivery_every_call": delivery["every_call"],
        "delivery_coalesced": delivery["coalesced"],
        "delivery_cpu_every_call_over_coalesced": delivery["every_call"]["cpu_ms_per_step"]
        / delivery["coalesced"]["cpu_ms_per_step"],
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:40s} {v:.4g}" if isinstance(v, float) else f"{k:40s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
