"""Video datasets: clips of `num_frames` frames at a fixed stride from a random start, as diffusion inputs.

Items: {"video": (3, T, H, W) float in [-1, 1]} or {"latents": (C, T, h, w)}, plus "caption" (str), "index"
(the requested index) and "skipped" (unreadable files skipped to produce it). All randomness of item `i`
comes from a generator seeded by (seed, epoch, i), so it does not depend on workers, batch layout or caching.

This module holds the base of every dataset and the repeat wrapper; the pixel datasets read through
video_clips.VideoClipDataset (manifest.py, folders.py), the cached latents through latents.py.
"""

import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from causalvdm.data.sampler import derive_seed
from causalvdm.data.video_io import NoReadableItemError, VideoReadError
from causalvdm.registry import DATASETS, build

log = logging.getLogger("causalvdm.data")


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

    def generator(self, index: int, copy: int = 0) -> torch.Generator:
        """The generator of item `index` in the current epoch, seeded by (seed, epoch, index), and by `copy` too for
        RepeatDataset's later copies."""
        keys = (self.seed, self.epoch, index) + ((copy,) if copy else ())
        return torch.Generator().manual_seed(derive_seed(*keys))

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
        return self.get(index)

    def get(self, index: int, copy: int = 0) -> dict:
        """Item `index` as drawn for copy `copy` (0: the item itself; RepeatDataset's later copies draw their own
        clip start and crop), the next readable item if it is unreadable."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        for skipped in range(n):
            j = (index + skipped) % n
            if j in self._bad:
                continue
            try:
                item = self.load(j, self.generator(j, copy))
            except VideoReadError as err:
                self._bad.add(j)
                log.warning("skipping unreadable item: %s", err)
                continue
            item.update(index=index, skipped=skipped)
            return item
        raise NoReadableItemError(f"{type(self).__name__}: none of the {n} items under {self.root} can be read "
                                  "(see the warnings above)")


@DATASETS.register_module()
class RepeatDataset(Dataset):
    """A clip dataset (config dict) listed `times` times per epoch, to learn a few videos with a larger batch.

    Each copy draws its own clip start and crop, so a batch holds as many windows of a long video as copies of it
    (copy 0 is the inner dataset's own item). "index" is the outer index, which seeds the trainer's per-sample noise
    and timesteps.
    """

    def __init__(self, dataset: dict, times: int):
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        self.dataset = build(DATASETS, dataset, "dataset.dataset")
        if not isinstance(self.dataset, ClipDataset):
            raise ValueError("dataset.dataset: RepeatDataset repeats a clip dataset (one that reads videos, frames or "
                             f"latents), got {type(self.dataset).__name__}")
        self.times = times

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def source(self, index: int) -> tuple[str, str]:
        return self.dataset.source(index % len(self.dataset))

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        n, i = len(self.dataset), index % len(self)
        item = self.dataset.get(i % n, copy=i // n)
        item["index"] = index
        return item
