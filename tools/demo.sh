#!/usr/bin/env bash
# End-to-end demo on built-in data: generate PDE files -> build shards -> 2-rank DeepSpeed pre-training
# (ZeRO-2, expert-parallel token experts) -> fine-tune on an unseen dataset -> evaluation -> MLflow.
# Usage: bash tools/demo.sh [--help]     (environment: RANKS=2, STEPS=<pre-training steps>)
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}"
export PYTHONUNBUFFERED=1
RANKS="${RANKS:-2}"
STEPS_ARGS=(); [[ -n "${STEPS:-}" ]] && STEPS_ARGS=(--set "train.max_steps=$STEPS")
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
start=$SECONDS

step "1/6 generate demo PDE data (demo/raw)"
if [[ ! -f demo/raw/.complete ]]; then
  python -m nestor_ds.synth --demo demo/raw
  python -m nestor_ds.synth --pde ns --layout pdearena-ns --n 16 --res 64 --steps 16 --seed 7 --split train \
    --out demo/raw/NavierStokes2D_train_7_0.5.h5
  python -m nestor_ds.synth --pde ns --layout pdearena-ns --n 4 --res 64 --steps 16 --seed 8 --split test \
    --out demo/raw/NavierStokes2D_test_8_0.5.h5
  touch demo/raw/.complete
else echo "demo/raw already generated"; fi

step "2/6 build WebDataset shards (shards/)"
build() { # name input [input ...]
  local name=$1; shift
  if [[ -f "shards/$name/manifest.json" ]]; then echo "shards/$name already built"; return; fi
  python -m nestor_ds.shards --input "$@" --out "shards/$name" --name "$name" --test-fraction 0.2
}
build ns2d_fno_demo demo/raw/ns_V1e-3_N24_T20.mat
build dr_pdb_demo demo/raw/2D_diff-react_NA_NA.h5
build swe_pdb_demo demo/raw/2D_rdb_NA_NA.h5
build cfd_pdb_demo demo/raw/2D_CFD_Rand_M0.1_Eta0.01_Zeta0.01_periodic_64_Train.hdf5
build ns2d_pda_demo demo/raw/NavierStokes2D_train_7_0.5.h5 demo/raw/NavierStokes2D_test_8_0.5.h5

step "3/6 pre-train NESTOR on $RANKS ranks (ZeRO-2, expert parallel)"
deepspeed --num_gpus "$RANKS" --module nestor_ds.train --ds_config ds_configs/zero2.json \
  --config configs/pretrain_demo.yaml --run-name demo-pretrain --resume auto --set tracking.register_model=nestor-demo \
  --set model.moe.ep_size="$(( RANKS % 2 == 0 ? 2 : 1 ))" \
  ${STEPS_ARGS[@]+"${STEPS_ARGS[@]}"}

step "4/6 export the expert-parallel checkpoint to one safetensors file"
python -m nestor_ds.checkpoint --checkpoint runs/demo-pretrain/checkpoints --out runs/demo-pretrain/nestor-demo.safetensors

step "5/6 fine-tune on an unseen 3-channel dataset (1 rank, another ep_size)"
python -m nestor_ds.finetune --ds_config ds_configs/zero2.json --config configs/finetune_demo.yaml \
  --pretrained runs/demo-pretrain/checkpoints --run-name demo-finetune --resume auto \
  --set tracking.register_model=nestor-demo-finetune

step "6/6 evaluate (one-step and rollout L2RE, energy spectra)"
python -m nestor_ds.evaluate --checkpoint runs/demo-pretrain/nestor-demo.safetensors \
  --data shards/ns2d_fno_demo shards/dr_pdb_demo shards/swe_pdb_demo shards/cfd_pdb_demo \
  --rollout-steps 8 --out runs/demo-pretrain/eval_report.json
python -m nestor_ds.tracking.compare --experiment nestor-ds-demo --run demo-pretrain --run demo-finetune || true

printf '\nDone in %d s.\n' $((SECONDS - start))
echo "Runs and checkpoints:  runs/demo-pretrain, runs/demo-finetune (report: runs/demo-pretrain/eval_report.json)"
echo "Registered models:     models:/nestor-demo/latest, models:/nestor-demo-finetune/latest (docs/review_runs.md)"
echo "Open MLflow:           mlflow ui --backend-store-uri ${MLFLOW_TRACKING_URI} --host 127.0.0.1  -> http://127.0.0.1:5000"
