#!/usr/bin/env bash
# DeepSpeed's default multi-node path, run for real on one host: the `deepspeed --hostfile` command of the README
# starts one launcher per "node" through pdsh over ssh. The two nodes are ssh host aliases (node0, node1) of
# 127.0.0.1, served by an sshd this script starts on a free loopback port with keys it generates; nothing listens
# beyond loopback and nothing outside a temporary directory is changed (ssh gets its own config through pdsh's
# PDSH_SSH_ARGS_APPEND; the environment file through DS_ENV_FILE). Needs: openssh-server, pdsh (Debian packages).
# Trains the tiny NESTOR for 4 steps on 2 nodes x 1 rank, then on 1 node x 2 ranks with torchrun, and compares
# the per-step losses of metrics.jsonl (same ranks, one thread each: they must be equal). Exit 0 = PASS.
#
#   tools/multinode_ssh.sh [WORKDIR]        (about 2 minutes on a loaded 2-core machine)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
T=${1:-$(mktemp -d /tmp/nestor-multinode-ssh.XXXXXX)}
mkdir -p "$T"
PY=$(command -v python3)
for tool in /usr/sbin/sshd pdsh ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install -y openssh-server pdsh)" >&2; exit 2; }
done
PORT=$("$PY" -c 'from nestor_ds.procs import free_port; print(free_port())')
MPORT=$("$PY" -c 'from nestor_ds.procs import free_port; print(free_port())')

# sshd on 127.0.0.1:$PORT, key login only, for this user
ssh-keygen -q -t ed25519 -N '' -f "$T/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$T/id"
cp "$T/id.pub" "$T/authorized_keys"
cat > "$T/sshd_config" <<CFG
Port $PORT
ListenAddress 127.0.0.1
HostKey $T/host_key
AuthorizedKeysFile $T/authorized_keys
PidFile $T/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
CFG
mkdir -p /run/sshd
/usr/sbin/sshd -f "$T/sshd_config" -E "$T/sshd.log"
trap 'kill "$(cat "$T/sshd.pid" 2>/dev/null)" 2>/dev/null || true' EXIT
cat > "$T/ssh_config" <<CFG
Host node0 node1
  HostName 127.0.0.1
  Port $PORT
  User $(id -un)
  IdentityFile $T/id
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
CFG
ssh -F "$T/ssh_config" node1 true  # fails here, with ssh's message, if the login does not work

# tiny shards and config (the tests' fixtures)
"$PY" - "$T" <<'PY'
import sys
from pathlib import Path
from tests.train_fixtures import build_tiny_shards, ds_config, tiny_config
root = Path(sys.argv[1])
shards = build_tiny_shards(root)
cfg = tiny_config(root, shards, train={"max_steps": 4, "ckpt_every": 2, "threads_per_rank": 1})
cfg.rename(root / "run.yaml")
ds_config(root, stage=2, micro=1).rename(root / "ds.json")
PY
printf 'node0 slots=1\nnode1 slots=1\n' > "$T/hostfile"
# what reaches the remote shells besides MLFLOW*/PYTHON*: this file (DeepSpeed's .deepspeed_env, renamed)
cat > "$T/deepspeed_env" <<ENV
TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}
OMP_NUM_THREADS=1
GLOO_SOCKET_IFNAME=lo
ENV
export DS_ENV_FILE="$T/deepspeed_env" PDSH_SSH_ARGS_APPEND="-F $T/ssh_config" PYTHONUNBUFFERED=1
start=$(date +%s)
# the README's command; --no_ssh_check because DeepSpeed's own ssh check does not take pdsh's ssh arguments
deepspeed --hostfile "$T/hostfile" --no_ssh_check --master_addr 127.0.0.1 --master_port "$MPORT" \
  --module nestor_ds.train --ds_config "$T/ds.json" --config "$T/run.yaml" --run-name ssh2x1 2>&1 | tee "$T/ssh.log"
echo "pdsh/ssh run: $(( $(date +%s) - start )) s"
OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \
  --master_port "$("$PY" -c 'from nestor_ds.procs import free_port; print(free_port())')" \
  -m nestor_ds.train --ds_config "$T/ds.json" --config "$T/run.yaml" --run-name ref1x2 > "$T/ref.log" 2>&1
"$PY" - "$T" <<'PY'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1]) / "runs"
def losses(name):
    return [json.loads(l)["train/loss"] for l in (runs / name / "metrics.jsonl").read_text().splitlines()]
a, b = losses("ssh2x1"), losses("ref1x2")
log = (Path(sys.argv[1]) / "ssh.log").read_text()
assert "world size 2" in log, "the pdsh run did not form a world of 2"
assert len(a) == 4 and a == b, f"losses differ: {a} vs {b}"
print(f"PASS: pdsh/ssh 2 nodes x 1 rank == torchrun 1 node x 2 ranks, losses {a}")
PY
