#!/usr/bin/env bash
# One call on a fresh GPU machine without network yields the figures: environment facts, an install from wheels/
# (made by tools/gpu_wheels.sh on a networked machine) that leaves the machine's torch alone, a bf16 matrix product
# timed on the spot, the paper-setting inference benchmark eager, XL/2 training throughput, the stream engine at the
# paper's size, the same inference compiled with CUDA graphs, then the CUDA tests.
#
#     OUT=DIR bash tools/gpu_check.sh     # DIR defaults to outputs/gpu_check
#
# Steps, in order, each under a timeout of its cap (seconds) or of what is left of the budget, whichever is less:
#   env          30   Python, torch, CUDA, GPU, nvidia-smi, CPUs                                -> env.json
#                     then an 8192^3 bf16 product on random data, the median of 10 timed after 3 warm-ups: the
#                     rate this GPU reaches, a second MFU denominator besides the table's dense peak -> matmul.json
#   install      45   the project (editable) and the packages of wheels/ not installed at all, with no index and
#                     no dependencies, so nothing installed (torch above all) is replaced
#   imports      20   torch unchanged; mmengine, av and causalvdm import (the GPU steps need them: the check stops
#                     without them); diffusers and sentencepiece are only noted (the ddim/dpm samplers, the VAE and
#                     T5 use them; of the steps, one CUDA test, through the ddim sampler)  -> env.json's imports
#   ar_eager    110   --preset paper eager: the cache over 81 frames, the recompute baseline over 33 (its cost
#                     grows with the context; its 4th chunk has the full queue), the speed-up over the chunks both
#                     ran                                                                        -> ar_eager.json
#   train        80   XL/2 training, gradient checkpointing on then off, 3 + 15 steps each     -> train.json
#   streams      60   the stream engine, --preset paper, 1 and 8 streams of 4 chunks of 4 denoising steps, and
#                     the same streams one after another: frames/s, p95 latency, 8 over 1     -> streams.json
#   ar_compiled 150   --preset paper, cache mode, --compile reduce-overhead (CUDA graphs), with dynamo's graph
#                     count and inductor's CUDA-graph skips (must be 0); compiling is most of it -> ar_compiled.json
#   pytest_cuda  75   pytest -m cuda, over the test files that mark one
# With nvidia-smi's 10 s the caps add up to the default budget, GPU_CHECK_BUDGET=580 seconds: a step that hangs
# costs only its own cap, only the last step can be cut short by the budget, and one left with under 10 s is
# skipped. Each benchmark writes its JSON as each
# measurement ends, so a step stopped by its timeout keeps what it measured. After every step, gpu_check.json
# (every figure, each step's status, time and note, each TFLOP/s also against the measured product) and
# logs.tar.gz (each step's log and the step table) are written again, so a call cut short still returns the
# figures so far. $OUT holds at most 8 files: those two and the JSON named above.
#
# Without a CUDA device the same steps run what a CPU can: the product in float32 at 1024, the benchmarks on
# configs/debug/tiny.py, `pytest -m cuda` reporting its skips; ar_compiled is skipped. Exit status 0 when no step
# failed or timed out. The Python is $PYTHON, else .venv/bin/python, else python3, else python.
set -uo pipefail
case "${1:-}" in
  -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
  "") ;;
  *) echo "error: gpu_check.sh takes no arguments (OUT and GPU_CHECK_BUDGET come from the environment; see --help)" >&2
     exit 2 ;;
esac
cd "$(dirname "$0")/.."
ROOT=$(pwd)

