"""A bounded in-memory store of decoded videos, so a small dataset is decoded once per process, not once per item."""

import torch

# Per process: the main process and every DataLoader worker each hold their own copy, so a run can use up
# to (num_workers + 1) x this per rank. Enough for a few hundred short clips at 64-128 px.
DEFAULT_CACHE_BYTES = 512 * 2**20


class FrameCache:
    """Tensors by key, holding at most `max_bytes` in total; what does not fit is not stored, nothing is evicted.

    No eviction on purpose: training reads every item once per epoch in random order, so when a dataset
    does not fit, any eviction policy would throw away frames just before they are needed again.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"cache max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: int) -> torch.Tensor | None:
        return self._items.get(key)

    def fits(self, nbytes: int) -> bool:
        """Whether `nbytes` more can be stored."""
        return self.nbytes + nbytes <= self.max_bytes

    def put(self, key: int, value: torch.Tensor) -> bool:
        """Store `value` under a new `key` if it fits; returns whether it was stored."""
        nbytes = value.numel() * value.element_size()
        if key in self._items or not self.fits(nbytes):
            return False
        self._items[key] = value
        self.nbytes += nbytes
        return True
