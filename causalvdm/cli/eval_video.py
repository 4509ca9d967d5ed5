"""Evaluate generated videos against real ones: FVD and per-chunk FVD through a local I3D TorchScript file, PSNR and
SSIM of same-name pairs, and per-video frame statistics.

    python tools/eval_video.py --real data/ucf_eval/ --fake samples/ --i3d pretrained/i3d_torchscript.pt --json e.json
    python tools/eval_video.py --real sky_test.jsonl --fake samples/ --i3d pretrained/i3d_torchscript.pt \\
        --chunk-size 8 --given-frames 1                          # + FVD of each autoregressive chunk
    python tools/eval_video.py --real clips/ --fake samples/ --pairs --given-frames 1    # no network: PSNR / SSIM

A set is a folder (video files at any depth, or folders of image frames) or a .jsonl manifest of {"path"} rows,
relative to the manifest. The I3D file is never downloaded: give the i3d_torchscript.pt that StyleGAN-V uses. The
protocol (clips, resize, per-chunk windows) is in causalvdm/eval/fvd.py; without --i3d only the weight-free
metrics run. Prints a summary; --json writes everything, per video too.
"""

import logging
import sys

import torch

from causalvdm.cli.common import (USER_ERRORS, ArgumentParser, device_arg, non_negative_int, one_line_errors,
                                  output_file, positive_int)
from causalvdm.eval import I3D_FILE, EvalSettings, evaluate, list_videos, load_i3d
from causalvdm.utils.io import write_json

log = logging.getLogger("causalvdm.eval")


def print_summary(result: dict, args) -> None:
    """The result as a short readable table on stdout."""
    s = result["settings"]
    print(f"videos: {result['real']['videos']} real ({args.real}), {result['fake']['videos']} generated ({args.fake})")
    if "fvd" in result:
        print(f"FVD ({s['num_frames']} frames from frame {s['start']}, {s['size']}x{s['size']}): {result['fvd']:.2f}")
    if "fvd_per_chunk" in result:
        print(f"per-chunk FVD (chunks of {s['chunk_size']} after {s['given_frames']} given frames; "
              f"{s['num_frames']}-frame windows ending with each chunk, against the real clips above):")
        print(f"  {'chunk':>5}  {'frames':>9}  {'window':>9}  {'FVD':>9}")
        for c in result["fvd_per_chunk"]:
            frames, window = (f"{a}-{b - 1}" for a, b in (c["frames"], c["window"]))  # inclusive, as printed
            print(f"  {c['chunk']:>5}  {frames:>9}  {window:>9}  {c['fvd']:9.2f}")
    if "pairs" in result and result["pairs"]["count"]:
        p = result["pairs"]
        print(f"paired by name: {p['count']} videos, frames after the {s['given_frames']} given: "
              f"PSNR {p['psnr']:.2f} dB, SSIM {p['ssim']:.4f}")
    print(f"frame statistics (0-255, mean over videos)  {'real':>20}  {'generated':>20}")
    for key, label in (("mean", "mean R G B"), ("std", "std R G B")):
        real, fake = (" ".join(f"{v:6.1f}" for v in result[w][key]) for w in ("real", "fake"))
        print(f"  {label:<41}  {real:>20}  {fake:>20}")
    real, fake = (f"{result[w]['mean_abs_diff']:.2f}" if result[w]["mean_abs_diff"] is not None else "-"
                  for w in ("real", "fake"))
    print(f"  {'mean |frame - previous frame|':<41}  {real:>20}  {fake:>20}")
    if "token_grid" in result["fake"]:
        real, fake = (f"{result[w]['token_grid']:.2f}" if result[w]["token_grid"] is not None else "-"
                      for w in ("real", "fake"))
        label = f"token-grid ratio ({s['token_size']} px; about 1 for real)"
        print(f"  {label:<41}  {real:>20}  {fake:>20}")


def main(argv=None) -> int:
    """Evaluate the video sets of `argv` (default: the command line) -> exit status."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--real", required=True, help="real videos: a folder or a .jsonl manifest of {\"path\"} rows")
    parser.add_argument("--fake", required=True, help="generated videos: a folder (e.g. the sampler's --out) or a "
                        ".jsonl manifest")
    parser.add_argument("--i3d", help=f"local I3D TorchScript file ({I3D_FILE}) for FVD; without it only PSNR/SSIM "
                        "and frame statistics")
    parser.add_argument("--num-frames", type=positive_int, default=16, help="frames of an FVD clip (default 16)")
    parser.add_argument("--size", type=positive_int, default=224, help="FVD clips are resized to SIZE x SIZE "
                        "(default 224, I3D's input)")
    parser.add_argument("--start", type=non_negative_int, default=0, help="first frame of the FVD clip of every "
                        "video (default 0)")
    parser.add_argument("--chunk-size", type=positive_int, help="per-chunk FVD: frames per autoregressive chunk "
                        "(needs --i3d)")
    parser.add_argument("--given-frames", type=non_negative_int, default=0, help="given (not generated) frames at "
                        "the start of each generated video: chunks start after them, and PSNR/SSIM skip them "
                        "(default 0)")
    parser.add_argument("--pairs", action="store_true", help="PSNR/SSIM of each generated video against the real "
                        "video of the same name (its path without extension, relative to its set)")
    parser.add_argument("--json", type=output_file, help="write the full result, per video too, to this file (checked "
                        "before the evaluation)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="clips per detector call (default 8)")
    parser.add_argument("--token-size", type=positive_int, help="also the token-grid ratio of every video: the mean "
                        "luma step across the borders of TOKEN x TOKEN pixel squares over the step inside them (about "
                        "1 for real video; the model's VAE factor x patch size, 8 for the demo)")
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the detector runs (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    if args.chunk_size is not None and not args.i3d:
        parser.error("--chunk-size (per-chunk FVD) needs --i3d")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    with one_line_errors(ValueError, prefix="--real: "):
        real = list_videos(args.real)
    with one_line_errors(ValueError, prefix="--fake: "):
        fake = list_videos(args.fake)
    with one_line_errors(prefix="--i3d: "):
        detector = load_i3d(args.i3d, args.device) if args.i3d else None
    settings = EvalSettings(num_frames=args.num_frames, size=args.size, start=args.start, chunk_size=args.chunk_size,
                            given_frames=args.given_frames, pairs=args.pairs, batch_size=args.batch_size,
                            token_size=args.token_size)
    with one_line_errors(*USER_ERRORS, ValueError):
        result = evaluate(real, fake, settings, detector, args.device)
    result["real"]["source"], result["fake"]["source"], result["i3d"] = args.real, args.fake, args.i3d

    print_summary(result, args)
    if args.json:
        write_json(args.json, result)
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
