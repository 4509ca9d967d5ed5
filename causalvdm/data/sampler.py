"""Resumable, rank-sharded sampling of dataset indices, and the DataLoader built around it."""

import os
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integer keys, e.g. (seed, epoch, index).

    numpy's SeedSequence hashes the keys, so nearby keys give unrelated streams (seed + index would not).
    """
    if any(k < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative, got {keys}")
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


class StatefulSampler(Sampler[int]):
    """This rank's share of a seeded permutation of range(num_samples), resumable mid-epoch.

    The permutation depends only on (seed, epoch), never on world_size: rank r takes perm[r::world_size]
    after dropping the tail so that every rank gets num_samples // world_size indices. `set_epoch(epoch,
    start)` skips the first `start` of them, so a run resumed after `start` samples continues exactly.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"StatefulSampler: rank {rank} is not in [0, world_size={world_size})")
        if num_samples < world_size:
            raise ValueError(f"StatefulSampler: {num_samples} samples cannot be shared by {world_size} ranks")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.per_rank = num_samples // world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the permutation of `epoch` and skip this rank's first `start` indices of it."""
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"StatefulSampler: start {start} is not in [0, {self.per_rank}] for epoch {epoch}")
        self.epoch, self.start = epoch, start

    def permutation(self) -> torch.Tensor:
        """The whole epoch's order of all num_samples indices (the same on every rank)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=gen)

    def __iter__(self):
        used = self.per_rank * self.world_size
        mine = self.permutation()[:used][self.rank::self.world_size]
        return iter(mine[self.start:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


# Beyond this many workers per rank, more only add start-up time (workers are re-created every epoch) and
# memory (each holds its own clip cache): decoding at the crop size plus the cache make a batch cheap.
MAX_DEFAULT_WORKERS = 8


def default_num_workers(local_world_size: int = 1, cuda: bool | None = None) -> int:
    """DataLoader workers per rank for this machine: the CPUs this process may use, split between the
    `local_world_size` ranks on this node, less one per rank for the training process itself, capped at
    MAX_DEFAULT_WORKERS. E.g. 2 CPUs, 1 rank -> 1; 16 CPUs, 1 rank -> 8; 16 CPUs, 8 ranks -> 1.
    Without CUDA (`cuda` defaults to torch.cuda.is_available()), 0: the model then runs on every CPU, so
    a worker only takes turns with it (the 2-core demo measured no faster, if anything slower, with one).
    """
    if local_world_size < 1:
        raise ValueError(f"local_world_size must be >= 1, got {local_world_size}")
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return 0
    # the CPUs this process may run on (a container or taskset may allow fewer than the machine has)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(MAX_DEFAULT_WORKERS, cpus // local_world_size - 1))


def _seed_worker(worker_id: int) -> None:
    # torch already seeds each worker with base_seed + worker_id (base_seed drawn from the loader's
    # generator); give Python's and numpy's global generators the same seed for any library that uses them.
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed % 2**32)


def build_dataloader(dataset: Dataset, batch_size: int, num_workers: int, sampler: Sampler,
                     seed: int) -> DataLoader:
    """A DataLoader over `sampler`'s indices: full batches only, fresh workers each epoch, seeded workers.

    Workers are not persistent so that `dataset.set_epoch` (called in the main process before iterating)
    reaches them; pinned memory only when CUDA is present.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
