"""``restart_probe.py`` for a job whose world size changes between torchrun attempts (``--nnodes MIN:MAX``).

Why: torchrun's agent restarts every attempt with the *same* command line, but after a node is lost for good the
world is smaller. test_elastic_resume.py's trajectory (one global batch of ``--global-batch`` samples per step
whatever the rank count, expert parallel over all ranks) needs a micro-batch of ``global batch / world`` and
``ep_size = world``, i.e. a command line per world size. This wrapper derives both from this attempt's
``WORLD_SIZE``, so a fixed launch line gives, on every attempt, what test_elastic_resume.py launches by hand:

    torchrun --nnodes 1:2 --nproc_per_node 1 --max-restarts 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:P \
        tests/scripts/elastic_probe.py --config C.yaml --ds_config D.json --global-batch 4 --out DIR --run-name N

``--ds_config D.json`` is copied to ``D_world<W>.json`` with ``train_micro_batch_size_per_gpu = global batch / W``
(written atomically: every rank writes the same bytes), and ``--set model.moe.ep_size=W`` is appended. Environment:
as restart_probe.py (``RESTART_PROBE_PIDS``, ``NODE_PROBE_SLOW``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script by the launchers

from nestor_ds.cli import run_cli  # noqa: E402
from tests.scripts import restart_probe  # noqa: E402


def _value(argv: list[str], flag: str) -> str:
    """The value after `flag` on the command line (the probes take ``--flag value``)."""
    return argv[argv.index(flag) + 1]


def world_argv(argv: list[str], world: int) -> list[str]:
    """`argv` with its ds_config replaced by this world size's copy and ``model.moe.ep_size`` set to `world`."""
    global_batch = int(_value(argv, "--global-batch"))
    if global_batch % world:
        raise SystemExit(f"elastic_probe: --global-batch {global_batch} is not divisible by world size {world}")
    src = Path(_value(argv, "--ds_config"))
    ds = json.loads(src.read_text())
    ds["train_micro_batch_size_per_gpu"] = global_batch // world
    dst = src.with_name(f"{src.stem}_world{world}.json")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
    tmp.write_text(json.dumps(ds))
    os.replace(tmp, dst)
    out = list(argv)
    out[out.index("--ds_config") + 1] = str(dst)
    return [*out, "--set", f"model.moe.ep_size={world}"]


def main() -> None:
    sys.argv = world_argv(sys.argv, int(os.environ.get("WORLD_SIZE", "1")))
    restart_probe.main()


if __name__ == "__main__":
    run_cli(main)  # as the entries end (nestor_ds/cli.py)
