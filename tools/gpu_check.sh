#!/usr/bin/env bash
# One call on a fresh GPU machine without network (under 8 minutes): environment facts, install from wheels/
# (made by tools/gpu_wheels.sh on a networked machine) without touching the machine's torch, the CUDA tests,
# the paper-setting inference benchmark eager then compiled, and XL/2 training throughput with gradient
# checkpointing on and off; every figure goes into one JSON, printed at the end.
#
#     bash tools/gpu_check.sh          # writes $OUT/gpu_check.json if OUT is set, else outputs/gpu_check/gpu_check.json
#
# Each step runs under its own timeout, capped by what is left of a total budget (GPU_CHECK_BUDGET seconds,
# default 450), so one hang cannot eat the rest; its status (ok, failed, timeout, skipped), time and log
# (logs/<step>.log beside the JSON) are recorded. Without a CUDA device it runs what a CPU can: the facts, the
# install and import check, `pytest -m cuda` (reporting its skips) and tiny-config versions of the benchmarks,
# and says what it skipped. Exit status 0 when no step failed. The Python is $PYTHON, else .venv/bin/python,
# else python, else python3.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

OUT="${OUT:-outputs/gpu_check}"
LOGS="$OUT/logs"
mkdir -p "$LOGS"
rm -f "$OUT"/{env,ar_eager,ar_compiled,train,gpu_check}.json  # a failed step must not leave an older run's figures
: > "$OUT/steps.tsv"
BUDGET="${GPU_CHECK_BUDGET:-450}"
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
else PY=$(command -v python || command -v python3)
fi
if [[ $PY == */* && $PY != /* ]]; then PY=$ROOT/$PY; fi  # absolute, as one check runs from /
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # causalvdm imports even if the editable install failed

say() { echo "[gpu_check] $*"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUT/steps.tsv"; }  # name status seconds note

# step NAME CAP_SECONDS CMD...: run CMD under a timeout of min(CAP, budget left), output to logs/NAME.log.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - SECONDS - 15))  # 15 s kept for the merge
  if ((left < 20)); then
    record "$name" skipped 0 "out of the ${BUDGET} s budget"
    say "$name: skipped, out of the ${BUDGET} s budget"
    return 1
  fi
  local limit=$((cap < left ? cap : left)) start=$SECONDS rc=0
  echo "\$ $*" > "$LOGS/$name.log"
  timeout --kill-after=10 "$limit" "$@" >> "$LOGS/$name.log" 2>&1 || rc=$?
  local seconds=$((SECONDS - start)) status=ok
  if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status=failed; fi
  record "$name" "$status" "$seconds" "exit $rc, limit $limit s: $*"
  say "$name: $status in $seconds s (log: $LOGS/$name.log)"
  if [[ $status != ok ]]; then tail -n 15 "$LOGS/$name.log" | sed 's/^/    /'; fi
  [[ $status == ok ]]
}
skip() { record "$1" skipped 0 "$2"; say "$1: skipped: $2"; }

# Merge the facts, the step table and every benchmark JSON into gpu_check.json; print it.
finish() {
  "$PY" - "$OUT" "$SECONDS" <<'EOF'
import json, re, sys
from pathlib import Path

out, seconds = Path(sys.argv[1]), int(sys.argv[2])
steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, secs, note = line.split("\t", 3)
    steps[name] = dict(status=status, seconds=int(secs), note=note)


def read(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


report = dict(ok=all(s["status"] in ("ok", "skipped") for s in steps.values()), seconds=seconds,
              environment=read("env.json"), steps=steps,
              skipped={name: s["note"] for name, s in steps.items() if s["status"] == "skipped"})
log = out / "logs" / "pytest_cuda.log"
if log.is_file():  # pytest's closing line, e.g. "3 passed, 1 skipped, 170 deselected in 61.2s"
    counts = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)\b", log.read_text().splitlines()[-1])
    report["pytest_cuda"] = {kind: int(n) for n, kind in counts}
for name in ("ar_eager", "ar_compiled", "train"):
    data = read(f"{name}.json")
    if data is not None:
        report[name] = data
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
EOF
}

# ---- (a) environment facts
timeout 30 nvidia-smi -L > "$LOGS/nvidia-smi.log" 2>&1 || echo "nvidia-smi: not available" > "$LOGS/nvidia-smi.log"
step env 60 "$PY" - "$OUT/env.json" "$LOGS/nvidia-smi.log" <<'EOF'
import json, os, platform, sys
import torch

gpu = torch.cuda.is_available()
props = torch.cuda.get_device_properties(0) if gpu else None
facts = dict(
    python=platform.python_version(), executable=sys.executable, torch=torch.__version__,
    torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if gpu else None,
    cuda_available=gpu, device_count=torch.cuda.device_count() if gpu else 0,
    gpu_name=props.name if gpu else None, gpu_memory_gb=round(props.total_memory / 2**30, 1) if gpu else None,
    compute_capability=f"{props.major}.{props.minor}" if gpu else None,
    nvidia_smi=open(sys.argv[2]).read().strip().splitlines(), cpus=os.cpu_count(), platform=platform.platform())
with open(sys.argv[1], "w") as f:
    json.dump(facts, f, indent=2)
print(json.dumps(facts, indent=2))
EOF
if [[ ! -f "$OUT/env.json" ]]; then
  echo "error: python ($PY) with torch does not run here; see $LOGS/env.log" >&2
  finish > /dev/null
  exit 1
fi
torch_before=$("$PY" -c "import torch; print(torch.__version__)")
GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
say "python $PY, torch $torch_before, CUDA device: $([[ $GPU == 1 ]] && echo yes || echo no)"

# ---- (b) install from wheels/ without an index, only what is not installed at all, each without dependencies, so
# no installed package (torch above all) is replaced: the project (editable), then the packages of wheels/
# (setuptools, wheel and packaging are there only to build the project).
if [[ ! -d wheels ]]; then
  skip install "no wheels/ folder (make it with tools/gpu_wheels.sh on a networked machine and bring it)"
else
  # Asked from / without PYTHONPATH: the source tree's causalvdm.egg-info would otherwise count as installed.
  if (cd / && env -u PYTHONPATH "$PY" -c "import importlib.metadata as m; m.distribution('causalvdm')" 2>/dev/null); then
    skip install_project "causalvdm is installed already"
  else
    step install_project 120 "$PY" -m pip install --quiet --disable-pip-version-check --no-index --find-links wheels \
      --no-deps -e .
  fi
  missing=$("$PY" - <<'EOF'
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

names = sorted({p.name.split("-")[0] for p in Path("wheels").glob("*.whl")} - {"setuptools", "wheel", "packaging"})
absent = []
for name in names:
    try:
        distribution(name)
    except PackageNotFoundError:
        absent.append(name)
print(" ".join(absent))
EOF
  )
  if [[ -n $missing ]]; then
    # shellcheck disable=SC2086  # one argument per package name
    step install_deps 120 "$PY" -m pip install --quiet --disable-pip-version-check --no-index --find-links wheels \
      --no-deps $missing
  else
    skip install_deps "every package of wheels/ is installed already"
  fi
fi
torch_after=$("$PY" -c "import torch; print(torch.__version__)")
if [[ $torch_after != "$torch_before" ]]; then
  record torch_unchanged failed 0 "torch changed from $torch_before to $torch_after"
  echo "error: installing changed torch from $torch_before to $torch_after" >&2
  finish > /dev/null
  exit 1
fi
absent=$("$PY" - <<'EOF'
import importlib

absent = []
for module in ("mmengine", "diffusers", "av", "sentencepiece", "causalvdm"):
    try:
        importlib.import_module(module)
    except Exception as err:  # an ImportError, or a broken package failing at import
        absent.append(f"{module} ({type(err).__name__}: {err})".splitlines()[0])
print("; ".join(absent))
EOF
)
if [[ -n $absent ]]; then
  record imports failed 0 "cannot import: $absent"
  echo "error: cannot import $absent; run tools/gpu_wheels.sh (for this machine's Python) and bring wheels/" >&2
  finish > /dev/null
  exit 1
fi
record imports ok 0 "mmengine, diffusers, av, sentencepiece, causalvdm import"

# ---- (c) the CUDA tests (skipped, and so reported, without a GPU)
step pytest_cuda 150 "$PY" -m pytest -m cuda -q -rs

# ---- (d, e) benchmarks: the paper setting on a GPU, tiny configs on a CPU
if [[ $GPU == 1 ]]; then
  step ar_eager 150 "$PY" tools/benchmark_ar.py --preset paper --device cuda --dtype bfloat16 --json "$OUT/ar_eager.json"
  step ar_compiled 180 "$PY" tools/benchmark_ar.py --preset paper --device cuda --dtype bfloat16 --compile \
    --modes cache --json "$OUT/ar_compiled.json"
  step train 150 "$PY" tools/benchmark_train.py --grad-checkpointing both --json "$OUT/train.json"
else
  step ar_eager 120 "$PY" tools/benchmark_ar.py --config configs/debug/tiny.py --frames 17 --denoise-steps 2 \
    --json "$OUT/ar_eager.json"
  skip ar_compiled "no CUDA device: torch.compile is for CUDA (eager is the CPU default)"
  step train 120 "$PY" tools/benchmark_train.py --config configs/debug/tiny.py --steps 2 --warmup-steps 1 \
    --grad-checkpointing both --json "$OUT/train.json"
  skip paper_setting "no CUDA device: the CUDA tests were skipped (see pytest_cuda) and the benchmarks above ran on \
configs/debug/tiny.py"
fi

finish
failed=$(awk -F'\t' '$2 == "failed" || $2 == "timeout" {print $1}' "$OUT/steps.tsv" | tr '\n' ' ')
say "wrote $OUT/gpu_check.json in $SECONDS s${failed:+; failed: $failed}"
[[ -z $failed ]]
