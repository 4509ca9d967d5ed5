#!/usr/bin/env bash
# Serve a model live in the browser over the stream engine (causalvdm-serve, i.e. causalvdm.cli.serve; --help lists
# every flag). Listens on 127.0.0.1:8765; another --host needs --token.
#   bash scripts/serve.sh [<config>] --ckpt PATH [--clips MANIFEST] [--host H --token T] [--port P] [--max-rows N]
#        [--cache-dtype int8] [--compile]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PY=python
if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" && -x "$root/.venv/bin/python" ]]; then PY="$root/.venv/bin/python"; fi
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,5p' "$0"; echo; exec "$PY" -m causalvdm.cli.serve --help
fi
exec "$PY" -m causalvdm.cli.serve "$@"
