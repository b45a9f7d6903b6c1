"""The study's data (tools/study.py): seeded raw files and shards of every family, built by the commands a user runs,
and the run config's `data:` section that trains on them.

Why its own module: every trial reads the same shards; ``run`` (one logged command) is shared with the trials
(``study_trials.py``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
    """Run one pipeline command, its output in log_path; a failure names the command and the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-5:]
        raise RuntimeError(
            f"study: `{' '.join(cmd[:3])} ...` failed (exit {proc.returncode}); log {log_path}:\n" + "\n".join(tail)
        )


def build_data(spec: dict[str, Any], work: Path) -> dict[str, dict[str, Path]]:
    """Raw files and shards of every family: {family: {"dev": dir (train + validation), "test": dir}}."""
    d = spec["data"]
    out: dict[str, dict[str, Path]] = {}
    py = sys.executable
    for i, fam in enumerate(d["families"]):
        dev, test = work / "shards" / f"{fam}_dev", work / "shards" / f"{fam}_test"
        out[fam] = {"dev": dev, "test": test}
        if (dev / "manifest.json").is_file() and (test / "manifest.json").is_file():
            continue
        raw = work / "raw" / fam
        if raw.exists():
            shutil.rmtree(raw)
        raw.mkdir(parents=True)
        seed = int(d.get("seed", 1000)) + 10 * i
        common = ["--pde", fam, "--res", str(d["resolution"]), "--steps", str(d["frames"]), "--quiet"]
        n_dev = int(d["train"]) + int(d["val"])
        run(
            [
                py,
                "-m",
                "nestor_ds.synth",
                *common,
                "--n",
                str(n_dev),
                "--seed",
                str(seed),
                "--out",
                str(raw / f"{fam}_dev.h5"),
            ],
            work / "logs" / "data.log",
        )
        # the test file holds the test trajectories plus one that lands in its (unused) train split
        run(
            [
                py,
                "-m",
                "nestor_ds.synth",
                *common,
                "--n",
                str(int(d["test"]) + 1),
                "--seed",
                str(seed + 1),
                "--out",
                str(raw / f"{fam}_test.h5"),
            ],
            work / "logs" / "data.log",
        )
        for name, src, frac in (
            (dev, raw / f"{fam}_dev.h5", int(d["val"]) / n_dev),
            (test, raw / f"{fam}_test.h5", int(d["test"]) / (int(d["test"]) + 1)),
        ):
            run(
                [
                    py,
                    "-m",
                    "nestor_ds.shards",
                    "--input",
                    str(src),
                    "--out",
                    str(name),
                    "--name",
                    name.name,
                    "--test-fraction",
                    f"{frac:.6f}",
                    "--overwrite",
                    "--no-progress",
                ],
                work / "logs" / "data.log",
            )
    return out


def data_section(spec: dict[str, Any], data: dict[str, dict[str, Path]], families: list[str]) -> dict[str, Any]:
    """The run config's `data:` for training on `families` (validation = the dev dirs' test split)."""
    d = spec["data"]
    return {
        "datasets": [
            {
                "name": f"{fam}_dev",
                "path": str(data[fam]["dev"]),
                "weight": 1.0,
                "rollout_steps": int(d.get("rollout_steps", 5)),
            }
            for fam in families
        ],
        "t_in": int(d["t_in"]),
        "t_ar": 1,
        "resolution": int(d["resolution"]),
        "channels": int(d.get("channels", 4)),
        **(d.get("loader") or {}),
    }
