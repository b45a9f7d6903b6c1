"""Start the ranks of a multi-rank test run by forking a process that has already imported torch, DeepSpeed and
MLflow, instead of a launcher that starts fresh interpreters.

Why: a tiny CPU training run spends ~80% of its CPU time importing (torch, DeepSpeed, which imports MLflow, torch's
compiler stack through the optimizer); on the 2-core CI machine the suite's ~100 rank processes paid that again and
again. Tests of what a launcher does (torchrun's restarts, the DeepSpeed launcher's hostfile, signals to a launcher,
several "nodes") keep the real launchers (tests/test_multinode.py, test_restart.py, test_reliability.py); everything
else that only needs N ranks running the real entry gets them from here, as torchrun would set them up: RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT (env:// rendezvous, rank 0 hosts the store).

The server is one process per test process, started on first use. It never runs torch code itself (no OpenMP pool,
no process group, no threads of its own), so its children start as clean as a fresh interpreter would, only warm.
Each rank is its own process and session; its stdout and stderr go to files the caller reads once all ranks ended.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from train_fixtures import outside_env

REPO = Path(__file__).resolve().parents[1]
PRELOAD = (
    "torch",
    "torch.distributed",
    "torch._dynamo",  # torch.optim imports it on the first optimizer
    "deepspeed",
    # DeepSpeed's ZeRO optimizer check imports its Muon optimizer, whose torch.compile decorators import Inductor
    # (about 2 s of CPU in every rank that builds a ZeRO engine)
    "deepspeed.runtime.zero.muon.muon_optimizer",
    "mlflow",
    "matplotlib.pyplot",
    "nestor_ds.train",
    "nestor_ds.finetune",
    "nestor_ds.engine.run_setup",
    "nestor_ds.tracking",
    "tests.scripts.probe_train",
)

_SERVER = r"""
import importlib, json, logging, os, runpy, sys
PROTO = os.fdopen(os.dup(1), "w", buffering=1)  # replies on their own fd: what imports print goes to stderr
os.dup2(2, 1)
os.environ["MPLBACKEND"] = "Agg"
for name in PRELOAD:
    importlib.import_module(name)
PROTO.write(json.dumps({"ready": os.getpid()}) + "\n")


def run_rank(req, rank, port):
    os.setsid()
    env = dict(req["env"])
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(req["ranks"]),
               LOCAL_WORLD_SIZE=str(req["ranks"]), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.clear()
    os.environ.update(env)
    os.chdir(req["cwd"])
    for fd, suffix in ((1, "out"), (2, "err")):
        f = os.open(f"{req['log']}.rank{rank}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    PROTO.close()
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    # our log lines name their rank (nestor_ds/log.py reads RANK when the handler is made, in this server: r0)
    for h in logging.getLogger("nestor_ds").handlers:
        if isinstance(h, logging.StreamHandler):
            h.setStream(sys.stderr)
            h.setFormatter(logging.Formatter(f"%(asctime)s [nestor-ds r{rank}] %(levelname)s %(message)s", "%H:%M:%S"))
    code = 1
    try:
        sys.argv = [req["target"], *req["args"]]
        if req["kind"] == "module":
            sys.modules.pop(req["target"], None)  # preloaded: run it afresh as __main__, as `python -m` would
            runpy.run_module(req["target"], run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(req["target"])))  # as `python script.py` does
            runpy.run_path(req["target"], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:
                pass
        os._exit(code)


for line in sys.stdin:
    req = json.loads(line)
    port = req["port"]
    pids = []
    for rank in range(req["ranks"]):
        pid = os.fork()
        if pid == 0:
            run_rank(req, rank, port)
        pids.append(pid)
    PROTO.write(json.dumps({"pids": pids}) + "\n")
    codes = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    PROTO.write(json.dumps({"codes": codes}) + "\n")
"""


class ForkServer:
    """One warm process that forks the ranks of each run (one run at a time)."""

    def __init__(self) -> None:
        env = outside_env()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        code = f"PRELOAD = {PRELOAD!r}\n{_SERVER}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
        )
        ready = self._read()
        assert "ready" in ready, ready
        self.lock = threading.Lock()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the fork server ended (exit {self.proc.wait()})")
        return json.loads(line)

    def run(
        self, kind: str, target: str, args: list[str], ranks: int, cwd: Path, env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess:
        """``target`` (a module, or a script path) on ``ranks`` ranks; stdout and stderr of all ranks, rank 0 first;
        exit status 0 when every rank ended with 0, else 1 (as torchrun)."""
        from nestor_ds.procs import free_port, kill_tree

        log = Path(cwd) / f".ranks-{os.getpid()}-{threading.get_ident()}"
        req = {"kind": kind, "target": target, "args": args, "ranks": ranks, "cwd": str(cwd), "env": env}
        req.update(port=free_port(), log=str(log))
        with self.lock:
            self.proc.stdin.write(json.dumps(req) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            pids = self._read()["pids"]
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                for pid in pids:
                    kill_tree(pid, 9)

            timer = threading.Timer(timeout, expire)
            timer.start()
            try:
                codes = self._read()["codes"]
            finally:
                timer.cancel()
        outs, errs = [], []
        for rank in range(ranks):
            for parts, suffix in ((outs, "out"), (errs, "err")):
                f = Path(f"{log}.rank{rank}.{suffix}")
                parts.append(f.read_text(errors="replace") if f.exists() else "")
                f.unlink(missing_ok=True)
        if expired.is_set():
            raise subprocess.TimeoutExpired([target, *args], timeout, "".join(outs), "".join(errs))
        code = 0 if all(c == 0 for c in codes) else 1  # as torchrun: 1 when any rank failed
        return subprocess.CompletedProcess([target, *args], code, "".join(outs), "".join(errs))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_server: ForkServer | None = None


def fork_ranks(
    kind: str, target: str, args: list[str], ranks: int, cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """Run on the test process's fork server (started on first use, ended at exit)."""
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = ForkServer()
        atexit.register(_server.close)
    return _server.run(kind, target, args, ranks, cwd, env, timeout)
