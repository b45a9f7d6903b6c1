"""``node_probe.py`` under torchrun's elastic agent: each worker writes its pid, and a restarted attempt picks its
``--resume`` exactly as the entries do (``nestor_ds.cli.restart_resume``), so a test can kill one worker and watch
the agent's restart continue the run by itself.

    torchrun --nnodes 1 --nproc_per_node 2 --max-restarts 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:P \
        tests/scripts/restart_probe.py --config C.yaml --ds_config D.json --global-batch 4 --out DIR --run-name N

Environment: ``RESTART_PROBE_PIDS=DIR`` writes ``DIR/attempt<TORCHELASTIC_RESTART_COUNT>.rank<RANK>.pid`` (the
worker's pid, found without walking /proc); ``NODE_PROBE_SLOW`` as in node_probe.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script by the launchers

from nestor_ds.cli import restart_resume, run_cli  # noqa: E402
from nestor_ds.config import load_config  # noqa: E402
from tests.scripts import node_probe  # noqa: E402


def main() -> None:
    pids = os.environ.get("RESTART_PROBE_PIDS")
    if pids:
        attempt, rank = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), os.environ.get("RANK", "0")
        Path(pids).mkdir(parents=True, exist_ok=True)
        (Path(pids) / f"attempt{attempt}.rank{rank}.pid").write_text(str(os.getpid()))
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", required=True)
    p.add_argument("--run-name", default="probe")  # probe_train.py's default
    p.add_argument("--resume", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args, _ = p.parse_known_args()
    resume = restart_resume(args.resume, load_config(args.config, args.overrides), "pretrain", args.run_name)
    argv = sys.argv[:1]
    skip = False
    for a in sys.argv[1:]:  # drop the command line's --resume, then pass the attempt's own
        if skip or a == "--resume":
            skip = not skip and a == "--resume"
            continue
        argv.append(a)
    sys.argv = argv + (["--resume", resume] if resume else [])
    node_probe.main()


if __name__ == "__main__":
    run_cli(main)  # as the entries end (nestor_ds/cli.py)
