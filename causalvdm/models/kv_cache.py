"""The shared temporal KV cache: a bounded queue of the clean conditioning frames' keys and values.

Every denoising step of a chunk reads the same cache; only `commit()` (after a t = 0 pass over
the finished chunk) changes it. The queue is a ring buffer of capacity + chunk_size slots: frame at
absolute position p lives in slot p % slots. A call writes its frames' keys/values straight into the
slots they will keep (those of frames already out of the queue), so appending moves nothing and
commit only advances the position; the attention mask hides every slot outside the queue.
"""

import copy

import torch


def staged_mask(num_new: int, bidirectional: bool) -> torch.Tensor:
    """Which of this call's frames each new frame sees -> (T, T) bool: causal, or all of them."""
    mask = torch.ones(num_new, num_new, dtype=torch.bool)
    return mask if bidirectional else mask.tril()


class KVCache:
    """Per-layer temporal keys/values of the last `capacity` clean frames, preallocated.

    Buffers are (num_layers, B*S, heads, capacity + chunk_size, head_dim), one ring: the queue's frames and
    the (up to chunk_size) frames of the current call, each in slot position % (capacity + chunk_size), so
    attention reads one fixed-size view of the buffers instead of concatenating the cache every step.
    `allocate()` (done by `model.prepare`) sizes them once the token count S and the head shape are known.
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int, chunk_size: int):
        if capacity < 1 or chunk_size < 1:
            raise ValueError(f"KV cache needs capacity >= 1 and chunk_size >= 1, got {capacity}, {chunk_size}")
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.capacity = capacity
        self.chunk_size = chunk_size
        self.num_slots = capacity + chunk_size
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.slot_pos = torch.full((self.num_slots,), -1, dtype=torch.long)  # absolute position per slot, -1 empty
        self.next_position = 0  # absolute position of the next frame to be written
        self._num_new = 0
        self._slots: torch.Tensor | None = None  # (T,) slots of the current call's frames, on the buffers' device

    def __len__(self) -> int:
        return min(self.next_position, self.capacity)

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers (0 before the first write)."""
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes

    @property
    def positions(self) -> torch.Tensor:
        """Absolute positions of the cached frames, oldest first -> (len,)."""
        return torch.arange(self.next_position - len(self), self.next_position)

    def reset(self) -> None:
        """Forget every frame; buffers are kept for reuse."""
        self.slot_pos.fill_(-1)
        self.next_position = 0

    def clone(self) -> "KVCache":
        """An independent copy, to branch a generation."""
        other = copy.copy(self)
        other.k = None if self.k is None else self.k.clone()
        other.v = None if self.v is None else self.v.clone()
        other.slot_pos = self.slot_pos.clone()
        return other

    def state_dict(self) -> dict:
        """The queue's keys/values (L, B*S, H, len, Dh), oldest first, and its positions."""
        slots = self.positions % self.num_slots
        return {
            "k": None if self.k is None else self.k[:, :, :, slots.to(self.k.device)],
            "v": None if self.v is None else self.v[:, :, :, slots.to(self.v.device)],
            "next_position": self.next_position,
            "capacity": self.capacity,
            "chunk_size": self.chunk_size,
            "batch_size": self.batch_size,
            "num_layers": self.num_layers,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; the cache must have the same capacity, chunk size, batch size and depth."""
        for name in ("capacity", "chunk_size", "batch_size", "num_layers"):
            if state.get(name) != getattr(self, name):
                raise ValueError(f"cache state has {name}={state.get(name)}, this cache has {getattr(self, name)}")
        self.next_position = int(state["next_position"])
        positions = self.positions
        slots = positions % self.num_slots
        self.slot_pos = torch.full((self.num_slots,), -1, dtype=torch.long)
        self.slot_pos[slots] = positions
        if state["k"] is None:
            self.k = self.v = None
            return
        self._allocate(state["k"])
        self.k[:, :, :, slots.to(self.k.device)] = state["k"].to(self.k)
        self.v[:, :, :, slots.to(self.v.device)] = state["v"].to(self.v)

    def _allocate(self, like: torch.Tensor) -> None:
        """Allocate both buffers like a (L or nothing, B*S, H, T, Dh) tensor: its trailing shape, dtype and device."""
        rows, heads, _, head_dim = like.shape[-4:]
        if rows % self.batch_size:
            raise ValueError(f"cache built for batch size {self.batch_size}, got {rows} token rows")
        self.allocate(rows // self.batch_size, heads, head_dim, like.dtype, like.device)
        if self._slots is not None:
            self._slots = self._slots.to(like.device)

    def allocate(self, tokens_per_frame: int, heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        """Preallocate both buffers (B * tokens_per_frame rows); nothing happens if they already are so.

        Done before the first call, so a compiled step sees fixed buffers: stored in the model's dtype (bf16
        halves the bytes) at static addresses, which CUDA graphs then read and write in place.
        """
        shape = (self.num_layers, self.batch_size * tokens_per_frame, heads, self.num_slots, head_dim)
        if self.k is None:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros_like(self.k)
        elif self.k.shape != shape:
            raise ValueError(f"cache holds buffers of shape {tuple(self.k.shape)}, this call needs {shape}")
        elif self.k.dtype != dtype or self.k.device != torch.device(device):
            self.k, self.v = self.k.to(device, dtype), self.v.to(device, dtype)  # e.g. a state loaded on the CPU
        else:
            return
        torch._dynamo.mark_static_address(self.k)
        torch._dynamo.mark_static_address(self.v)

    def begin(self, num_frames: int) -> torch.Tensor:
        """Start a call on `num_frames` new frames; returns their absolute positions (T,)."""
        if num_frames > self.chunk_size:
            raise ValueError(
                f"{num_frames} frames in one call, but the cache stages at most chunk_size={self.chunk_size}; "
                "pass a larger chunk_size to new_cache()"
            )
        self._num_new = num_frames
        device = self.k.device if self.k is not None else None
        self._slots = self._new_slots.to(device)  # a tensor, so a compiled step does not see the slots change
        return torch.arange(self.next_position, self.next_position + num_frames)

    @property
    def _new_slots(self) -> torch.Tensor:
        """Slots of the current call's frames, on the CPU (T,)."""
        return torch.arange(self.next_position, self.next_position + self._num_new) % self.num_slots

    def attn_mask(self, bidirectional: bool, device: torch.device) -> torch.Tensor:
        """Which slots each new frame sees -> (T, capacity + chunk_size) bool: the queue, then this call's frames
        causally (or all of them); slots of frames out of the queue, or not written, are hidden."""
        start = self.next_position
        queued = (self.slot_pos >= max(start - self.capacity, 0)) & (self.slot_pos < start)  # (slots,)
        mask = queued.expand(self._num_new, -1).clone()
        mask[:, self._new_slots] = staged_mask(self._num_new, bidirectional)
        return mask.to(device)

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this call's keys/values (B*S, H, T, Dh) of `layer` into their slots, as plain values."""
        if self.k is None:
            self._allocate(k)
        if k.shape[0] != self.k.shape[1]:
            raise ValueError(f"cache holds {self.k.shape[1]} token rows per frame, got {k.shape[0]}")
        self.k[layer].index_copy_(2, self._slots, k.detach())
        self.v[layer].index_copy_(2, self._slots, v.detach())

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage this call's keys/values (B*S, H, T, Dh) -> (B*S, H, capacity + chunk_size, Dh) to attend to.

        Without autograd they are the buffers themselves. A call that records a graph (a user outside no_grad,
        a student trained through the cache) attends to a copy of them holding its own k, v, so the gradient
        reaches them and the buffers never hold a graph.
        """
        self.stage(layer, k, v)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            return self.k[layer].index_copy(2, self._slots, k), self.v[layer].index_copy(2, self._slots, v)
        return self.k[layer], self.v[layer]

    def commit(self) -> None:
        """Make the frames of the last call part of the queue (their keys/values are in place already); the
        oldest leave it when it is full."""
        self.slot_pos[self._new_slots] = torch.arange(self.next_position, self.next_position + self._num_new)
        self.next_position += self._num_new
        self._num_new = 0


class ReferenceKVCache:
    """A naive cache for verification: keeps every frame, concatenates, attends to the last `capacity`.

    Same protocol as `KVCache` (allocate / begin / attn_mask / stage / attend / commit); slow and unbounded on purpose.
    """

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.values: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.staged: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.next_position = 0
        self._num_new = 0

    def __len__(self) -> int:
        return min(self.next_position, self.capacity)

    def allocate(self, *args) -> None:
        """Nothing to preallocate: this cache grows by concatenation."""

    def begin(self, num_frames: int) -> torch.Tensor:
        self._num_new = num_frames
        return torch.arange(self.next_position, self.next_position + num_frames)

    def attn_mask(self, bidirectional: bool, device: torch.device) -> torch.Tensor:
        past = torch.ones(self._num_new, len(self), dtype=torch.bool)
        return torch.cat([past, staged_mask(self._num_new, bidirectional)], dim=1).to(device)

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.staged[layer] = (k.detach(), v.detach())

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.stage(layer, k, v)
        all_k = torch.cat(self.keys[layer] + [k], dim=2)
        all_v = torch.cat(self.values[layer] + [v], dim=2)
        start = all_k.shape[2] - k.shape[2] - len(self)
        return all_k[:, :, start:], all_v[:, :, start:]

    def commit(self) -> None:
        for layer, (k, v) in enumerate(self.staged):
            self.keys[layer].append(k)
            self.values[layer].append(v)
        self.staged = [None] * len(self.staged)
        self.next_position += self._num_new
        self._num_new = 0
