"""Video datasets: clips of `num_frames` frames at a fixed stride from a random start, as diffusion inputs.

Items: {"video": (3, T, H, W) float in [-1, 1]} or {"latents": (C, T, h, w)}, plus "caption" (str), "index"
(the requested index) and "skipped" (unreadable files skipped to produce it). All randomness of item `i`
comes from a generator seeded by (seed, epoch, i), so it does not depend on workers, batch layout or caching.

Pixel datasets decode frames straight at the size that covers `image_size` (see video_io) and, when all
their videos fit in `cache_bytes`, keep them decoded in memory (see VideoClipDataset).
"""

import csv
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from causalvdm.data.cache import DEFAULT_CACHE_BYTES, FrameCache
from causalvdm.data.sampler import derive_seed
from causalvdm.data.transforms import resized_shape, to_size, video_transform
from causalvdm.data.video_io import (IMAGE_EXTENSIONS, NoReadableItemError, VideoReadError, first_line, image_shape,
                                     iter_video_frames, natural_key, probe_video, read_image_frames, read_video_frames)
from causalvdm.registry import DATASETS, build
from causalvdm.utils.io import iter_jsonl

log = logging.getLogger("causalvdm.data")

LATENT_INDEX_FILE = "index.json"  # written by tools/encode_latents.py next to its shards
LATENT_FORMAT = "causalvdm-latents/1"


class ClipDataset(Dataset):
    """Base of every dataset: seeded clip sampling and deterministic skipping of unreadable items.

    Subclasses implement `__len__`, `load(index, generator) -> dict` (raising VideoReadError for a bad
    file) and `source(index) -> (path, caption)`.
    """

    def __init__(self, root, num_frames: int, sample_interval: int, seed: int):
        if num_frames < 1 or sample_interval < 1:
            raise ValueError(f"num_frames ({num_frames}) and sample_interval ({sample_interval}) must be >= 1")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: dataset root is not a directory")
        self.num_frames, self.sample_interval, self.seed = num_frames, sample_interval, seed
        self.epoch = 0
        self._bad: set[int] = set()  # items already found unreadable (warned once) in this process

    @property
    def span(self) -> int:
        """Source frames covered by one clip: (num_frames - 1) * sample_interval + 1."""
        return (self.num_frames - 1) * self.sample_interval + 1

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's clip starts and crops; call in the main process before iterating a DataLoader."""
        self.epoch = epoch

    def generator(self, index: int) -> torch.Generator:
        """The generator of item `index` in the current epoch, seeded by (seed, epoch, index)."""
        return torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index))

    def clip_indices(self, total: int, generator: torch.Generator, name) -> range:
        """Frame indices of a clip of a `total`-frame video: random start, stride sample_interval."""
        if total < self.span:
            raise VideoReadError(f"{name}: {total} frames, a clip needs {self.span} "
                                 f"({self.num_frames} at interval {self.sample_interval})")
        start = int(torch.randint(0, total - self.span + 1, (1,), generator=generator))
        return range(start, start + self.span, self.sample_interval)

    def load(self, index: int, generator: torch.Generator) -> dict:
        """Item `index` without its "index"/"skipped" fields; raises VideoReadError if unreadable."""
        raise NotImplementedError

    def source(self, index: int) -> tuple[str, str]:
        """(path as listed, caption) of item `index`."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        for skipped in range(n):
            j = (index + skipped) % n
            if j in self._bad:
                continue
            try:
                item = self.load(j, self.generator(j))
            except VideoReadError as err:
                self._bad.add(j)
                log.warning("skipping unreadable item: %s", err)
                continue
            item.update(index=index, skipped=skipped)
            return item
        raise NoReadableItemError(f"{type(self).__name__}: none of the {n} items under {self.root} can be read "
                                  "(see the warnings above)")


@dataclass(frozen=True)
class _Video:
    """One source video: a file, or (for frame folders) a clip directory and its sorted frame files."""

    path: Path
    name: str  # as listed (relative to the root), for the latent index and messages
    caption: str
    frames: tuple[Path, ...] | None = None
    num_frames: int | None = None  # known without decoding (frame folders, manifest hint)


class VideoClipDataset(ClipDataset):
    """Base of the pixel datasets: decoding, resizing and cropping of `_Video` records.

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
        self.videos: list[_Video] = []
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

    def _read_clip(self, video: _Video, indices: range) -> torch.Tensor:
        """The frames at `indices`, uint8 (T, h, w, 3) at the size covering image_size."""
        if video.frames is not None:
            return read_image_frames([video.frames[i] for i in indices], self.image_size)
        return read_video_frames(video.path, indices, self.image_size)

    def _read_all(self, video: _Video) -> torch.Tensor:
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


def _inside(root: Path, path: Path) -> bool:
    """Whether `path` is `root` or below it, judged on the normalised text of both (`..` is followed lexically).

    Symlinks are not resolved: data roots are often links to other disks.
    """
    base = os.path.abspath(root)
    return os.path.commonpath([base, os.path.abspath(path)]) == base


