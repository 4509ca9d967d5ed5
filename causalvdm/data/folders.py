"""Videos found by folder layout: frame folders (SkyTimelapse, root/<video>/<clip>/*.jpg) and class folders
(UCF-101, root/<Class>/*.avi, the class name as the caption)."""

import logging
import re

from causalvdm.data.cache import DEFAULT_CACHE_BYTES
from causalvdm.data.video_clips import SourceVideo, VideoClipDataset
from causalvdm.data.video_io import IMAGE_EXTENSIONS, natural_key
from causalvdm.registry import DATASETS

log = logging.getLogger("causalvdm.data")


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
                clips.append(SourceVideo(clip_dir, clip_dir.relative_to(self.root).as_posix(), caption,
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
                    self.videos.append(SourceVideo(path, f"{name}/{path.name}", class_caption(name)))
        if not self.videos:
            raise ValueError(f"{self.root}: no {'/'.join(extensions)} files in class folders root/<Class>/")
