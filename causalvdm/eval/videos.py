"""The videos of an evaluation set: a folder (video files, or folders of image frames) or a .jsonl manifest."""

import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from causalvdm.data.transforms import crop_offsets, resize_to_cover
from causalvdm.data.video_io import (IMAGE_EXTENSIONS, VideoReadError, iter_video_frames, natural_key, probe_video,
                                     read_image_frames)
from causalvdm.utils.io import iter_jsonl

VIDEO_EXTENSIONS = (".mp4", ".avi", ".gif", ".mov", ".mkv", ".webm")


@dataclass(frozen=True)
class Video:
    """One video of a set: `name` (its path relative to the set, without extension) pairs real with fake videos;
    `frames` lists the image files of a frame folder (empty for a video file)."""

    name: str
    path: Path
    frames: tuple[Path, ...] = ()


def _images(folder: Path) -> tuple[Path, ...]:
    files = (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return tuple(sorted(files, key=natural_key))


def _entry(path: Path, relative: str) -> Video:
    """The video file or frame folder at `path`, named by `relative` (its manifest path) -> Video; a one-line
    ValueError if it is neither."""
    if not path.exists():
        raise ValueError(f"{path}: not found")
    if path.is_dir():
        frames = _images(path)
        if not frames:
            raise ValueError(f"{path}: folder holds no {'/'.join(IMAGE_EXTENSIONS)} frames")
        return Video(Path(relative).as_posix(), path, frames)
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
        raise ValueError(f"{path}: not a video ({' '.join(VIDEO_EXTENSIONS)}) or a frame folder")
    return Video(Path(relative).with_suffix("").as_posix(), path)


def list_videos(source: str | Path) -> list[Video]:
    """The videos of a folder or a .jsonl manifest of {"path"} rows (relative to the manifest), in name order.

    In a folder, at any depth: every video file, and every folder that holds image frames but no video file (so
    the sampler's contact sheets beside its mp4s are not taken for frames). Errors are one-line ValueErrors.
    """
    source = Path(source)
    if source.suffix == ".jsonl" and source.is_file():
        videos = []
        for line_no, row in iter_jsonl(source):
            path = row.get("path")
            if not isinstance(path, str) or not path:
                raise ValueError(f"{source}: line {line_no}: missing or empty field 'path'")
            try:
                videos.append(_entry(source.parent / path, path))
            except ValueError as err:
                raise ValueError(f"{source}: line {line_no}: {err}") from None
    elif source.is_dir():
        videos = []
        for folder, dirs, files in os.walk(source):
            dirs.sort()
            folder = Path(folder)
            found = sorted(f for f in files if Path(f).suffix.lower() in VIDEO_EXTENSIONS)
            if found:
                videos += [_entry(folder / f, (folder / f).relative_to(source).as_posix()) for f in found]
            elif any(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in files):
                videos.append(_entry(folder, folder.relative_to(source).as_posix()))
    elif source.exists():
        raise ValueError(f"{source}: not a folder or a .jsonl manifest")
    else:
        raise ValueError(f"{source}: no such folder or .jsonl manifest")
    if not videos:
        raise ValueError(f"{source}: no videos ({' '.join(VIDEO_EXTENSIONS)} files or folders of "
                         f"{'/'.join(IMAGE_EXTENSIONS)} frames)")
    return sorted(videos, key=lambda v: v.name)


def video_length(video: Video) -> int:
    """Frame count of a video: its image files, or what the file's header says (packets counted if it says none)."""
    return len(video.frames) if video.frames else probe_video(video.path).num_frames


def read_frames(video: Video, count: int | None = None) -> torch.Tensor:
    """The first `count` frames of a video (all if None) -> uint8 (T, H, W, 3); the video must have them."""
    if video.frames:
        if count is not None and len(video.frames) < count:
            raise VideoReadError(f"{video.path}: has {len(video.frames)} frames, need {count}")
        return read_image_frames(video.frames[:count])
    frames = list(islice(iter_video_frames(video.path), count))
    if not frames or (count is not None and len(frames) < count):
        raise VideoReadError(f"{video.path}: has {len(frames)} decodable frames, need {count or 1}")
    return torch.from_numpy(np.stack(frames))  # (T, H, W, 3)


def match_size(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> uint8 (T, h, w, 3): short side resized and centre-cropped to `size`, as the sampler
    prepares a given video (the reference of a generated one); frames of that size are returned as they are."""
    frames = resize_to_cover(frames, size)
    top, left = crop_offsets(frames.shape[1], frames.shape[2], size)
    return frames[:, top:top + size[0], left:left + size[1]]
