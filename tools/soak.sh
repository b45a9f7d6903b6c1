#!/usr/bin/env bash
# Soak test of preemption and resume (issue 11): N random interruptions of a 2-rank run, then the final weights
# and metrics.jsonl must equal an uninterrupted run's.
#
#   tools/soak.sh [--cycles 20] [--steps 60] [--work DIR] [--launcher torchrun|deepspeed] [--seed S]
#
# Each cycle starts `train.py --resume auto`, waits until a random number of new steps are in metrics.jsonl,
# then does one of: kill -9 of one rank, kill -9 of the launcher and every rank, SIGTERM to the launcher and every
# rank (preemption: checkpoint at the next step boundary), SIGTERM to the launcher only. The run ends early when
# it reaches --steps (1-3 new steps per cycle: keep --steps >= 3 x --cycles). Checkpoints every 3 steps
# so that kills land before, during and after saves. After the cycles, the run is resumed to the end and
# compared with an uninterrupted reference run of the same config: the same steps in metrics.jsonl with
# values within 1e-6 relative (loss, lr, grad norm; timing columns excluded; the bar of
# tests/test_train.py::test_resume_reproduces_the_uninterrupted_run), and the final weights bit for bit.
# Needs the tiny test shards: built under DIR on first use. Exit 0 = equal, 1 = different, 2 = usage/setup.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CYCLES=20 STEPS=60 WORK=${TMPDIR:-/tmp}/nestor-soak LAUNCHER=torchrun SEED=$RANDOM
while [ $# -gt 0 ]; do
  case "$1" in
    --cycles) CYCLES=$2; shift 2;; --steps) STEPS=$2; shift 2;; --work) WORK=$2; shift 2;;
    --launcher) LAUNCHER=$2; shift 2;; --seed) SEED=$2; shift 2;;
    -h|--help) sed -n '2,15p' "$0"; exit 0;;
    *) echo "soak.sh: unknown argument $1 (see --help)" >&2; exit 2;;
  esac
done
RANDOM=$SEED
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
PY=${PYTHON:-python3}

# config + ds_config, from the test fixtures (tiny NESTOR, expert parallel, ZeRO-2, no MLflow)
CFG=$($PY - "$WORK" "$STEPS" <<'PYEOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from train_fixtures import build_tiny_shards, ds_config, tiny_config
work, steps = Path(sys.argv[1]), int(sys.argv[2])
shards = build_tiny_shards(work)
cfg = tiny_config(work, shards, model={"moe": {"backend": "local"}},
                  train={"max_steps": steps, "ckpt_every": 3, "keep_last": 2, "eval_every": 0, "input_noise": 5e-4},
                  tracking={"enabled": False})
print(cfg, ds_config(work))
PYEOF
)
read -r CONFIG DS <<<"$CFG"

