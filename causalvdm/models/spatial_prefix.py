"""Prefix-enhanced spatial attention (Ca2-VDM): which earlier frames a chunk's spatial attention also reads, the
attention over a frame's own tokens plus theirs, and the ring of those frames' spatial keys/values a KV cache keeps."""

import copy

import torch


def spatial_prefix_frames(spatial_prefix: str | None) -> int:
    """How many earlier frames a chunk's spatial attention reads: 0 (None), 1 ('first_frame'), N ('prev_frames_N')."""
    if spatial_prefix is None:
        return 0
    if spatial_prefix == "first_frame":
        return 1
    count = spatial_prefix.removeprefix("prev_frames_")
    if spatial_prefix.startswith("prev_frames_") and count.isdigit() and int(count) >= 1:
        return int(count)
    raise ValueError(f"spatial_prefix must be None, 'first_frame' or 'prev_frames_N' (N >= 1), got {spatial_prefix!r}")


def spatial_context(spatial_prefix: str | None, start: int) -> list[int]:
    """Positions of the frames whose spatial tokens a chunk starting at frame `start` also attends to: frame 0, or
    the (up to) N frames just before the chunk; none for frames at the very start."""
    if spatial_prefix is None or start == 0:
        return []
    if spatial_prefix == "first_frame":
        return [0]
    return list(range(max(0, start - spatial_prefix_frames(spatial_prefix)), start))


def attend_with_context(q, k, v, context_k, context_v, mask=None) -> torch.Tensor:
    """Spatial attention of T frames (B*T, H, S, Dh) over their own tokens plus context tokens (B, H, C, Dh) shared by
    the frames of a row; mask (1, C + S) bool hides empty context slots -> (B*T, H, S, Dh)."""
    rows, heads, _, head_dim = context_k.shape
    frames = q.shape[0] // rows
    keys = torch.cat([context_k[:, None].expand(-1, frames, -1, -1, -1).reshape(rows * frames, heads, -1, head_dim), k],
                     dim=2)
    values = torch.cat([context_v[:, None].expand(-1, frames, -1, -1, -1).reshape(rows * frames, heads, -1, head_dim),
                        v], dim=2)
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


class SpatialPrefixRing:
    """Per layer, the spatial keys/values of the frames a chunk's spatial attention reads, kept by cache writes.

    Frame 0 for ever ('first_frame'), or the last N written frames in a ring of N slots ('prev_frames_N'), as
    (B, heads, slots, S, head_dim); no slots without a prefix. A `KVCache` owns it: it begins and commits its calls,
    allocates and moves its buffers. Writes fill them (`stage`), reads never do (`mask`, `context`).
    """

    def __init__(self, num_layers: int, batch_size: int, spatial_prefix: str | None):
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.spatial_prefix = spatial_prefix
        self.slots = spatial_prefix_frames(spatial_prefix)
        self.k: list[torch.Tensor] = []  # per layer (B, H, slots, S, Dh); empty without a prefix
        self.v: list[torch.Tensor] = []
        self.pos = torch.full((self.slots,), -1, dtype=torch.long)  # position per slot, -1 empty
        self._new = (torch.zeros(0, dtype=torch.long), None, None)  # see begin()

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        """Every layer's key and value buffer (none before allocation or without a prefix)."""
        return (*self.k, *self.v)

    def reset(self) -> None:
        """Forget every frame; buffers are kept for reuse."""
        self.pos.fill_(-1)

    def clone(self) -> "SpatialPrefixRing":
        """An independent copy (its buffers not yet marked static: the cloning cache does that)."""
        other = copy.copy(self)
        other.k, other.v = [t.clone() for t in self.k], [t.clone() for t in self.v]
        other.pos = self.pos.clone()
        return other

    def rows(self, start: int, count: int) -> "SpatialPrefixRing":
        """An empty ring of `count` rows whose buffers are rows start.. start + count of this one's (views)."""
        other = SpatialPrefixRing(self.num_layers, count, self.spatial_prefix)
        other.k, other.v = [t[start:start + count] for t in self.k], [t[start:start + count] for t in self.v]
        return other

    def state_dict(self) -> dict:
        """The buffers (L, B, H, slots, S, Dh), None before allocation or without a prefix, and the position held
        in each slot; the keys are those of the cache's own state."""
        return {
            "spatial_k": torch.stack(self.k) if self.k else None,
            "spatial_v": torch.stack(self.v) if self.v else None,
            "spatial_pos": self.pos.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`, into the buffers (if allocated) in their own device and dtype."""
        self.pos = state["spatial_pos"].clone()
        if self.k and state["spatial_k"] is not None:
            for buffer, saved in zip((*self.k, *self.v), (*state["spatial_k"], *state["spatial_v"])):
                buffer.copy_(saved)

    def allocate(self, tokens_per_frame: int, heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        """Preallocate the buffers (with a prefix, once): done with the cache's own, before its first call."""
        if self.slots and not self.k:
            shape = (self.batch_size, heads, self.slots, tokens_per_frame, head_dim)
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
            self.v = [torch.zeros_like(buffer) for buffer in self.k]

    def move(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the buffers (in `dtype`) and the current call's indices to `device`."""
        self.k, self.v = [t.to(device, dtype) for t in self.k], [t.to(device, dtype) for t in self.v]
        kept, index, slots = self._new
        if index is not None:
            self._new = (kept, index.to(device), slots.to(device))

    def begin(self, start: int, num_frames: int, device) -> None:
        """Start the cache's call on frames start.. start + num_frames - 1: find those a later chunk reads."""
        new = torch.arange(start, start + num_frames)
        if self.spatial_prefix == "first_frame":
            kept = new[new == 0]
        else:
            kept = new[max(0, len(new) - self.slots):] if self.slots else new[:0]
        # Their positions, their indices among the call's frames and their slots (on the buffers' device), made
        # once for every layer of a write.
        self._new = (kept, (kept - start).to(device), (kept % max(self.slots, 1)).to(device))

    def commit(self) -> None:
        """The frames of the call kept here now hold their slots."""
        kept = self._new[0]
        self.pos[kept % max(self.slots, 1)] = kept

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the spatial keys/values (B*T, H, S, Dh) of this write's frames that later chunks will read."""
        kept, index, slots = self._new
        if not len(kept):
            return
        for buffer, new in ((self.k[layer], k), (self.v[layer], v)):
            frames = new.detach().view(self.batch_size, -1, *new.shape[1:]).index_select(1, index)  # (B, m, H, S, Dh)
            buffer.index_copy_(2, slots, frames.transpose(1, 2))

    def mask(self, tokens_per_frame: int, device) -> torch.Tensor | None:
        """Keys a reading call's spatial attention may use -> (1, slots * S + S) bool: written slots, own tokens;
        None once every slot is written (an unmasked attention takes the faster kernels)."""
        if bool((self.pos >= 0).all()):
            return None
        written = (self.pos >= 0).repeat_interleave(tokens_per_frame)
        return torch.cat([written, torch.ones(tokens_per_frame, dtype=torch.bool)])[None].to(device)

    def context(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept spatial keys and values of `layer` -> each (B, H, slots * S, Dh)."""
        k, v = self.k[layer], self.v[layer]  # (B, H, slots, S, Dh)
        return k.flatten(2, 3), v.flatten(2, 3)