OUT="${OUT:-outputs/gpu_check}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/{gpu_check,env,matmul,ar_eager,train,streams,ar_compiled}.json "$OUT/logs.tar.gz"  # no older run's figures
WORK=$(mktemp -d)  # logs and the step table, outside $OUT: only the archive of them goes back
trap 'rm -rf "$WORK"' EXIT
LOGS="$WORK/logs"
mkdir -p "$LOGS"
: > "$WORK/steps.tsv"
BUDGET="${GPU_CHECK_BUDGET:-580}"
RESERVE=10  # per step: timeout's 5 s between TERM and KILL, then the merge
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
else PY=$(command -v python3 || command -v python)
fi
if [[ $PY == */* && $PY != /* ]]; then PY=$ROOT/$PY; fi  # absolute, as one check runs from /
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # causalvdm imports even if the editable install failed
export PYTHONUNBUFFERED=1  # a killed step's log still shows how far it got

say() { echo "[gpu_check] $*"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$WORK/steps.tsv"; }  # name status seconds note

# step NAME CAP CMD...: run CMD under a timeout of min(CAP, budget left), output to NAME.log; then merge.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - SECONDS - RESERVE))
  if ((left < 10)); then
    record "$name" skipped 0 "out of the ${BUDGET} s budget"
    say "$name: skipped, out of the ${BUDGET} s budget"
    finish
    return 1
  fi
  local limit=$((cap < left ? cap : left)) start=$SECONDS rc=0
  echo "\$ $*" > "$LOGS/$name.log"
  timeout --kill-after=5 "$limit" "$@" >> "$LOGS/$name.log" 2>&1 || rc=$?
  local seconds=$((SECONDS - start)) status=ok
  if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status=failed; fi
  record "$name" "$status" "$seconds" "exit $rc, limit $limit s: $*"
  say "$name: $status in $seconds s"
  if [[ $status != ok ]]; then tail -n 15 "$LOGS/$name.log" | sed 's/^/    /'; fi
  finish
  [[ $status == ok ]]
}
skip() { record "$1" skipped 0 "$2"; say "$1: skipped: $2"; finish; }

# Merge the step table and every JSON into gpu_check.json, and archive the logs; both replace the last ones whole.
finish() {
  "$PY" - "$OUT" "$WORK" "$SECONDS" "$BUDGET" <<'EOF'
import json, os, re, sys
from pathlib import Path

out, work, seconds, budget = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, secs, note = line.split("\t", 3)
    steps[name] = dict(status=status, seconds=int(secs), note=note)


def read(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


report = dict(ok=all(s["status"] in ("ok", "skipped") for s in steps.values()), seconds=seconds, budget=budget,
              environment=read("env"), steps=steps,
              skipped={name: s["note"] for name, s in steps.items() if s["status"] == "skipped"})
log = work / "logs" / "pytest_cuda.log"
if "pytest_cuda" in steps and log.is_file():  # pytest's closing line, e.g. "3 passed, 1 skipped, 4 deselected in 61.2s"
    counts = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)\b", log.read_text().splitlines()[-1])
    report["pytest_cuda"] = {kind: int(n) for n, kind in counts}
matmul = read("matmul")
report["matmul"] = matmul
measured = matmul["tflops"] if matmul else None
# Each figure of model TFLOP/s also against the product's measured rate, the ceiling this GPU shows today.
for name in ("ar_eager", "train", "streams", "ar_compiled"):
    data = read(name)
    if data is None:
        continue
    rows = data.get("runs", []) + [data[mode] for mode in ("cache", "recompute") if mode in data]
    for row in rows:
        if measured and row.get("tflops") is not None:
            row["mfu_vs_matmul"] = row["tflops"] / measured
    report[name] = data
text = json.dumps(report, indent=2)
(out / "gpu_check.json.tmp").write_text(text)
os.replace(out / "gpu_check.json.tmp", out / "gpu_check.json")
EOF
  tar -czf "$OUT/logs.tar.gz.tmp" -C "$WORK" logs steps.tsv && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}

# ---- what the machine is, and the dense rate it reaches: a large product on random data (zeros run faster),
# timed on the device
timeout 10 nvidia-smi -L > "$LOGS/nvidia-smi.log" 2>&1 || echo "nvidia-smi: not available" > "$LOGS/nvidia-smi.log"
step env 30 "$PY" - "$OUT" "$LOGS/nvidia-smi.log" <<'EOF'
import json, os, platform, statistics, sys, time
import torch

out = sys.argv[1]
gpu = torch.cuda.is_available()
props = torch.cuda.get_device_properties(0) if gpu else None
facts = dict(
    python=platform.python_version(), executable=sys.executable, torch=torch.__version__,
    torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if gpu else None,
    cuda_available=gpu, device_count=torch.cuda.device_count() if gpu else 0,
    gpu_name=props.name if gpu else None, gpu_memory_gb=round(props.total_memory / 2**30, 1) if gpu else None,
    compute_capability=f"{props.major}.{props.minor}" if gpu else None,
    nvidia_smi=open(sys.argv[2]).read().strip().splitlines(), cpus=os.cpu_count(), platform=platform.platform())
with open(f"{out}/env.json", "w") as f:
    json.dump(facts, f, indent=2)
print(json.dumps(facts, indent=2))

device, dtype, n = ("cuda", torch.bfloat16, 8192) if gpu else ("cpu", torch.float32, 1024)
gen = torch.Generator(device).manual_seed(0)
# Three operand pairs in turn, 3 x 256 MiB at 8192 in bf16, far beyond the L2 cache: no product finds its inputs there.
pairs = [(torch.randn(n, n, device=device, dtype=dtype, generator=gen),
          torch.randn(n, n, device=device, dtype=dtype, generator=gen)) for _ in range(3)]
for a, b in pairs:  # warm-up: library handles and kernel choice
    a @ b
seconds = []
for i in range(10):
    a, b = pairs[i % 3]
    if gpu:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    else:
        t0 = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - t0)
median = statistics.median(seconds)
matmul = dict(device=device, device_name=props.name if gpu else "cpu", dtype=str(dtype).removeprefix("torch."), n=n,
              seconds=seconds, median_s=median, tflops=2 * n**3 / median / 1e12)
with open(f"{out}/matmul.json", "w") as f:
    json.dump(matmul, f, indent=2)
print(f"{n}^3 {matmul['dtype']} product on {matmul['device_name']}: {matmul['tflops']:.1f} TFLOP/s (median of 10)")
EOF
if [[ ! -f "$OUT/env.json" ]]; then
  echo "error: python ($PY) with torch does not run here; see env.log in $OUT/logs.tar.gz" >&2
  exit 1
fi
GPU=$("$PY" -c 'import json, sys; print(int(json.load(open(sys.argv[1]))["cuda_available"]))' "$OUT/env.json")
say "python $PY, CUDA device: $([[ $GPU == 1 ]] && echo yes || echo no)"

# ---- install from wheels/, only what is not installed at all, each without dependencies (setuptools, wheel and
# packaging are there only to build the project)
if [[ ! -d wheels ]]; then
  skip install "no wheels/ folder (make it with tools/gpu_wheels.sh on a networked machine and bring it)"
else
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
  project=(-e .)
  # Asked from / without PYTHONPATH: the source tree's causalvdm.egg-info would otherwise count as installed.
  if (cd / && env -u PYTHONPATH "$PY" -c "import importlib.metadata as m; m.distribution('causalvdm')" 2>/dev/null)
  then
    project=()
  fi
  if [[ -n $missing || ${#project[@]} -gt 0 ]]; then
    # shellcheck disable=SC2086  # one argument per package name
    step install 45 "$PY" -m pip install --quiet --disable-pip-version-check --no-index --find-links wheels \
      --no-deps "${project[@]}" $missing
  else
    skip install "the project and every package of wheels/ are installed already"
  fi
fi

# ---- imports: the ones the GPU steps need stop the check when missing; the others are noted in env.json
if ! step imports 20 "$PY" - "$OUT/env.json" <<'EOF'
import importlib, json, sys
import torch

path = sys.argv[1]
env = json.load(open(path))
needed, optional = {}, {}
for module, missing in [("mmengine", needed), ("av", needed), ("causalvdm", needed), ("diffusers", optional),
                        ("sentencepiece", optional)]:
    try:
        importlib.import_module(module)
    except Exception as err:  # an ImportError, or a broken package failing at import
        missing[module] = f"{type(err).__name__}: {err}".splitlines()[0]
env["imports"] = dict(torch_after_install=torch.__version__, missing=needed, optional_missing=optional)
with open(path, "w") as f:
    json.dump(env, f, indent=2)
for module, why in optional.items():
    print(f"warning: {module} does not import ({why}); the GPU steps do without it")
if torch.__version__ != env["torch"]:
    sys.exit(f"error: installing changed torch from {env['torch']} to {torch.__version__}")
if needed:
    sys.exit(f"error: cannot import {'; '.join(f'{m} ({why})' for m, why in needed.items())}; run "
             "tools/gpu_wheels.sh for this machine's Python and bring wheels/")
EOF
then
  echo "error: stopping: the imports step did not pass (env.json's imports and logs.tar.gz's imports.log say why)" >&2
  exit 1
fi

# ---- benchmarks: the paper setting on a GPU, tiny configs on a CPU; training before compiled inference, whose
# compilation is the longest and least certain part
if [[ $GPU == 1 ]]; then
  step ar_eager 110 "$PY" tools/benchmark_speedup.py --preset paper --device cuda --dtype bfloat16 \
    --modes cache,recompute --recompute-frames 33 --json "$OUT/ar_eager.json"
  step train 80 "$PY" tools/benchmark_train.py --grad-checkpointing both --warmup-steps 3 --steps 15 \
    --json "$OUT/train.json"
  step streams 60 "$PY" tools/benchmark_streams.py --preset paper --device cuda --streams 1,8 --chunks 4 \
    --denoise-steps 4 --json "$OUT/streams.json"
  # TORCH_LOGS: why a graph recompiled or ran without CUDA graphs, in the log
  step ar_compiled 150 env TORCH_LOGS=recompiles,cudagraphs "$PY" tools/benchmark_speedup.py --preset paper \
    --device cuda --dtype bfloat16 --compile reduce-overhead --modes cache --json "$OUT/ar_compiled.json"
else
  step ar_eager 110 "$PY" tools/benchmark_speedup.py --config configs/debug/tiny.py --frames 25 \
    --recompute-frames 17 --denoise-steps 2 --modes cache,recompute --json "$OUT/ar_eager.json"
  step train 80 "$PY" tools/benchmark_train.py --config configs/debug/tiny.py --grad-checkpointing both \
    --warmup-steps 1 --steps 1 --json "$OUT/train.json"
  step streams 60 "$PY" tools/benchmark_streams.py --config configs/debug/tiny.py --streams 1,8 --chunks 2 \
    --denoise-steps 2 --json "$OUT/streams.json"
  skip ar_compiled "no CUDA device: CUDA graphs need one (the benchmarks above ran on configs/debug/tiny.py)"
fi

# ---- the CUDA tests (skipped, and so reported, without a GPU), collected from the files that mark one
mapfile -t cuda_tests < <(grep -l "mark\.cuda" tests/test_*.py)
step pytest_cuda 75 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider "${cuda_tests[@]}"

# ---- a short table last, where a caller reading the end of the output sees it
"$PY" - "$OUT/gpu_check.json" <<'EOF'
import json, sys

report = json.load(open(sys.argv[1]))


def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


for name, s in report["steps"].items():
    print(f"{name:<12} {s['status']:<8} {s['seconds']:4d} s")
if report.get("matmul"):
    m = report["matmul"]
    print(f"matmul {m['n']}^3 {m['dtype']}: {m['tflops']:.1f} TFLOP/s")
for name in ("ar_eager", "ar_compiled"):
    data = report.get(name) or {}
    for mode in ("cache", "recompute"):
        row = data.get(mode, {})
        if "total" in row:
            print(f"{name} {mode}: {row['frames']} frames in {row['total']:.2f} s, {row['tflops']:.1f} TFLOP/s, "
                  f"MFU {pct(row['mfu'])} of the table's peak, {pct(row.get('mfu_vs_matmul'))} of the product's")
    if "speedup" in data:
        print(f"{name}: cache vs recompute {data['speedup']:.2f}x over {data['speedup_chunks']} chunks "
              f"(bound {data['bound']:.2f}x)")
    if "cudagraph_skips" in data:
        print(f"{name}: {data['compiled_graphs']} compiled graph(s), {data['cudagraph_skips']} CUDA-graph skip(s)")
streams = report.get("streams") or {}
for row in streams.get("rows", []):
    print(f"streams {row['streams']} {row['mode']}: {row['fps']:.1f} frames/s, p95 {row['p95']:.3f} s, one after "
          f"another {row.get('seq_fps', float('nan')):.1f} frames/s, {row['gflops'] / 1e3:.1f} TFLOP/s")
if "streams_8_over_1" in streams:
    print(f"streams: 8 over 1 {streams['streams_8_over_1']:.2f}x frames/s, p95 {streams['p95_8_over_1']:.2f}x")
for run in (report.get("train") or {}).get("runs", []):
    gc = "on" if run["grad_checkpointing"] else "off"
    if run["status"] == "ok":
        print(f"train checkpointing {gc}: {run['steps_per_s']:.2f} steps/s, {run['tflops']:.1f} TFLOP/s, MFU "
              f"{pct(run['mfu'])} of the table's peak, {pct(run.get('mfu_vs_matmul'))} of the product's, "
              f"peak {run['peak_mb']:.0f} MB")
    else:
        print(f"train checkpointing {gc}: {run['status']}")
EOF
failed=$(awk -F'\t' '$2 == "failed" || $2 == "timeout" {print $1}' "$WORK/steps.tsv" | tr '\n' ' ')
say "wrote $OUT/gpu_check.json in $SECONDS s${failed:+; failed: $failed}"
[[ -z $failed ]]
