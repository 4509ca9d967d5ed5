"""Streaming video output: H.264 mp4 written chunk by chunk, a contact sheet kept from a few frames, PSNR.

A long video never sits in memory as pixels: each decoded chunk is encoded and dropped, and the
contact sheet keeps only the frames it will show (and the real frames at their positions).
"""

import math
import os
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """Pixels (3, T, H, W) in [-1, 1] -> frames (T, H, W, 3) uint8."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, T, H, W)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


class StreamingVideoWriter:
    """Encode frames to an H.264 mp4 as they arrive; a context manager.

    The file is written under a temporary name and renamed to `path` on a clean close, so an existing
    `path` is always a complete video (batch sampling skips those). Width and height must be even (yuv420p).
    """

    def __init__(self, path: str | Path, fps: int, width: int, height: int, crf: int = 18):
        if width % 2 or height % 2:
            raise ValueError(f"H.264 (yuv420p) needs an even frame size, got {width}x{height}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.stem}.part{self.path.suffix}")
        self.width, self.height = width, height
        self.num_frames = 0
        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        self._stream = self._container.add_stream("libx264", rate=fps)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(crf)}

    def write(self, frames: np.ndarray) -> None:
        """Append frames (T, H, W, 3) uint8."""
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames must be (T, {self.height}, {self.width}, 3), got {frames.shape}")
        for frame in frames:
            # Converted to the stream's yuv420p here: left to `encode`, the conversion gives other pixels from run to
            # run (the same frames encoded twice differed in half their decoded values), this one the same ones.
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24").reformat(
                format="yuv420p")
            self._container.mux(self._stream.encode(video_frame))
        self.num_frames += len(frames)

    def close(self) -> None:
        """Flush the encoder and move the finished file to `path`."""
        if self._container is None:
            return
        self._container.mux(self._stream.encode(None))
        self._container.close()
        self._container = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the partial file (after an error)."""
        if self._container is not None:
            self._container.close()
            self._container = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "StreamingVideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


TILE_SHORT_SIDE = 128  # px: 32x32 demo frames shown 1:1 are too small to judge
LABEL_HEIGHT = 14  # px under each tile for its frame number (the default font is 11 px high)


def sheet_indices(num_frames: int, count: int) -> list[int]:
    """`count` evenly spaced frame indices over [0, num_frames), first and last included."""
    count = max(1, min(count, num_frames))
    return sorted({round(i * (num_frames - 1) / max(count - 1, 1)) for i in range(count)})


class ContactSheetCollector:
    """Keep only the frames a contact sheet of a `num_frames` video will show, as they stream past.

    At most `count` evenly spaced frames, and the real frames at the same positions when a reference video is
    offered, are kept at their own size (upscaled only when saved): memory is bounded however long the video.
    """

    def __init__(self, num_frames: int, count: int = 8):
        self.indices = sheet_indices(num_frames, count)
        self.frames: dict[int, np.ndarray] = {}
        self.real: dict[int, np.ndarray] = {}
        self.given = 0  # frames offered with given=True, labelled as such
        self._seen = 0

    def add(self, frames: np.ndarray, real: np.ndarray | None = None, given: bool = False) -> None:
        """Offer the next frames (T, H, W, 3) uint8 of the video; copies of the wanted ones are kept.

        real: the real frames (r, H, W, 3) at the same positions, r <= T (the reference video may end first);
        given: these are the given (conditioning) frames, offered before the generated ones.
        """
        for i in self.indices:
            j = i - self._seen
            if 0 <= j < len(frames):
                self.frames[i] = frames[j].copy()
                if real is not None and j < len(real):
                    self.real[i] = real[j].copy()
        self._seen += len(frames)
        if given:
            self.given = self._seen

    def save(self, path: str | Path, columns: int = 4) -> None:
        """Write the kept frames as a PNG grid in video order, `columns` a row, each labelled with its frame number;
        a row of generated frames has the real frames at the same positions above it, where any were offered."""
        shown = sorted(self.frames)
        rows = []
        for start in range(0, len(shown), columns):
            part = shown[start : start + columns]
            if any(i in self.real for i in part):  # a row past the end of the reference video would be all blanks
                rows.append([(self.real.get(i), f"real {i}" if i in self.real else "no real frame") for i in part])
            rows.append([(self.frames[i], f"frame {i} (given)" if i < self.given else f"frame {i}") for i in part])
        contact_sheet(rows, path)


def contact_sheet(rows: list[list[tuple[np.ndarray | None, str]]], path: str | Path, pad: int = 4) -> None:
    """Write rows of labelled tiles, (frame (H, W, 3) uint8 or None for a blank, label), as a PNG grid.

    All frames share one size. They are upscaled by nearest neighbour, by the smallest integer factor that makes the
    short side at least TILE_SHORT_SIDE px (pixels stay sharp squares); each label is drawn under its tile in PIL's
    default font; `pad` white pixels between tiles.
    """
    frames = [frame for row in rows for frame, _ in row if frame is not None]
    if not frames:
        raise ValueError("contact_sheet needs at least one frame")
    h, w = frames[0].shape[:2]
    factor = max(1, math.ceil(TILE_SHORT_SIDE / min(h, w)))
    tile_h, tile_w = h * factor, w * factor
    cell_h = tile_h + LABEL_HEIGHT
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (columns * tile_w + (columns + 1) * pad, len(rows) * cell_h + (len(rows) + 1) * pad),
                      "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        for c, (frame, label) in enumerate(row):
            left, top = pad + c * (tile_w + pad), pad + r * (cell_h + pad)
            if frame is None:
                draw.rectangle((left, top, left + tile_w - 1, top + tile_h - 1), fill=(224, 224, 224))
            else:
                sheet.paste(Image.fromarray(frame).resize((tile_w, tile_h), Image.Resampling.NEAREST), (left, top))
            draw.text((left + 2, top + tile_h + 1), label, fill="black", font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
