"""Two "nodes" on one host, started as the real launchers start them (docs/multinode.md).

Each node is its own launcher process on 127.0.0.1 (loopback only): ``torchrun --nnodes 2 --node_rank i`` with a static
rendezvous, or ``deepspeed --hostfile H --no_ssh --node_rank i``. Every run trains the tiny NESTOR on one global batch
sequence (tests/scripts/node_probe.py wraps probe_train.py), so N nodes x R ranks must reproduce 1 node x N*R ranks
exactly (the one-node references are forked with torchrun's environment: tests/fork_ranks.py). The pdsh/ssh path (the
README's command as written) needs sshd and pdsh: tools/multinode_ssh.sh.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nestor_ds.procs import free_port, kill_tree

from train_fixtures import REPO, build_tiny_shards, ds_config, tiny_config

PROBE = str(REPO / "tests" / "scripts" / "node_probe.py")
STEPS = 4  # checkpoints at 2 and 4: the node-loss test kills after the first and resumes from it
RUN_TIMEOUT = 600  # a loaded 2-core CI machine runs 4 CPU ranks slowly; a hang still fails


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("multinode")
    shards = build_tiny_shards(root)
    cfg = tiny_config(
        root,
        shards,
        model={"moe": {"ep_size": "auto"}},
        # one thread per rank everywhere: threads default to cores / ranks per node, and another intra-op split
        # changes float sums in the last bit
        train={"max_steps": STEPS, "ckpt_every": 2, "collective_timeout_s": 25, "threads_per_rank": 1},
    )
    return {"root": root, "cfg": cfg, "ds": ds_config(root, stage=2, micro=1), "runs": {}}


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "GLOO_SOCKET_IFNAME": "lo",  # the test's "network": loopback only
        **(extra or {}),
    }


def node_commands(launcher: str, nodes: int, ranks: int, args: list[str], hostfile: Path) -> list[list[str]]:
    """One launcher command per node, as a cluster would run them, all on 127.0.0.1."""
    port = str(free_port())
    if launcher == "torchrun":
        run = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", str(ranks)]
        return [
            [*run, "--node_rank", str(i), "--master_addr", "127.0.0.1", "--master_port", port, PROBE, *args]
            for i in range(nodes)
        ]
    hostfile.write_text("".join(f"node{i} slots={ranks}\n" for i in range(nodes)))
    ds = [str(Path(sys.executable).with_name("deepspeed")), "--hostfile", str(hostfile), "--no_ssh"]
    return [
        [*ds, "--node_rank", str(i), "--master_addr", "127.0.0.1", "--master_port", port, PROBE, *args]
        for i in range(nodes)
    ]


def start_nodes(
    work: dict, name: str, launcher: str, nodes: int, ranks: int, *extra: str, env: dict[str, str] | None = None
) -> list[subprocess.Popen]:
    """Start each node's launcher in its own session (a node dies as a whole); logs: <root>/<name>.node<i>.log."""
    out = work["root"] / "out" / name
    args = [
        "--config",
        str(work["cfg"]),
        "--ds_config",
        str(work["ds"]),
        "--global-batch",
        "4",
        "--out",
        str(out),
        "--run-name",
        name,
        *extra,
    ]
    procs = []
    for i, cmd in enumerate(node_commands(launcher, nodes, ranks, args, work["root"] / f"{name}.hostfile")):
        log = open(work["root"] / f"{name}.node{i}.log", "a")
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=_env(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
    return procs


def wait_nodes(work: dict, name: str, procs: list[subprocess.Popen], timeout: float = RUN_TIMEOUT) -> list[str]:
    """Each node's exit status (asserted 0) and its log."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            kill_tree(p.pid, signal.SIGKILL)
    logs = [(work["root"] / f"{name}.node{i}.log").read_text() for i in range(len(procs))]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"{name} node {i} exited {p.returncode}:\n{logs[i][-4000:]}"
    return logs


def train(work: dict, name: str, launcher: str, nodes: int, ranks: int, *extra: str) -> dict:
    """A run to its end: losses, probe output, final module weights, logs."""
    logs = wait_nodes(
        work,
        name,
        start_nodes(
            work, name, launcher, nodes, ranks, *extra, env={"NODE_PROBE_SHARES": str(work["root"] / "shares" / name)}
        ),
    )
    return result(work, name, logs)


def train_one_node(work: dict, name: str, ranks: int, *extra: str) -> dict:
    """The one-node reference: ``ranks`` ranks with torchrun's environment, forked from a warm process
    (tests/fork_ranks.py; the launchers themselves are what the multi-node runs test)."""
    from fork_ranks import fork_ranks

    args = ["--config", str(work["cfg"]), "--ds_config", str(work["ds"]), "--global-batch", "4",
            "--out", str(work["root"] / "out" / name), "--run-name", name, *extra]  # fmt: skip
    env = _env({"NODE_PROBE_SHARES": str(work["root"] / "shares" / name)})
    proc = fork_ranks("path", PROBE, args, ranks, REPO, env, RUN_TIMEOUT)
    log = proc.stdout + proc.stderr
    (work["root"] / f"{name}.node0.log").write_text(log)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{log[-4000:]}"
    return result(work, name, [log])


def result(work: dict, name: str, logs: list[str]) -> dict:
    out = work["root"] / "out" / name
    tag = work["root"] / "runs" / name / "checkpoints" / f"step_{STEPS:08d}"
    weights = {}
    for f in sorted(tag.glob("*model_states.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)
        module = state.get("module", state)  # expert files (ep_size > 1) hold the experts' tensors directly
        weights.update({f"{f.name}:{k}": v for k, v in module.items()})
    return {
        "losses": json.loads((out / "losses.json").read_text()),
        "probe": torch.load(out / "probe.pt"),
        "weights": weights,
        "logs": logs,
        "tag": tag,
    }


def assert_same_run(a: dict, b: dict) -> None:
    """Same world size, same ranks, same order of reductions: bit-identical losses, outputs and weights."""
    assert len(a["losses"]) == len(b["losses"]) == STEPS
    assert a["losses"] == b["losses"]
    assert torch.equal(a["probe"]["pred"], b["probe"]["pred"])
    assert a["weights"].keys() == b["weights"].keys() and a["weights"]
    for k, v in a["weights"].items():
        assert torch.equal(v, b["weights"][k]), k


def logged_ep_size(logs: list[str]) -> int:
    line = next(ln for log in logs for ln in log.splitlines() if "ep_size" in ln and "world size" in ln)
    return int(line.split("ep_size")[1].split(",")[0])


def mlflow_runs(work: dict, name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work['root'] / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, filter_string=f"tags.mlflow.runName = '{name}'")


def test_torchrun_two_nodes_by_one_rank_match_one_node(work: dict) -> None:
    """2 x 1 ranks (torchrun, static rendezvous) against 1 x 2 (forked): same losses, outputs, weights; ep_size auto
    stays inside a node (1 rank per node: ep 1, asked explicitly of the one-node run)."""
    one = train_one_node(work, "t1x2", 2, "--set", "model.moe.ep_size=1")
    two = train(work, "t2x1", "torchrun", 2, 1)
    work["runs"]["t2x1"] = two
    assert logged_ep_size(two["logs"]) == 1
    assert_same_run(one, two)


def test_deepspeed_launcher_two_nodes_by_two_ranks_match_one_node(work: dict) -> None:
    """2 x 2 ranks (DeepSpeed launcher, hostfile, --no_ssh) against 1 x 4 (forked): identical; ep_size auto reads
    the launcher's LOCAL_SIZE (2 experts per group, never across nodes); every training sample in exactly one rank's
    share; one MLflow run; one checkpoint tag holding every rank's files, listed in its COMPLETE marker."""
    one = train_one_node(work, "d1x4", 4, "--set", "model.moe.ep_size=2")
    two = train(work, "d2x2", "deepspeed", 2, 2)
    assert logged_ep_size(two["logs"]) == 2 and logged_ep_size(one["logs"]) == 2
    assert_same_run(one, two)

    shares = [json.loads(p.read_text()) for p in sorted((work["root"] / "shares" / "d2x2").glob("rank*.json"))]
    assert len(shares) == 4
    seen = [tuple(s) for share in shares for s in share]
    assert len(seen) == len(set(seen)), "a training sample is in two ranks' shares"
    manifests = {
        n: json.loads((work["root"] / "shards" / n / "manifest.json").read_text()) for n in ("ns_tiny", "dr_tiny")
    }
    for n, m in manifests.items():
        assert sum(1 for s in seen if s[0] == n) == m["splits"]["train"]["count"], n

    runs = mlflow_runs(work, "d2x2")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [
        m.step
        for m in __import__("mlflow")
        .tracking.MlflowClient(f"sqlite:///{work['root'] / 'mlflow.db'}")
        .get_metric_history(runs[0].info.run_id, "train/loss")
    ]
    assert sorted(steps) == list(range(1, STEPS + 1))

    marker = json.loads((two["tag"] / "COMPLETE").read_text())
    for r in range(4):
        assert f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" in marker["files"], r
    assert marker["files"] == {
        p.name: p.stat().st_size for p in two["tag"].iterdir() if p.is_file() and p.name != "COMPLETE"
    }


def test_lost_node_ends_the_job_quickly_and_resume_loses_nothing(work: dict) -> None:
    """kill -9 of node 1 (launcher and ranks at once) right after the step-2 checkpoint, while step 3 runs: node 0's
    rank exits by itself within collective_timeout_s (25 s) plus a generous 150 s for a loaded machine, with one line
    naming the lost peer; no tag beyond step 2 is complete; the MLflow run is FAILED. Both nodes restarted with
    --resume auto end with the uninterrupted run's weights."""
    if "t2x1" not in work["runs"]:
        pytest.skip("needs the uninterrupted 2 x 1 run of the first test")
    name = "lost"
    procs = start_nodes(work, name, "torchrun", 2, 1, env={"NODE_PROBE_SLOW": "2:4"})
    ckpts = work["root"] / "runs" / name / "checkpoints"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (ckpts / "step_00000002" / "COMPLETE").is_file():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no step-2 checkpoint"
        time.sleep(0.2)
    time.sleep(1.0)  # step 3 has started on both nodes (each of its batches takes 4 s)
    kill_tree(procs[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    procs[0].wait(timeout=25 + 150)
    elapsed = time.monotonic() - killed_at
    log = (work["root"] / f"{name}.node0.log").read_text()
    assert procs[0].returncode != 0, log[-3000:]
    lines = [ln for ln in log.splitlines() if "lost peer" in ln]
    assert lines and "rank 1" in lines[0] and "node 1" in lines[0], log[-3000:]
    assert [t.name for t in ckpts.iterdir() if (t / "COMPLETE").is_file()] == ["step_00000002"]
    runs = mlflow_runs(work, name)
    assert len(runs) == 1 and runs[0].info.status in ("FAILED", "KILLED")
    print(f"surviving node exited {elapsed:.1f} s after the kill")

    logs = wait_nodes(work, name, start_nodes(work, name, "torchrun", 2, 1, "--resume", "auto"))
    resumed = result(work, name, logs)
    assert any("resumed from" in ln and "step_00000002" in ln for log in logs for ln in log.splitlines())
    reference = work["runs"]["t2x1"]
    assert resumed["losses"] == reference["losses"][2:]
    for k, v in reference["weights"].items():
        assert torch.equal(v, resumed["weights"][k]), k
    assert mlflow_runs(work, name)[0].info.status == "FINISHED"
