"""Streaming video output: H.264 mp4 written chunk by chunk, a contact sheet kept from a few frames, PSNR.

A long video never sits in memory as pixels: each decoded chunk is encoded and dropped, and the
contact sheet keeps only the frames it will show.
"""

import math
import os
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image


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
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
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


def sheet_indices(num_frames: int, count: int) -> list[int]:
    """`count` evenly spaced frame indices over [0, num_frames), first and last included."""
    count = max(1, min(count, num_frames))
    return sorted({round(i * (num_frames - 1) / max(count - 1, 1)) for i in range(count)})


class ContactSheetCollector:
    """Keep only the frames a contact sheet of a `num_frames` video will show, as they stream past."""

    def __init__(self, num_frames: int, count: int = 8):
        self.indices = sheet_indices(num_frames, count)
        self.frames: dict[int, np.ndarray] = {}
        self._seen = 0

    def add(self, frames: np.ndarray) -> None:
        """Offer the next frames (T, H, W, 3) uint8 of the video; copies of the wanted ones are kept."""
        for i in self.indices:
            if self._seen <= i < self._seen + len(frames):
                self.frames[i] = frames[i - self._seen].copy()
        self._seen += len(frames)

    def save(self, path: str | Path, columns: int = 4) -> None:
        """Write the kept frames as a PNG grid, in video order."""
        contact_sheet([self.frames[i] for i in sorted(self.frames)], path, columns)


def contact_sheet(frames: list[np.ndarray], path: str | Path, columns: int = 4, pad: int = 2) -> None:
    """Write frames (each (H, W, 3) uint8) as a PNG grid, row-major, `pad` white pixels between them."""
    if not frames:
        raise ValueError("contact_sheet needs at least one frame")
    h, w = frames[0].shape[:2]
    columns = min(columns, len(frames))
    rows = math.ceil(len(frames) / columns)
    sheet = np.full((rows * h + (rows + 1) * pad, columns * w + (columns + 1) * pad, 3), 255, dtype=np.uint8)
    for n, frame in enumerate(frames):
        r, c = divmod(n, columns)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        sheet[top : top + h, left : left + w] = frame
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-frame PSNR in dB of pixels (3, T, H, W) in [-1, 1] -> (T,); capped at 100 dB for identical frames."""
    mse = ((pred.float().clamp(-1, 1) - target.float().clamp(-1, 1)) ** 2).mean(dim=(0, 2, 3))  # (T,)
    return (10 * torch.log10(data_range**2 / mse.clamp_min(data_range**2 * 1e-10))).cpu()
