"""The shared temporal KV cache: a bounded queue of the clean conditioning frames' keys and values.

Every denoising step of a chunk reads the same cache; only `commit()` (after a t = 0 pass over
the finished chunk) changes it. The queue is a ring buffer: frame at absolute position p lives in
slot p % capacity, so appending evicts the oldest frames without moving any other.
"""

import copy

import torch


def staged_mask(num_new: int, bidirectional: bool) -> torch.Tensor:
    """Which of this call's frames each new frame sees -> (T, T) bool: causal, or all of them."""
    mask = torch.ones(num_new, num_new, dtype=torch.bool)
    return mask if bidirectional else mask.tril()


class KVCache:
    """Per-layer temporal keys/values of the last `capacity` clean frames, preallocated.

    Buffers are (num_layers, B*S, heads, capacity + chunk_size, head_dim): slots [0, capacity)
    hold the queue in ring order, the last `chunk_size` slots stage the frames of the current
    call so attention reads one contiguous view instead of concatenating the cache every step.
    They are allocated on first use, when the token count S and the head shape are known.
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int, chunk_size: int):
        if capacity < 1 or chunk_size < 1:
            raise ValueError(f"KV cache needs capacity >= 1 and chunk_size >= 1, got {capacity}, {chunk_size}")
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.capacity = capacity
        self.chunk_size = chunk_size
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.slot_pos = torch.full((capacity,), -1, dtype=torch.long)  # absolute position per slot, -1 empty
        self.next_position = 0  # absolute position of the next frame to be written
        self._num_new = 0

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
        """The queue's contents and positions (the staging slots are scratch and not saved)."""
        ring = slice(0, self.capacity)
        return {
            "k": None if self.k is None else self.k[:, :, :, ring].clone(),
            "v": None if self.v is None else self.v[:, :, :, ring].clone(),
            "slot_pos": self.slot_pos.clone(),
            "next_position": self.next_position,
            "capacity": self.capacity,
            "batch_size": self.batch_size,
            "num_layers": self.num_layers,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; the cache must have the same capacity, batch size and depth."""
        for name in ("capacity", "batch_size", "num_layers"):
            if state[name] != getattr(self, name):
                raise ValueError(f"cache state has {name}={state[name]}, this cache has {getattr(self, name)}")
        self.slot_pos = state["slot_pos"].clone()
        self.next_position = int(state["next_position"])
        if state["k"] is None:
            self.k = self.v = None
            return
        self._allocate(state["k"])
        self.k[:, :, :, : self.capacity].copy_(state["k"])
        self.v[:, :, :, : self.capacity].copy_(state["v"])

    def _allocate(self, like: torch.Tensor) -> None:
        """Allocate both buffers like a (L or nothing, B*S, H, T, Dh) tensor: its trailing shape, dtype and device."""
        rows, heads, _, head_dim = like.shape[-4:]
        if rows % self.batch_size:
            raise ValueError(f"cache built for batch size {self.batch_size}, got {rows} token rows")
        self.allocate(rows // self.batch_size, heads, head_dim, like.dtype, like.device)

    def allocate(self, tokens_per_frame: int, heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        """Preallocate both buffers (B * tokens_per_frame rows); nothing happens if they already are so.

        Done before the first call, so a compiled step sees fixed buffers: stored in the model's dtype (bf16
        halves the bytes) at static addresses, which CUDA graphs then read and write in place.
        """
        shape = (self.num_layers, self.batch_size * tokens_per_frame, heads, self.capacity + self.chunk_size, head_dim)
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
        return torch.arange(self.next_position, self.next_position + num_frames)

    def attn_mask(self, bidirectional: bool, device: torch.device) -> torch.Tensor:
        """Which keys each new frame sees -> (T, capacity + T) bool: filled slots, then staged frames."""
        filled = (self.slot_pos >= 0).expand(self._num_new, -1)
        return torch.cat([filled, staged_mask(self._num_new, bidirectional)], dim=1).to(device)

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this call's keys/values (B*S, H, T, Dh) of `layer` to the staging slots, as plain values."""
        if self.k is None:
            self._allocate(k)
        if k.shape[0] != self.k.shape[1]:
            raise ValueError(f"cache holds {self.k.shape[1]} token rows per frame, got {k.shape[0]}")
        end = self.capacity + k.shape[2]
        self.k[layer, :, :, self.capacity : end] = k.detach()
        self.v[layer, :, :, self.capacity : end] = v.detach()

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage this call's keys/values (B*S, H, T, Dh) -> (B*S, H, capacity + T, Dh) keys/values to attend to.

        Without autograd they are views of the buffers. A call that records a graph (a user outside no_grad,
        a student trained through the cache) attends to the queue joined with its own k, v instead, so the
        gradient reaches them and the buffers never hold a graph.
        """
        self.stage(layer, k, v)
        ring = slice(0, self.capacity)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            return (torch.cat([self.k[layer, :, :, ring], k], dim=2),
                    torch.cat([self.v[layer, :, :, ring], v], dim=2))
        end = self.capacity + k.shape[2]
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self) -> None:
        """Append the staged frames of every layer to the queue, evicting the oldest when full."""
        n = self._num_new
        keep = min(n, self.capacity)  # of a call longer than the queue only the last frames survive
        positions = torch.arange(self.next_position + n - keep, self.next_position + n)
        slots = positions % self.capacity
        # Frame by frame: a staged slot never is a queue slot, and copying the whole staged block at once
        # would need a clone of it (all layers, tens of MB) allocated and page-faulted on every commit.
        for slot, staged in zip(slots.tolist(), range(self.capacity + n - keep, self.capacity + n)):
            self.k[:, :, :, slot].copy_(self.k[:, :, :, staged])
            self.v[:, :, :, slot].copy_(self.v[:, :, :, staged])
        self.slot_pos[slots] = positions
        self.next_position += n
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
