#!/usr/bin/env python
"""Screenshot an MLflow run page with headless Chromium (for docs and reviews).

Starts a private `mlflow ui` (one process, job execution off) on a free local port, waits until it
answers, lets Chromium render the run page, and stops the server again. Needs the Debian `chromium`
package (`apt-get update && apt-get install -y chromium`).

    python -m tools.screenshot_mlflow --run RUN_ID --out docs/mlflow_run.png
    python -m tools.screenshot_mlflow --run RUN_ID --out /tmp/mlflow_metrics.png --page model-metrics
    python -m tools.screenshot_mlflow --run ID_A --run ID_B --out docs/mlflow_compare.png    # compare view
    python -m tools.screenshot_mlflow --model nestor-demo/1 --out docs/mlflow_model.png       # registry page
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nestor_ds.procs import free_port, wait_http  # noqa: E402  (standard library only)
from nestor_ds.procs import stop_group as stop

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="RUN_ID",
        help="MLflow run id to show; give it twice or more for the compare view",
    )
    p.add_argument("--model", default=None, metavar="NAME/VERSION", help="show a Model Registry version instead")
    p.add_argument("--out", required=True, type=Path, help="PNG file to write")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="backend store of the run")
    p.add_argument("--page", default="", help="run sub-page: '' (overview), model-metrics, system-metrics, artifacts")
    p.add_argument("--window-size", default="1600,1200", help="browser window WIDTH,HEIGHT")
    p.add_argument("--render-ms", type=int, default=15000, help="virtual time the page gets to load and draw")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for the MLflow server")
    p.add_argument(
        "--browser-timeout",
        type=float,
        default=120.0,
        help="seconds one Chromium attempt may take beyond --render-ms before it is ended and retried",
    )
    p.add_argument("--attempts", type=int, default=3, help="Chromium attempts before giving up (it can hang)")
    p.add_argument("--chromium", default=None, help="browser binary (default: chromium / chromium-browser)")
    return p.parse_args(argv)


PNG_END = b"IEND\xaeB`\x82"  # the last chunk of every PNG: once it is on disk the image is whole


def _whole_png(path: Path) -> bool:
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return data[:8] == PNG_MAGIC and data[-8:] == PNG_END


def _chromium_once(cmd: list[str], shot: Path, timeout_s: float) -> tuple[bool, str]:
    """One Chromium run; True once `shot` is a whole PNG.

    Headless Chromium sometimes never exits: it can hang with a virtual-time budget that never expires, or after
    writing the screenshot (crbug-style reports in chrome-headless-render-pdf#29, html2image#97, cypress#27264).
    So the file is watched rather than the exit: a whole PNG ends the browser, a deadline ends the attempt.
    Chromium runs in its own process group, ended every time: helpers it forks (crash handler, zygotes) may
    outlive the browser and keep writing to the profile directory.
    """
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if _whole_png(shot):
                    return True, ""
                if proc.poll() is not None:
                    ok = _whole_png(shot)
                    log.seek(0)
                    lines = log.read().strip().splitlines()
                    return ok, f"exit {proc.returncode}: {(lines[-1:] or [''])[0][:300]}"
                time.sleep(0.2)
            return False, f"no screenshot within {timeout_s:.0f} s"
        finally:
            stop(proc, timeout_s=5)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
            except ProcessLookupError:
                pass


def screenshot(
    browser: str, url: str, out: Path, window: str, render_ms: int, timeout_s: float = 120.0, attempts: int = 3
) -> None:
    """Headless Chromium screenshot of `url` into `out`, with networking, sync and updates switched off.

    Each attempt gets a fresh profile and `timeout_s` seconds beyond `render_ms`; the image is written next to
    nothing the user owns until it is whole, then moved to `out` (an earlier file there is replaced only then).
    """
    errors = []
    for attempt in range(1, attempts + 1):
        # the profile is removed best effort: a helper still exiting must not fail a written screenshot
        with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as profile:
            shot = Path(profile) / "shot.png"
            cmd = [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}/profile",
                f"--screenshot={shot}",
                f"--window-size={window}",
                f"--virtual-time-budget={render_ms}",
                url,
            ]
            ok, why = _chromium_once(cmd, shot, timeout_s + render_ms / 1000)
            if ok:
                tmp = out.with_name(f".{out.name}.part")
                shutil.copyfile(shot, tmp)
                os.replace(tmp, out)
                return
        errors.append(f"attempt {attempt}: {why}")
        if attempt < attempts:
            print(f"screenshot_mlflow: chromium {errors[-1]}; retrying", file=sys.stderr)
    raise RuntimeError("chromium wrote no screenshot (" + "; ".join(errors) + ")")


def page_url(base: str, runs: list, model: str | None, page: str) -> str:
    """Run page, compare view (2+ runs) or registry version page; the classic model-training view, not GenAI."""
    import json
    from urllib.parse import quote

    if model:
        name, _, version = model.partition("/")
        return f"{base}/#/models/{quote(name)}/versions/{version or 1}"
    if len(runs) > 1:
        ids = quote(json.dumps([r.info.run_id for r in runs]))
        exps = quote(json.dumps(sorted({r.info.experiment_id for r in runs})))
        return f"{base}/#/compare-runs?runs={ids}&experiments={exps}"
    run = runs[0]
    suffix = f"/{page}" if page else ""
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}{suffix}?workflowType=machine_learning"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.run and not args.model:
        print(
            "screenshot_mlflow: give --run RUN_ID (twice or more to compare) or --model NAME/VERSION", file=sys.stderr
        )
        return 2
    browser = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("screenshot_mlflow: chromium not found (apt-get update && apt-get install -y chromium)", file=sys.stderr)
        return 2
    if args.tracking_uri.startswith("sqlite:///") and not Path(args.tracking_uri[len("sqlite:///") :]).exists():
        print(f"screenshot_mlflow: no MLflow database at {args.tracking_uri[len('sqlite:///') :]}", file=sys.stderr)
        return 2
    from mlflow.tracking import MlflowClient

    runs = []
    for run_id in args.run:
        try:
            runs.append(MlflowClient(args.tracking_uri).get_run(run_id))
        except Exception as exc:  # noqa: BLE001
            print(
                f"screenshot_mlflow: run {run_id} not found in {args.tracking_uri}: {str(exc).splitlines()[0]}",
                file=sys.stderr,
            )
            return 2
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = tempfile.NamedTemporaryFile(prefix="mlflow-ui-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [
            "mlflow",
            "ui",
            "--workers",
            "1",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            args.tracking_uri,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"{base}/health", proc, args.start_timeout)
        url = page_url(base, runs, args.model, args.page)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(browser, url, args.out, args.window_size, args.render_ms, args.browser_timeout, args.attempts)
    except Exception as exc:  # noqa: BLE001 - one line; the server log has the details
        print(f"screenshot_mlflow: {exc} (server log: {log.name})", file=sys.stderr)
        return 1
    finally:
        stop(proc)
    if args.out.read_bytes()[:8] != PNG_MAGIC:
        print(f"screenshot_mlflow: {args.out} is not a PNG", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) for {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
