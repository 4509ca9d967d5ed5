#!/usr/bin/env bash
# Download, on a machine with network, the wheels a GPU machine without network needs to run causalvdm,
# into wheels/ (ignored by git; carry it to that machine, where tools/gpu_check.sh installs from it).
#
#     bash tools/gpu_wheels.sh [--python-version X.Y ...] [--platform TAG ...] [--dest wheels]
#
# The GPU machines come with their own CUDA torch and numpy, transformers (so huggingface-hub), safetensors, tqdm,
# tensorboard, matplotlib (so Pillow) and pytest. Missing there: mmengine, diffusers, av, sentencepiece
# and some small packages they need. Those are downloaded for the GPU machine's Python and platform, never torch
# or its CUDA libraries:
#   - the four packages themselves with --no-deps (mmengine would pull opencv-python, ~60 MB, which its config
#     loader never imports); diffusers pinned to 0.42.1, whose huggingface-hub bound (>=1.32,<3) the machine's own
#     hub meets (1.33.0 on the nvidia-h200 image, where 0.42.1 imports): a later diffusers may ask for a hub it
#     lacks, which --no-deps would not say;
#   - their other requirements that an image may lack, with their dependencies (addict, termcolor, yapf, rich,
#     importlib-metadata, requests, regex, filelock, pyyaml), which pull nothing large; tools/gpu_check.sh
#     installs only those not installed at all;
#   - setuptools and wheel (with packaging), so `pip install --no-index -e .` can build the project there.
# The GPU machine's Python is not known in advance, so the Python versions default to $PYVER (space-separated),
# else 3.11, 3.12 and 3.13. av and sentencepiece are pinned to the versions found for the first one, so av's
# abi3 wheel (35 MB) serves them all; the compiled small ones add about 3.5 MB per version.
# Platforms default to manylinux2014 and manylinux_2_28 x86_64 (recent av ships only the latter). Versions obey
# pyproject.toml's bounds; the folder stays under 64 MB (what the device tool carries).
set -euo pipefail
cd "$(dirname "$0")/.."

DIFFUSERS="diffusers==0.42.1"

pyvers=()
dest=wheels
platforms=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python-version) pyvers+=("$2"); shift 2 ;;
    --platform) platforms+=("$2"); shift 2 ;;
    --dest) dest="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ ${#pyvers[@]} -gt 0 ]] || read -ra pyvers <<< "${PYVER:-3.11 3.12 3.13}"
[[ ${#platforms[@]} -gt 0 ]] || platforms=(manylinux2014_x86_64 manylinux_2_28_x86_64)

if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
platform_args=()
for p in "${platforms[@]}"; do platform_args+=(--platform "$p"); done
download() {  # download PYTHON_VERSION PIP_ARGS...
  local version=$1
  shift
  "$PY" -m pip download --quiet --disable-pip-version-check --dest "$dest" --only-binary=:all: \
    --python-version "$version" "${platform_args[@]}" "$@"
}
# The requirement of a package in pyproject.toml's dependencies (its version bound).
spec() {
  "$PY" -c 'import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(d for d in deps if re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() == sys.argv[1].lower()))' "$1"
}
# The version of a package's wheel in $dest (from its file name: name-version-...).
downloaded() { find "$dest" -maxdepth 1 -iname "$1-*.whl" -printf '%f\n' | head -1 | cut -d- -f2; }

mkdir -p "$dest"
av="$(spec av)" sentencepiece="$(spec sentencepiece)"
for pyver in "${pyvers[@]}"; do
  download "$pyver" --no-deps "$(spec mmengine)" "$DIFFUSERS" "$av" "$sentencepiece"
  av="av==$(downloaded av)" sentencepiece="sentencepiece==$(downloaded sentencepiece)"
  download "$pyver" addict termcolor yapf rich importlib-metadata requests regex filelock pyyaml
  download "$pyver" setuptools wheel
done

# Belt and braces: none of the above depends on torch, but the GPU machine's torch must never be replaced.
rm -f "$dest"/torch-*.whl "$dest"/nvidia_*.whl "$dest"/triton-*.whl
ls -l "$dest"/*.whl | awk '{printf "%8.1f MB  %s\n", $5 / 2^20, $NF}'
echo "$(ls "$dest"/*.whl | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest/ for Python ${pyvers[*]} on ${platforms[*]}"
