"""Launch a benchmark module on 2 CPU ranks (torch.distributed.run, gloo) and read back the one result rank 0 prints.

A benchmark module calls `launch(...)` from its `main()` when it is not a rank yet, and `emit(result)` on rank 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from nestor_ds.procs import torchrun

REPO = Path(__file__).resolve().parents[1]
MARKER = "BENCH_RESULT "


def emit(result: dict[str, Any]) -> None:
    """Rank 0: print the result as the one line `launch` reads."""
    print(MARKER + json.dumps(result), flush=True)


def launch(module: str, argv: list[str], threads: int) -> dict[str, Any]:
    """Run `python -m module argv` on 2 ranks with `threads` threads each; the result it emitted, or exit with the
    ranks' stderr tail."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(torchrun(2, "-m", module, *argv), env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        name = module.rsplit(".", 1)[-1]
        sys.exit(f"{name}: the 2-rank run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARKER) :])
