"""Caption switches to train on: some clips begin with another caption's frames and switch to their own.

A model trained only on clips whose frames all match their caption learns to follow its past frames and to
ignore a new caption. Here an item's first `switch_at` frames may come from a clip with another caption; the
training loss then counts the sample only when its noisy chunk starts at or after that frame, so the model
learns to turn towards the new caption's content from the other clip's past (as LongLive tunes for prompt
switches), never to draw the old content under the new caption.
"""

import torch
from torch.utils.data import Dataset

from causalvdm.data.sampler import derive_seed
from causalvdm.registry import DATASETS, build

SWITCH_STREAM = 1  # the key that keeps this wrapper's draws apart from the inner dataset's own


@DATASETS.register_module()
class CaptionSwitchDataset(Dataset):
    """A dataset (config dict) whose items, with probability `prob`, start with another caption's frames.

    Adds "switch_at" (int) to every item: 0 for an item left whole, else the frame s where its own frames begin
    (frames [0, s) are the same frames of an item with a different caption). s is drawn from the chunk boundaries
    1, 1 + chunk_size, ... of the clip, where a sampler switches prompts. Draws come from (seed, epoch, index).
    """

    def __init__(self, dataset: dict, prob: float, chunk_size: int, seed: int = 0):
        if not 0 <= prob <= 1:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        if chunk_size < 1 or seed < 0:
            raise ValueError(f"need chunk_size >= 1 and seed >= 0, got {chunk_size}, {seed}")
        self.dataset = build(DATASETS, dataset, "dataset.dataset")
        self.prob, self.chunk_size, self.seed = prob, chunk_size, seed
        self.epoch = 0
        by_caption: dict[str, list[int]] = {}
        for index in range(len(self.dataset)):
            by_caption.setdefault(self.dataset.source(index)[1], []).append(index)
        if prob > 0 and len(by_caption) < 2:
            raise ValueError("CaptionSwitchDataset needs clips with at least two different captions, got "
                             f"{len(by_caption)}")
        self.by_caption = list(by_caption.values())
        self.caption_of = {index: group for group, indices in enumerate(self.by_caption) for index in indices}

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def source(self, index: int) -> tuple[str, str]:
        return self.dataset.source(index)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]  # checks the index
        index %= len(self)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index, SWITCH_STREAM))
        item["switch_at"] = 0
        if float(torch.rand((), generator=gen)) >= self.prob:
            return item
        groups = [g for g in range(len(self.by_caption)) if g != self.caption_of[index]]
        group = self.by_caption[groups[int(torch.randint(len(groups), (1,), generator=gen))]]
        other = self.dataset[group[int(torch.randint(len(group), (1,), generator=gen))]]
        key = "latents" if "latents" in item else "video"
        frames = item[key].shape[1]
        boundaries = list(range(1, frames, self.chunk_size))
        switch_at = boundaries[int(torch.randint(len(boundaries), (1,), generator=gen))]
        item[key] = torch.cat([other[key][:, :switch_at], item[key][:, switch_at:]], dim=1)
        item["switch_at"] = switch_at
        item["skipped"] += other["skipped"]
        return item
