#!/usr/bin/env bash
# Idempotent set-up: a virtual environment (or the active one), a CPU build of torch where no
# GPU is present, then causalvdm in editable mode with its test extras. A second run takes seconds.
#   bash scripts/setup.sh          (scripts/demo.sh and scripts/test.sh run it first)
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,4p' "$0"; exit 0
fi
if [[ $# -gt 0 ]]; then
  echo "error: scripts/setup.sh takes no arguments, got: $* (see --help)" >&2; exit 2
fi
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0

if [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]]; then
  PY=python
else
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  PY=.venv/bin/python
fi
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    pip_install "torch==${TORCH_VERSION}"
  else
    # An unpinned or plain PyPI torch is the multi-GB CUDA stack; ask for the CPU wheel by its local
    # version label, which no CUDA wheel carries. First as pip is configured: a local wheel directory
    # (find-links) may hold it, and the configured index has its dependencies. Only then PyTorch's CPU
    # index, which pip would also ask for every dependency: where it cannot be reached, each of those
    # waits for a timeout (minutes in all), so the local wheel must not wait behind it.
    pip_install "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
      || pip_install --retries 1 --timeout 20 "torch==${TORCH_VERSION}+cpu" \
        --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi

# Reinstall only when the package metadata changed, so a second run is quick.
stamp=".venv-stamp"
digest=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$digest" ]] || ! "$PY" -c "import causalvdm" 2>/dev/null; then
  pip_install -e ".[test]"
  echo "$digest" > "$stamp"
fi
echo "causalvdm set up with $("$PY" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__)')"
