"""The base of the pixel datasets: `SourceVideo` records decoded, resized and cropped into clips, kept decoded in
memory when all of them fit in `cache_bytes`. Frames are decoded straight at the size that covers `image_size` (see
video_io)."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from causalvdm.data.cache import FrameCache
from causalvdm.data.datasets import ClipDataset
from causalvdm.data.transforms import resized_shape, to_size, video_transform
from causalvdm.data.video_io import (VideoReadError, image_shape, iter_video_frames, probe_video, read_image_frames,
                                     read_video_frames)


@dataclass(frozen=True)
class SourceVideo:
    """One source video: a file, or (for frame folders) a clip directory and its sorted frame files."""

    path: Path
    name: str  # as listed (relative to the root), for the latent index and messages
    caption: str
    frames: tuple[Path, ...] | None = None
    num_frames: int | None = None  # known without decoding (frame folders, manifest hint)


class VideoClipDataset(ClipDataset):
    """Base of the pixel datasets: decoding, resizing and cropping of `SourceVideo` records.

    Frames are decoded at the size covering `image_size` (the crop is then a slice). If every video's
    frames at that size fit in `cache_bytes` (0: never), judged from the file headers on the first load,
    each video is decoded whole on its first use and its later clips are sliced from memory: for a small
    dataset, or one clip repeated by RepeatDataset, the files are decoded once per process. Whole or
    nothing, so that a large dataset costs no memory for a cache that would rarely hit. Each process
    holds its own cache: the main one and every DataLoader worker (workers are re-created each epoch by
    `build_dataloader`, so they refill theirs), i.e. up to (num_workers + 1) x cache_bytes per rank.
    Cached or not, item `i` is the same tensor.
    """

    def __init__(self, root, num_frames, image_size, sample_interval, random_crop, seed, cache_bytes):
        super().__init__(root, num_frames, sample_interval, seed)
        self.image_size = to_size(image_size)
        self.random_crop = random_crop
        self.videos: list[SourceVideo] = []
        self.cache = FrameCache(cache_bytes)
        self._cache_all: bool | None = None  # whether all videos fit in the cache; decided on the first load
        self._not_cached: set[int] = set()  # videos that could not be decoded whole: read clip by clip
        self._counts: dict[int, int] = {}  # probed frame counts: opening a file costs ~25 ms, more than a cached clip

    def __len__(self) -> int:
        return len(self.videos)

    def source(self, index: int) -> tuple[str, str]:
        video = self.videos[index]
        return video.name, video.caption

    def _count(self, index: int) -> int:
        """Frames of video `index`: known (frame folders, manifest hint) or probed once per process."""
        video = self.videos[index]
        if video.num_frames is not None:
            return video.num_frames
        if index not in self._counts:
            self._counts[index] = probe_video(video.path).num_frames
        return self._counts[index]

    def load(self, index: int, generator: torch.Generator) -> dict:
        video = self.videos[index]
        indices = self.clip_indices(self._count(index), generator, video.path)
        frames = self._cached_video(index)  # (N, h, w, 3) uint8, every frame, or None
        if frames is None:
            clip = self._read_clip(video, indices)
        elif indices[-1] < len(frames):
            clip = frames[indices.start:indices.stop:indices.step]  # a view: video_transform copies
        else:  # the header promised more frames than decode: the same error as the clip reader's
            raise VideoReadError(f"{video.path}: has {len(frames)} decodable frames, need frame {indices[-1]}")
        crop_generator = generator if self.random_crop else None
        return {"video": video_transform(clip, self.image_size, crop_generator), "caption": video.caption}

    def _read_clip(self, video: SourceVideo, indices: range) -> torch.Tensor:
        """The frames at `indices`, uint8 (T, h, w, 3) at the size covering image_size."""
        if video.frames is not None:
            return read_image_frames([video.frames[i] for i in indices], self.image_size)
        return read_video_frames(video.path, indices, self.image_size)

    def _read_all(self, video: SourceVideo) -> torch.Tensor:
        """Every frame, uint8 (N, h, w, 3) at the size covering image_size."""
        if video.frames is not None:
            return read_image_frames(video.frames, self.image_size)
        frames = [torch.from_numpy(f) for f in iter_video_frames(video.path, self.image_size)]
        if not frames:
            raise VideoReadError(f"{video.path}: no frames")
        return torch.stack(frames)

    def _all_fit_in_cache(self) -> bool:
        """Whether every video's frames at the covering size fit in the cache, from the file headers.

        Stops probing as soon as the total is over, so a large dataset costs a bounded number of probes.
        """
        total = 0
        for index, video in enumerate(self.videos):
            try:
                if video.frames is not None:
                    height, width = image_shape(video.frames[0])
                else:
                    info = probe_video(video.path)
                    self._counts.setdefault(index, info.num_frames)
                    height, width = info.height, info.width
                num_frames = self._count(index)
            except VideoReadError:
                continue  # skipped when loaded, never cached
            h, w = resized_shape(height, width, self.image_size)
            total += num_frames * h * w * 3
            if total > self.cache.max_bytes:
                return False
        return True

    def _cached_video(self, index: int) -> torch.Tensor | None:
        """Every frame of video `index`, uint8 (N, h, w, 3), from the cache (decoded into it on first use),
        or None if the dataset is not cached."""
        if self._cache_all is None:
            self._cache_all = self.cache.max_bytes > 0 and self._all_fit_in_cache()
        if not self._cache_all or index in self._not_cached:
            return None
        frames = self.cache.get(index)
        if frames is None:
            try:
                frames = self._read_all(self.videos[index])
            except VideoReadError:
                # e.g. a file damaged past the clip: the clip reader decides whether the item is readable
                self._not_cached.add(index)
                return None
            if not self.cache.put(index, frames):  # more frames than the headers said: keep the bound
                self._not_cached.add(index)
        return frames

    def full_video_chunks(self, index: int, chunk_frames: int) -> Iterator[torch.Tensor]:
        """Every frame of video `index`, centre-cropped, as (3, t, H, W) chunks of up to `chunk_frames` frames.

        Used to cache latents (tools/encode_latents.py): whole videos at stride 1, never held decoded in full.
        Raises VideoReadError (possibly after some chunks) if the video cannot be read.
        """
        video = self.videos[index]
        if video.frames is not None:
            frames = (read_image_frames([p], self.image_size)[0] for p in video.frames)
        else:
            frames = (torch.from_numpy(f) for f in iter_video_frames(video.path, self.image_size))
        chunk, count = [], 0
        for frame in frames:  # (h, w, 3) at the size covering image_size, as the clips of `load`
            chunk.append(frame)
            count += 1
            if len(chunk) == chunk_frames:
                yield video_transform(torch.stack(chunk), self.image_size)
                chunk = []
        if chunk:
            yield video_transform(torch.stack(chunk), self.image_size)
        if count == 0:
            raise VideoReadError(f"{video.path}: no frames")
