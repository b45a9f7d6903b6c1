"""Soak of automatic restart under torchrun's elastic agent (issue 26 section 3; docs/multinode.md "Automatic restart").

Why a sibling of tools/soak.sh: soak.sh launches the job afresh after every interruption (``--resume auto``); here
the job is launched *once*, and every recovery is torchrun's own restart (``--max-restarts``, c10d rendezvous on
127.0.0.1), which must find and load the run's newest complete checkpoint by itself (``nestor_ds.cli.restart_resume``)
and end with the uninterrupted run's weights, bit for bit. It also measures what the restarts cost in wall-clock time.

    python tools/soak_restart.py --kills 8 --seed 3 --steps 120 [--ckpt-every 2] [--work DIR] [--json OUT.json]
    python tools/soak_restart.py --mode fewer-nodes [--json OUT.json]

``--mode soak`` (default): an uninterrupted reference run, then the soak run, one after the other (so the times
compare), both ``python -m torch.distributed.run --nnodes 1 --nproc_per_node 2 --rdzv-backend c10d`` of the real entry
``-m nestor_ds.train`` (tiny NESTOR of tests/train_fixtures.py, token experts expert-parallel, ZeRO-2, input noise,
one thread per rank, a checkpoint every ``--ckpt-every`` steps). The kill steps are ``--kills`` distinct steps drawn
by ``random.Random(seed)`` over the run (``ckpt_every + 1 .. steps - max(4, steps / 10)``), with a kind (SIGKILL of one
random worker, or of every worker of the node: the agent survives to restart them) and a delay of 0-0.1 s after the
step is seen (a tiny step takes ~40 ms on 2 ranks: the kill lands within a few steps of its target). Each
kill waits for progress of the live attempt: the previous restart resumed (metrics.jsonl rewritten by the resume) and
logged a step at or past the target. Per kill it records the seconds from the kill to the restarted attempt's
``torchrun restart`` line, to its ``resumed from`` line, and to its first new step in metrics.jsonl, and the steps
that were redone. Then every tensor of every file of the final checkpoint (module, experts, fp32 masters and Adam
moments) and every metrics.jsonl row (``perf/`` timing columns excluded) are compared with the reference; the
passing bar is bit-identical losses and tensors, except the client state's ``rng`` record, which is reported apart
(kept for inspection, never restored, unseeded per process: see compare_tags).

``--mode fewer-nodes``: two torchrun agents on 127.0.0.1 (``--nnodes 1:2 --nproc_per_node 1 --max-restarts 2``, c10d,
``last_call_timeout``), the first hosting the rendezvous store; after the first checkpoint the second agent's whole
process tree is SIGKILLed for good. The survivor must restart its worker on world size 1, which resumes through the
elastic resume (ZeRO-2 re-sharded, ep 2 -> 1, tests/scripts/elastic_probe.py) and finishes; its losses, prediction
and final weights are compared with a reference run on 2 ranks to the same checkpoint and 1 rank after it (the
2 -> 1 case of tests/test_elastic_resume.py: losses to 1e-5 relative, prediction to 1e-4).

Exit 0 = every check passed, 1 = a check failed, 2 = the run could not be carried out (see the logs under --work).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python tools/soak_restart.py`
    sys.path.insert(0, str(REPO))

from nestor_ds.procs import free_port, kill_tree, torchrun  # noqa: E402
from tools.soak_checks import compare_rows, compare_tags, rows  # noqa: E402
from tools.soak_procs import (  # noqa: E402
    SoakError,
    elastic,
    finish,
    inode,
    run_env,
    start,
    uptime,
    wait_for,
    workers,
)

ELASTIC_PROBE = str(REPO / "tests" / "scripts" / "elastic_probe.py")
RESTART_LINE = re.compile(r"torchrun restart (\d+) \(TORCHELASTIC_RESTART_COUNT\): (resuming|no complete)")
RESUMED_LINE = re.compile(r"resumed from (\S+) \(step (\d+)\)")


# ---------------------------------------------------------------------------------------------------------- soak


def soak_config(work: Path, steps: int, ckpt_every: int) -> tuple[Path, Path]:
    """(run config, ds_config) for the soak: the tiny NESTOR of the tests, token experts expert-parallel, ZeRO-2."""
    from tests.train_fixtures import build_tiny_shards, ds_config, tiny_config

    cfg = tiny_config(
        work,
        build_tiny_shards(work),
        model={"moe": {"backend": "local"}},
        train={
            "max_steps": steps,
            "ckpt_every": ckpt_every,
            "keep_last": 2,
            "eval_every": 0,
            "input_noise": 5e-4,
            "threads_per_rank": 1,
            "collective_timeout_s": 25,
        },
        tracking={"enabled": False},  # not under test; MLflow start-up would dominate every attempt
    )
    return cfg, ds_config(work, stage=2, micro=2)


def kill_plan(seed: int, kills: int, steps: int, ckpt_every: int) -> list[dict[str, Any]]:
    """The seeded kill schedule: distinct target steps spread over the run, each with a kind and a delay."""
    lo, hi = ckpt_every + 1, steps - max(4, steps // 10)  # leave the end alone: a kill must find live workers
    if hi - lo + 1 < kills:
        raise SoakError(f"--steps {steps} leaves {max(0, hi - lo + 1)} kill steps for {kills} kills: raise --steps")
    rng = random.Random(seed)
    targets = sorted(rng.sample(range(lo, hi + 1), kills))
    return [
        {"target_step": t, "kind": rng.choice(("one worker", "every worker")), "delay_s": round(rng.uniform(0, 0.1), 3)}
        for t in targets
    ]


def soak(work: Path, kills: int, seed: int, steps: int, ckpt_every: int, timeout_s: float) -> dict[str, Any]:
    """Reference run, then the soak run under the agent with the planned kills; the comparison and the costs."""
    plan = kill_plan(seed, kills, steps, ckpt_every)
    cfg, ds = soak_config(work, steps, ckpt_every)
    for name in ("ref", "soak"):
        shutil.rmtree(work / "runs" / name, ignore_errors=True)
    rng = random.Random(seed + 1)  # victims (which worker), apart from the plan so the plan reads alone

    def launch(name: str, max_restarts: int) -> tuple[subprocess.Popen, Path]:
        cmd = elastic(free_port(), "1", 2, max_restarts, f"{name}-{os.getpid()}")
        cmd += ["-m", "nestor_ds.train", "--ds_config", str(ds), "--config", str(cfg), "--run-name", name]
        log = work / f"{name}.log"
        return start(cmd, log, run_env()), log

    result: dict[str, Any] = {"seed": seed, "kills_planned": kills, "steps": steps, "ckpt_every": ckpt_every}
    result["load_before"] = uptime()
    t0 = time.monotonic()
    ref, ref_log = launch("ref", 0)
    finish(ref, ref_log, timeout_s, "reference run")
    result["reference_s"] = round(time.monotonic() - t0, 1)

    run_dir, metrics = work / "runs" / "soak", work / "runs" / "soak" / "metrics.jsonl"
    t0 = time.monotonic()
    job, log = launch("soak", kills + 3)  # +3: a restart spent at exit (docs/multinode.md) must not fail the soak
    records: list[dict[str, Any]] = []
    resumed_step = 0  # the live attempt's resume point
    try:
        for k, kill in enumerate(plan, 1):

            def progressed(kill: dict[str, Any] = kill, resumed_step: int = resumed_step) -> bool:
                # rows past the live attempt's resume point: the previous restart's rows (after its resume rewrote
                # the file) or the first attempt's
                r = rows(run_dir)
                return bool(r) and r[-1]["step"] >= max(kill["target_step"], resumed_step + 1)

            wait_for(progressed, job, timeout_s, f"step {kill['target_step']} before kill {k}")
            time.sleep(kill["delay_s"])
            alive = workers(job.pid, "nestor_ds.train")
            if len(alive) < 2:
                raise SoakError(f"kill {k}: {len(alive)} live workers at step {rows(run_dir)[-1]['step']}")
            victims = [alive[rng.choice(sorted(alive))]] if kill["kind"] == "one worker" else list(alive.values())
            text_before = log.read_text()
            n_restarts = len(RESTART_LINE.findall(text_before))
            n_resumed = len(RESUMED_LINE.findall(text_before))
            ino_at_kill, step_at_kill = inode(metrics), rows(run_dir)[-1]["step"]
            t_kill = time.monotonic()
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            rec = {"kill": k, **kill, "step_logged_at_kill": step_at_kill, "at_s": round(t_kill - t0, 1)}
            rec["ranks_killed"] = sorted(r for r, p in alive.items() if p in victims)

            # the restarted attempt: its restart line, its resume, and its first new step
            restart = wait_for(
                lambda n=n_restarts: (m := RESTART_LINE.findall(log.read_text()))[n:] and m[n],
                job,
                timeout_s,
                f"the restart after kill {k}",
            )
            rec["restart_count"], rec["kill_to_restart_line_s"] = int(restart[0]), round(time.monotonic() - t_kill, 1)
            if restart[1] == "resuming":
                found = wait_for(
                    lambda n=n_resumed: (m := RESUMED_LINE.findall(log.read_text()))[n:] and m[n],
                    job,
                    timeout_s,
                    f"the resume after kill {k}",
                )
                resumed_step = int(found[1])
                rec["kill_to_resumed_line_s"] = round(time.monotonic() - t_kill, 1)
            else:
                resumed_step = 0  # killed before the first complete checkpoint: the attempt starts afresh
            rec["resumed_from_step"] = resumed_step

            if resumed_step >= steps:  # killed after the final save (the delay ran past the last step): nothing left
                rec["kill_to_resumed_step_s"], rec["steps_redone"] = None, 0
                records.append(rec)
                continue

            # the resume rewrites metrics.jsonl (new inode), then the attempt's first step appends a row past it
            def stepped(i: int | None = ino_at_kill, s: int = resumed_step) -> bool:
                return inode(metrics) != i and bool(r := rows(run_dir)) and r[-1]["step"] > s

            wait_for(
                stepped,
                job,
                timeout_s,
                f"the first step after kill {k}",
            )
            rec["kill_to_resumed_step_s"] = round(time.monotonic() - t_kill, 1)
            rec["steps_redone"] = step_at_kill - resumed_step
            records.append(rec)
            print(
                f"soak_restart: kill {k}/{kills} ({kill['kind']}, ranks {rec['ranks_killed']}) at step "
                f"{step_at_kill}: restart line +{rec['kill_to_restart_line_s']} s, resumed from step {resumed_step}, "
                f"first step +{rec['kill_to_resumed_step_s']} s",
                flush=True,
            )
        finish(job, log, timeout_s, "soak run")
    finally:
        kill_tree(job.pid, signal.SIGKILL)
    result["soak_s"] = round(time.monotonic() - t0, 1)
    result["load_after"] = uptime()
    text = log.read_text()
    result["restarts_total"] = max((int(m[0]) for m in RESTART_LINE.findall(text)), default=0)
    result["kills"] = records
    result["overhead_s"] = round(result["soak_s"] - result["reference_s"], 1)
    result["overhead_per_kill_s"] = round(result["overhead_s"] / max(1, len(records)), 1)
    for key in ("kill_to_restart_line_s", "kill_to_resumed_step_s"):
        vals = [r[key] for r in records if r[key] is not None]
        if vals:
            result[key] = {"min": min(vals), "mean": round(sum(vals) / len(vals), 1), "max": max(vals)}
    result["steps_redone_total"] = sum(r["steps_redone"] for r in records)
    result["metrics"] = compare_rows(rows(work / "runs" / "ref"), rows(run_dir))
    tag = f"step_{steps:08d}"
    result["final_tag"] = compare_tags(work / "runs" / "ref" / "checkpoints" / tag, run_dir / "checkpoints" / tag)
    result["passed"] = (
        len(records) == kills
        and result["metrics"]["steps_equal"]
        and result["metrics"]["losses_bit_identical"]
        and result["final_tag"]["bit_identical"]
    )
    return result


# --------------------------------------------------------------------------------------------------- fewer nodes


def fewer_nodes(work: Path, steps: int = 4, last_call_s: int = 5, timeout_s: float = 600) -> dict[str, Any]:
    """Two single-rank agents (``--nnodes 1:2``); the non-host agent's tree is killed for good after the step-2
    checkpoint while step 3 runs (slowed: 3 s per batch); the host agent goes on alone. The reference (2 ranks with
    ``train.stop_at=2``, then 1 rank ``--resume auto``) runs beside it. Returns the checks and the figures."""
    import torch

    from tests.train_fixtures import build_tiny_shards, ds_config, tiny_config

    work.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(
        work,
        build_tiny_shards(work),
        model={"moe": {"backend": "local"}},
        loss={"image_lb_weight": 0.0, "token_lb_weight": 0.0},  # as test_elastic_resume.py's 2 -> 1 case
        train={"max_steps": steps, "ckpt_every": 2, "collective_timeout_s": 25, "threads_per_rank": 1},
        tracking={"enabled": False},
    )
    ds = ds_config(work, stage=2, micro=2)  # elastic_probe.py sets the micro-batch per world size
    for sub in ("runs", "out", "pids"):
        shutil.rmtree(work / sub, ignore_errors=True)

    def args(name: str, *extra: str) -> list[str]:
        base = [ELASTIC_PROBE, "--config", str(cfg), "--ds_config", str(ds), "--global-batch", "4"]
        return [*base, "--out", str(work / "out" / name), "--run-name", name, *extra]

    port, rdzv_id = free_port(), f"fewer-{os.getpid()}"
    env = run_env(NODE_PROBE_SLOW="2:3", RESTART_PROBE_PIDS=str(work / "pids"))
    result: dict[str, Any] = {"load_before": uptime()}
    t0 = time.monotonic()
    host = start(
        elastic(port, "1:2", 1, 2, rdzv_id, f"is_host=1,last_call_timeout={last_call_s}") + args("elastic"),
        work / "node0.log",
        env,
    )
    other = start(  # a client of the host's store: it retries until the host listens
        elastic(port, "1:2", 1, 2, rdzv_id, f"is_host=0,last_call_timeout={last_call_s}") + args("elastic"),
        work / "node1.log",
        env,
    )
    ref_log = work / "reference.log"
    ref = start(torchrun(2, *args("reference", "--set", "train.stop_at=2")), ref_log, run_env())
    ref2: subprocess.Popen | None = None
    try:
        complete = work / "runs" / "elastic" / "checkpoints" / "step_00000002" / "COMPLETE"
        wait_for(complete.is_file, host, timeout_s, "the step-2 checkpoint of the 2-node job")
        pids = work / "pids"
        result["world_before"] = len(list(pids.glob("attempt0.rank*.pid")))
        if result["world_before"] != 2:
            raise SoakError(
                f"the first rendezvous closed with {result['world_before']} node(s): raise last_call_timeout"
            )
        time.sleep(1.0)  # step 3 has started on both ranks (each of its batches sleeps 3 s)
        t_kill, result["kill_at"] = time.monotonic(), time.strftime("%H:%M:%S")
        killed = kill_tree(other.pid, signal.SIGKILL)
        other.wait()
        result["killed_pids"] = len(killed)
        # the reference's second leg runs while the survivor waits out the rendezvous and restarts
        finish(ref, ref_log, timeout_s, "reference, 2 ranks to step 2")
        ref2_log = work / "reference_1rank.log"
        ref2 = start(torchrun(1, *args("reference", "--resume", "auto")), ref2_log, run_env())
        finish(host, work / "node0.log", timeout_s, "the surviving agent")
        result["kill_to_end_s"] = round(time.monotonic() - t_kill, 1)
        finish(ref2, ref2_log, timeout_s, "reference, 1 rank from step 2")
    finally:
        for p in (host, other, ref, *([ref2] if ref2 is not None else [])):
            kill_tree(p.pid, signal.SIGKILL)
    result["total_s"] = round(time.monotonic() - t0, 1)
    result["load_after"] = uptime()
    log = (work / "node0.log").read_text()
    result["restarted_attempts"] = sorted(p.name for p in (work / "pids").glob("attempt[1-9]*.pid"))
    result["world_after"] = len([n for n in result["restarted_attempts"] if n.startswith("attempt1.")])
    # the survivor's timeline, from its log's HH:MM:SS stamps (to set against kill_at: the rendezvous wait included)
    for key, pattern in (("restart_line_at", "torchrun restart 1"), ("resumed_at", "resumed from")):
        stamps = [ln[:8] for ln in log.splitlines() if pattern in ln and re.match(r"\d\d:\d\d:\d\d", ln)]
        result[key] = stamps[0] if stamps else None
    result["restart_line"] = "torchrun restart 1" in log and "resuming run elastic" in log
    result["resharded"] = "saved on world size 2, ep_size 2" in log and "re-sharded" in log
    result["elastic_resume_line"] = "elastic resume at step 2" in log
    a, b = rows(work / "runs" / "reference"), rows(work / "runs" / "elastic")
    result["metrics"] = compare_rows(a, b)
    result["loss_max_rel_diff"] = max(
        (abs(x["train/loss"] - y["train/loss"]) / abs(x["train/loss"]) for x, y in zip(a, b, strict=False)),
        default=float("inf"),
    )
    pa = torch.load(work / "out" / "reference" / "probe.pt", weights_only=True)["pred"]
    pb = torch.load(work / "out" / "elastic" / "probe.pt", weights_only=True)["pred"]
    result["prediction_max_abs_diff"] = (pa - pb).abs().max().item()
    tag = f"step_{steps:08d}"
    result["final_tag"] = compare_tags(
        work / "runs" / "reference" / "checkpoints" / tag, work / "runs" / "elastic" / "checkpoints" / tag
    )
    result["passed"] = (
        result["world_after"] == 1
        and result["restart_line"]
        and result["resharded"]
        and result["metrics"]["steps_equal"]
        and [r["step"] for r in b] == list(range(1, steps + 1))
        and result["loss_max_rel_diff"] <= 1e-5
        and result["prediction_max_abs_diff"] <= 1e-4
        and not result["final_tag"]["missing_or_extra"]
        and result["final_tag"]["max_abs_diff"] <= 1e-4
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("soak", "fewer-nodes", "both"), default="soak")
    p.add_argument("--kills", type=int, default=8, help="worker kills over the soak run (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule and victims (default 0)")
    p.add_argument("--steps", type=int, default=60, help="training steps of each run (default 60)")
    p.add_argument("--ckpt-every", type=int, default=2, help="checkpoint interval in steps (default 2)")
    p.add_argument("--last-call", type=int, default=5, help="fewer-nodes: rendezvous last_call_timeout, s (5)")
    p.add_argument("--timeout", type=float, default=600, help="bound on each wait, s (default 600)")
    p.add_argument("--work", type=Path, default=None, help="work directory (default: a new temporary one)")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="nestor-soak-restart-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"work": str(work), "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}
    try:
        if args.mode in ("soak", "both"):
            result["soak"] = soak(work, args.kills, args.seed, args.steps, args.ckpt_every, args.timeout)
        if args.mode in ("fewer-nodes", "both"):
            result["fewer_nodes"] = fewer_nodes(work / "fewer", last_call_s=args.last_call, timeout_s=args.timeout)
    except SoakError as e:
        result["error"] = str(e)
        print(f"soak_restart: could not complete: {e}", file=sys.stderr)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if "error" in result:
        return 2
    return 0 if all(result[k]["passed"] for k in ("soak", "fewer_nodes") if k in result) else 1


if __name__ == "__main__":
    sys.exit(main())