def read_manifest(path: Path) -> list[dict]:
    """Rows of a .jsonl or .csv manifest: dicts with "path", "caption", "num_frames" (None if not given), "line".

    Raises a one-line ValueError naming the file (and line) for a missing, empty or malformed manifest.
    """
    if not path.is_file():
        raise ValueError(f"{path}: manifest not found")
    if path.suffix not in (".jsonl", ".csv"):
        raise ValueError(f"{path}: manifest must be a .jsonl or .csv file")
    if path.suffix == ".jsonl":
        rows = list(iter_jsonl(path))
    else:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"path", "caption"} - set(reader.fieldnames or ())
            if reader.fieldnames is not None and missing:
                raise ValueError(f"{path}: line 1: header lacks column(s) {', '.join(sorted(missing))}")
            rows = [(reader.line_num, row) for row in reader]
    if not rows:
        raise ValueError(f"{path}: manifest has no rows")
    return [_check_row(path, line_no, row) for line_no, row in rows]


def _check_row(path: Path, line_no: int, row) -> dict:
    where = f"{path}: line {line_no}"
    if not isinstance(row.get("path"), str) or not row["path"]:
        raise ValueError(f"{where}: missing or empty field 'path'")
    if not isinstance(row.get("caption"), str):
        raise ValueError(f"{where}: missing field 'caption' (use \"\" for none)")
    out = {"path": row["path"], "caption": row["caption"], "num_frames": None, "line": line_no}
    if row.get("num_frames") not in (None, ""):  # a hint that saves probing the file; fps is accepted, unused
        try:
            out["num_frames"] = int(row["num_frames"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: num_frames must be an integer, got {row['num_frames']!r}") from None
        if out["num_frames"] < 1:
            raise ValueError(f"{where}: num_frames must be >= 1, got {out['num_frames']}")
    return out


@DATASETS.register_module()
class VideoManifestDataset(VideoClipDataset):
    """Videos listed in a manifest (.jsonl or .csv rows {path, caption[, num_frames, fps]}), paths relative to root.

    `manifest` is absolute or relative to `root` (or, failing that, to the working directory).
    `cache_bytes`: keep the decoded videos in memory if all fit in this (per process; see VideoClipDataset).
    `allow_outside_root`: accept rows whose path leaves `root` (`..`, or absolute elsewhere); else they are an error.
    """

    def __init__(self, root: str, manifest: str, num_frames: int, image_size: int | tuple[int, int],
                 sample_interval: int = 1, random_crop: bool = True, seed: int = 0,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, allow_outside_root: bool = False):
        super().__init__(root, num_frames, image_size, sample_interval, random_crop, seed, cache_bytes)
        manifest_path = self.root / manifest
        if not manifest_path.is_file() and Path(manifest).is_file():
            manifest_path = Path(manifest)
        self.manifest = manifest_path
        for row in read_manifest(manifest_path):
            # normalised, so the file read is the one checked; an absolute row path replaces the root
            path = Path(os.path.normpath(self.root / row["path"]))
            if not allow_outside_root and not _inside(self.root, path):
                raise ValueError(f"{manifest_path}: line {row['line']}: path {row['path']!r} is outside the dataset "
                                 f"root {self.root} (set dataset.allow_outside_root=True to read it anyway)")
            self.videos.append(_Video(path, row["path"], row["caption"], num_frames=row["num_frames"]))


@DATASETS.register_module()
class FrameFolderDataset(VideoClipDataset):
    """Clips stored as image folders, SkyTimelapse layout root/<video>/<clip>/*.jpg; one item per clip.

    Clips shorter than a sampled clip are left out when the dataset is built (their length is known).
    `cache_bytes`: keep the decoded clips in memory if all fit in this (per process; see VideoClipDataset).
    """

    def __init__(self, root: str, num_frames: int, image_size: int | tuple[int, int], sample_interval: int = 1,
                 random_crop: bool = True, seed: int = 0, caption: str = "", cache_bytes: int = DEFAULT_CACHE_BYTES):
        super().__init__(root, num_frames, image_size, sample_interval, random_crop, seed, cache_bytes)
        clips = []
        for clip_dir in sorted(d for d in self.root.glob("*/*") if d.is_dir()):
            frames = sorted((p for p in clip_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS), key=natural_key)
            if frames:
                clips.append(_Video(clip_dir, clip_dir.relative_to(self.root).as_posix(), caption,
                                    tuple(frames), len(frames)))
        if not clips:
            raise ValueError(f"{self.root}: no frame folders found (expected root/<video>/<clip>/*.jpg)")
        self.videos = [c for c in clips if c.num_frames >= self.span]
        if len(self.videos) < len(clips):
            log.warning("%s: %d of %d clips have fewer than %d frames and are not used",
                        self.root, len(clips) - len(self.videos), len(clips), self.span)
        if not self.videos:
            raise ValueError(f"{self.root}: no clip has the {self.span} frames a sample needs")


def class_caption(name: str) -> str:
    """A class folder name as words: "ApplyEyeMakeup" -> "apply eye makeup", "YoYo" -> "yo yo"."""
    words = re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+", name)
    return " ".join(words).lower()


@DATASETS.register_module()
class ClassFolderDataset(VideoClipDataset):
    """Videos grouped by class, UCF-101 layout root/<Class>/*.avi; the caption is the class name in words.

    `cache_bytes`: keep the decoded videos in memory if all fit in this (per process; see VideoClipDataset).
    """

    def __init__(self, root: str, num_frames: int, image_size: int | tuple[int, int], sample_interval: int = 1,
                 random_crop: bool = True, seed: int = 0, extensions: tuple[str, ...] = (".avi", ".mp4"),
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        super().__init__(root, num_frames, image_size, sample_interval, random_crop, seed, cache_bytes)
        extensions = tuple(e.lower() for e in extensions)
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        for name in self.classes:
            for path in sorted((self.root / name).iterdir()):
                if path.is_file() and path.suffix.lower() in extensions:
                    self.videos.append(_Video(path, f"{name}/{path.name}", class_caption(name)))
        if not self.videos:
            raise ValueError(f"{self.root}: no {'/'.join(extensions)} files in class folders root/<Class>/")


@dataclass(frozen=True)
class _Latent:
    shard: Path
    key: str
    caption: str
    num_frames: int


@DATASETS.register_module()
class LatentDataset(ClipDataset):
    """Latent videos cached by tools/encode_latents.py (root = its --out directory); clips as for pixels.

    Reads only the clip's frames from the memory-mapped safetensors shards; never builds a VAE. Items
    have "latents" (C, num_frames, h, w) float32. Latent videos shorter than a clip are left out.
    """

    def __init__(self, root: str, num_frames: int, sample_interval: int = 1, seed: int = 0):
        super().__init__(root, num_frames, sample_interval, seed)
        index_path = self.root / LATENT_INDEX_FILE
        if not index_path.is_file():
            raise ValueError(f"{index_path}: not found (write it with tools/encode_latents.py)")
        try:
            index = json.loads(index_path.read_text())
            if index.get("format") != LATENT_FORMAT:
                raise ValueError(f"format is {index.get('format')!r}, expected {LATENT_FORMAT!r}")
            items = [_Latent(Path(os.path.normpath(self.root / it["shard"])), it["key"], it["caption"],
                             int(it["num_frames"])) for it in index["items"]]
            self.sources = {it["key"]: it["path"] for it in index["items"]}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index_path}: not a latent index ({first_line(err)})") from None
        for number, entry in enumerate(index["items"], 1):
            # tools/encode_latents.py writes bare shard names: one leaving the root was edited in
            if not _inside(self.root, self.root / entry["shard"]):
                raise ValueError(f"{index_path}: item {number}: shard {entry['shard']!r} is outside the dataset "
                                 f"root {self.root}")
        self.latents = [it for it in items if it.num_frames >= self.span]
        if len(self.latents) < len(items):
            log.warning("%s: %d of %d latent videos have fewer than %d frames and are not used",
                        index_path, len(items) - len(self.latents), len(items), self.span)
        if not self.latents:
            raise ValueError(f"{index_path}: no latent video has the {self.span} frames a sample needs")

    def __len__(self) -> int:
        return len(self.latents)

    def source(self, index: int) -> tuple[str, str]:
        item = self.latents[index]
        return self.sources[item.key], item.caption

    def load(self, index: int, generator: torch.Generator) -> dict:
        item = self.latents[index]
        name = f"{item.shard}[{item.key}]"
        frames = self.clip_indices(item.num_frames, generator, name)
        try:
            with safe_open(os.fspath(item.shard), framework="pt") as f:
                z = f.get_slice(item.key)[:, frames.start:frames.stop]  # (C, span, h, w)
        except (OSError, SafetensorError) as err:
            raise VideoReadError(f"{name}: cannot read latents ({first_line(err)})") from err
        if z.dim() != 4 or z.shape[1] != self.span:
            raise VideoReadError(f"{name}: stored shape {tuple(z.shape)} does not hold {item.num_frames} frames")
        return {"latents": z[:, ::self.sample_interval].float().contiguous(), "caption": item.caption}


@DATASETS.register_module()
class RepeatDataset(Dataset):
    """A dataset (config dict) listed `times` times per epoch, to overfit a few clips with a larger batch.

    Copies share the inner item's clip start and crop within an epoch; "index" is the outer index, so
    the trainer's per-sample noise and timesteps still differ between copies.
    """

    def __init__(self, dataset: dict, times: int):
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        self.dataset = build(DATASETS, dataset, "dataset.dataset")
        self.times = times

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def source(self, index: int) -> tuple[str, str]:
        return self.dataset.source(index % len(self.dataset))

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index % len(self.dataset)]
        item["index"] = index
        return item
