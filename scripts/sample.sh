#!/usr/bin/env bash
# Sample videos autoregressively with the shared KV cache (causalvdm-sample, i.e. causalvdm.cli.sample; --help lists every flag).
#   bash scripts/sample.sh [<config>] [--ckpt PATH] [--prompt TEXT] [--prompt-at FRAME TEXT ...] [--recache-on-switch]
#        [--first-image PATH | --first-video PATH --first-frames N]
#        [--num-frames N] [--out DIR] [--seed S] [--sampler NAME] [--num-steps N] [--cfg-scale X] [--mode cache|recompute]
#        [--dtype auto|float32|bfloat16|float16] [--compile [MODE]] [--manifest FILE] [--cfg-options k=v ...]
# NPROC_PER_NODE=N (> 1) runs N processes through torchrun; with --manifest they split the rows.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PY=python
if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" && -x "$root/.venv/bin/python" ]]; then PY="$root/.venv/bin/python"; fi
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,7p' "$0"; echo; exec "$PY" -m causalvdm.cli.sample --help
fi
nproc=${NPROC_PER_NODE:-1}
if (( nproc > 1 )); then
  exec "$PY" -m causalvdm.cli.launch --standalone --nproc_per_node "$nproc" -m causalvdm.cli.sample "$@"
fi
exec "$PY" -m causalvdm.cli.sample "$@"