launch() {  # launch RUN_NAME [extra args...] -> background job, pid in $JOB
  local name=$1; shift
  local port=$((20000 + RANDOM % 20000))
  if [ "$LAUNCHER" = deepspeed ]; then
    set -m; deepspeed --num_gpus 2 --master_port $port --module nestor_ds.train --ds_config "$DS" --config "$CONFIG" \
      --run-name "$name" "$@" >>"$WORK/$name.log" 2>&1 & JOB=$!; set +m
  else
    set -m; $PY -m torch.distributed.run --nproc_per_node 2 --master_port $port -m nestor_ds.train --ds_config "$DS" \
      --config "$CONFIG" --run-name "$name" "$@" >>"$WORK/$name.log" 2>&1 & JOB=$!; set +m
  fi
}
steps_done() { [ -f "$WORK/runs/$1/metrics.jsonl" ] && wc -l <"$WORK/runs/$1/metrics.jsonl" || echo 0; }
descendants() {  # all processes below $1 (torchrun starts its workers in their own sessions: not in our group)
  local c; for c in $(pgrep -P "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done; }
ranks_of() { local p; for p in $(descendants "$1"); do
  tr '\0' ' ' </proc/$p/cmdline 2>/dev/null | grep -q "nestor_ds.train" &&
    ! tr '\0' ' ' </proc/$p/cmdline | grep -q "torch.distributed.run\|deepspeed.launcher\|bin/deepspeed" && echo "$p"
  done; return 0; }  # status 0 even when the last process is no rank: `set -e` must not end the soak here

rm -rf "$WORK/runs/soak" "$WORK/runs/ref" "$WORK/soak.log" "$WORK/ref.log"
echo "soak.sh: reference run ($STEPS steps, $LAUNCHER, seed $SEED)"
launch ref; wait "$JOB"

for i in $(seq 1 "$CYCLES"); do
  before=$(steps_done soak)
  [ "$before" -ge "$STEPS" ] && break
  target=$((before + 1 + RANDOM % 3))
  action=$((RANDOM % 4))
  launch soak --resume auto
  for _ in $(seq 1 1200); do  # bounded: 10 min
    [ "$(steps_done soak)" -ge "$target" ] || ! kill -0 "$JOB" 2>/dev/null && break
    sleep 0.5
  done
  job=("$JOB" $(descendants "$JOB"))
  case $action in
    0) what="kill -9 one rank"; victim=$(ranks_of "$JOB" | head -1 || true); [ -n "$victim" ] && kill -9 "$victim" || what="$what (none left)";;
    1) what="kill -9 the launcher and every rank"; kill -9 "${job[@]}" 2>/dev/null || true;;
    2) what="SIGTERM to the launcher and every rank"; kill -TERM "${job[@]}" 2>/dev/null || true;;
    3) what="SIGTERM to the launcher only"; kill -TERM "$JOB" 2>/dev/null || true;;
  esac
  for _ in $(seq 1 600); do  # bounded: 5 min for a checkpoint and a clean stop
    alive=0; for p in "${job[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.5
  done
  [ $alive = 1 ] && echo "soak.sh: cycle $i: processes still alive 5 min after '$what': killed" && { kill -9 "${job[@]}" 2>/dev/null || true; }
  wait "$JOB" 2>/dev/null || true
  echo "soak.sh: cycle $i: $what at step >= $target (metrics rows now $(steps_done soak))"
done
echo "soak.sh: final resume to step $STEPS"
launch soak --resume auto; wait "$JOB" || { echo "soak.sh: final resume failed (see $WORK/soak.log)"; exit 1; }

$PY - "$WORK/runs/ref" "$WORK/runs/soak" <<'PYEOF'
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
from nestor_ds.checkpoint.load import load_local_state
ref, soak = (Path(p) for p in sys.argv[1:3])
def rows(run):
    return [{k: v for k, v in json.loads(l).items() if not k.startswith("perf/")}
            for l in (run / "metrics.jsonl").read_text().splitlines()]
def rel(x, y):
    return abs(x - y) / max(abs(x), 1e-30)
a, b = rows(ref), rows(soak)
worst_m = max((rel(r[k], s[k]) for r, s in zip(a, b) for k in r if k != "step"), default=0.0)
same_steps = [r["step"] for r in a] == [s["step"] for s in b]
print(f"soak.sh: metrics.jsonl {len(a)} vs {len(b)} rows, steps {'equal' if same_steps else 'DIFFER'}, "
      f"largest relative difference {worst_m:.3g}")
wa, _, _ = load_local_state(ref / "checkpoints")
wb, _, _ = load_local_state(soak / "checkpoints")
worst_w = max(((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if k in wb), default=0.0)
print(f"soak.sh: weights {len(wa)} vs {len(wb)} tensors, largest absolute difference {worst_w:.3g}")
ok = same_steps and worst_m <= 1e-6 and set(wa) == set(wb) and worst_w == 0.0
print("soak.sh: PASS: resumed run equals the uninterrupted run" if ok else "soak.sh: FAIL")
sys.exit(0 if ok else 1)
PYEOF
