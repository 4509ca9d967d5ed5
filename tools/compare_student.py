"""Teacher against its few-step student on a real clip, in one run on one machine: per-frame PSNR of each one's own
rollout from the first frame (teacher at its default steps, teacher at the student's steps, student), the repeat-
the-first-frame baseline, the exposure-bias gap per chunk of the training length (real frames given before the chunk
against the model's own rollout), the drift of the last chunk (optionally of a long rollout too) and time per chunk
(denoising plus commit, same cache).

    python tools/compare_student.py --teacher outputs/overfit_demo/checkpoints/step_00002000 \\
        --student outputs/distill/checkpoints/step_00000300 --video data/demo_long/bikes-076.mp4 --out outputs/distill

Writes OUT/compare.json and OUT/compare.png (the per-frame curves).
"""

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from causalvdm.cli.common import (ArgumentParser, non_negative_int, one_line_errors, output_dir,  # noqa: E402
                                  positive_int)
from causalvdm.distill.compare import Variant, compare, plot_curves, range_means  # noqa: E402
from causalvdm.pipeline import CausalVDMPipeline  # noqa: E402
from causalvdm.utils.io import writable_dir  # noqa: E402


def print_tables(result: dict, train_frames: int, num_frames: int) -> None:
    """Per-frame curves, means over the training length and beyond, the exposure-bias gaps and the timings."""
    names = list(result)
    first = result[names[0]]
    print("frame  " + "  ".join(f"{n:>16}" for n in names) + "  repeat_first")
    for i, frame in enumerate(first["frames"]):
        print(f"{frame:5d}  " + "  ".join(f"{result[n]['psnr'][i]:16.2f}" for n in names)
              + f"  {first['psnr_repeat_last'][i]:12.2f}")
    ranges = [(1, train_frames - 1)]
    while ranges[-1][1] < num_frames - 1:
        ranges.append((ranges[-1][1] + 1, min(ranges[-1][1] + train_frames, num_frames - 1)))
    print("\nmean PSNR (dB) over frames " + "  ".join(f"{a}-{b}" for a, b in ranges))
    for name in names:
        print(f"  {name:<22}" + "  ".join(f"{m:7.2f}" for m in range_means(result[name], ranges)))
    print(f"  {'repeat the first frame':<22}" + "  ".join(f"{m:7.2f}" for m in range_means(first, ranges,
                                                                                          "psnr_repeat_last")))
    print("\nexposure bias: chunk PSNR with the real frames before it given, and in the model's own rollout")
    for name in names:
        gaps = ", ".join(f"{c['frames'][0]}-{c['frames'][1]}: {c['given_db']:.2f} / {c['rollout_db']:.2f} "
                         f"({c['gap_db']:+.2f})" for c in result[name]["chunks"])
        print(f"  {name:<22}{gaps}")
    print("\ndrift: how far the last chunk lies outside the band of the first frames (grey levels; 0 = inside)")
    for name in names:
        for label, key in ((f"frame {num_frames - 1}", "beyond_band"), ("long run", "beyond_band_long")):
            if result[name][key] is not None:
                values = "  ".join(f"{stat} {v:5.1f}" for stat, v in result[name][key].items())
                print(f"  {name:<22}{label:<10}{values}")
    base = result[names[0]]["chunk_ms"]
    print("\ntime per chunk (median; denoising + commit)")
    for name in names:
        row = result[name]
        print(f"  {name:<22}{row['sampler']} {row['num_steps']:3d} steps  {row['chunk_ms']:8.1f} ms  "
              f"{row['frames_per_s']:7.1f} frames/s  {base / row['chunk_ms']:5.2f}x")


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", required=True, help="the teacher's training checkpoint directory or "
                        "save_pretrained folder (its saved config is used)")
    parser.add_argument("--student", required=True, help="the student's checkpoint directory or folder")
    parser.add_argument("--video", required=True, help="the real clip: frame 0 is given, the rest is the reference")
    parser.add_argument("--num-frames", type=positive_int, default=51, help="frames of each rollout (default 51)")
    parser.add_argument("--train-frames", type=positive_int, help="the training clip length: the exposure-bias gap "
                        "is measured on the chunks within it (default: the teacher's model.max_tpe_len)")
    parser.add_argument("--long-frames", type=non_negative_int, default=0, help="also roll each one out this many "
                        "frames and report the drift of its last chunk (default 0: not run)")
    parser.add_argument("--prompt", default="", help="the caption every rollout is made under (default: none, the "
                        "null caption; a caption-conditioned model wants its clip's caption)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the sampling noise (default 0)")
    parser.add_argument("--out", required=True, type=output_dir, help="folder for compare.json and compare.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    with one_line_errors():
        out = writable_dir(args.out, "--out")
        teacher = CausalVDMPipeline.from_pretrained(args.teacher)
        student = CausalVDMPipeline.from_pretrained(args.student)
        steps = student.defaults.num_steps
        train_frames = args.train_frames or teacher.model.max_tpe_len
        variants = [Variant(f"teacher {teacher.defaults.sampler}-{teacher.defaults.num_steps}", teacher,
                            teacher.defaults.sampler, teacher.defaults.num_steps),
                    Variant(f"teacher {student.defaults.sampler}-{steps}", teacher, student.defaults.sampler, steps),
                    Variant(f"student {student.defaults.sampler}-{steps}", student, student.defaults.sampler, steps)]
        result = compare(variants, args.video, args.num_frames, train_frames, args.seed, args.long_frames, args.prompt)
    print_tables(result, train_frames, args.num_frames)
    (out / "compare.json").write_text(json.dumps(dict(video=args.video, teacher=args.teacher, student=args.student,
                                                      variants=result), indent=2))
    plot_curves(result, out / "compare.png", title=f"{Path(args.video).stem}: own rollout from the first frame",
                train_frames=train_frames)
    print(f"\n{out / 'compare.json'}  {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
