#!/usr/bin/env bash
# Launch training (causalvdm-train, i.e. causalvdm.cli.train) through torchrun: one process per listed GPU id, or
# one CPU process when none.
#   bash scripts/train.sh <config> [exp_name] [master_port] [gpu_ids] [causalvdm-train flags...]
#   bash scripts/train.sh configs/ucf101/xl2_256.py ucf 29500 0,1,2,3 --resume auto
# Multi-node: set NNODES, NODE_RANK and MASTER_ADDR on every node (torchrun's static rendezvous).
# CPU only: NPROC_PER_NODE=2 runs two gloo processes (useful for testing DDP/FSDP2 on one machine).
# Paths (the config, --resume, train.outputs_dir) are the caller's: this script does not change folder.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,8p' "$0"; exit 0
fi
config=$1; shift
positional=()
while [[ $# -gt 0 && ${#positional[@]} -lt 3 && "$1" != --* ]]; do positional+=("$1"); shift; done
exp_name=${positional[0]:-$(basename "$config" .py)}
master_port=${positional[1]:-29500}
gpu_ids=${positional[2]:-}

if [[ -n "$gpu_ids" ]]; then
  export CUDA_VISIBLE_DEVICES=$gpu_ids CAUSALVDM_GPU_IDS=$gpu_ids  # the trainer refuses GPU ids without a GPU
  nproc=$(awk -F, '{print NF}' <<< "$gpu_ids")
else
  nproc=${NPROC_PER_NODE:-1}
fi
PY=python
if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" && -x "$root/.venv/bin/python" ]]; then PY="$root/.venv/bin/python"; fi

exec "$PY" -m causalvdm.cli.launch \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$master_port" \
  --nproc_per_node "$nproc" \
  -m causalvdm.cli.train "$config" --exp-name "$exp_name" "$@"
