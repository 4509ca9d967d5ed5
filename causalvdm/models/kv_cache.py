"""The shared temporal KV cache: a bounded queue of the clean conditioning frames' keys and values.

Every denoising step of a chunk reads the same cache; only `commit()` (after a t = 0 pass over
the finished chunk) changes it. The queue is a ring buffer of max_cond_frames + chunk_size slots: frame at
absolute position p lives in slot p % slots. A call writes its frames' keys/values straight into the
slots they will keep (those of frames already out of the queue), so appending moves nothing and
commit only advances the position; the attention mask hides every slot outside the queue.
"""

import copy
from typing import Protocol

import torch

from causalvdm.models.kv_quant import CACHE_DTYPES, SCALE_DTYPE, as_bytes, check_cache_dtype, dequantize, quantize
from causalvdm.models.positional import apply_rope, rope_cos_sin
from causalvdm.models.spatial_prefix import SpatialPrefixRing


# The buffers' slot length is padded up to a multiple of this (the padding always masked): CUDA's masked SDPA
# kernels want the key length of the mask aligned, and a compiled step must never meet an alignment error.
SLOT_ALIGN = 8


# What a saved state and the cache loading it must agree on, with what each means.
STATE_FIELDS = {"max_cond_frames": "the queue's capacity in frames", "chunk_size": "the chunk length",
                "batch_size": "the number of rows", "num_layers": "the depth", "spatial_prefix": "the spatial prefix",
                "sink_frames": "the frame sink"}


def padded_slots(num_slots: int) -> int:
    """Slot length of a cache's buffers for `num_slots` usable slots (sink + max_cond_frames + chunk_size)."""
    return -(-num_slots // SLOT_ALIGN) * SLOT_ALIGN


def staged_mask(num_new: int, bidirectional: bool) -> torch.Tensor:
    """Which of this call's frames each new frame sees -> (T, T) bool: causal, or all of them."""
    mask = torch.ones(num_new, num_new, dtype=torch.bool)
    return mask if bidirectional else mask.tril()


class SpatialCallCache(Protocol):
    """What a model call needs from a cache's spatial prefix (`SpatialPrefixRing`, or the reference's): a write
    keeps its frames' spatial keys/values, a read takes the mask and context of the frames kept."""

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def mask(self, tokens_per_frame: int, device) -> torch.Tensor | None: ...

    def context(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...


class CallCache(Protocol):
    """What a model call needs from a cache (`KVCache`, or the test reference `ReferenceKVCache`): allocate and begin
    a call, its mask, stage / attend the temporal keys/values of each layer, the spatial prefix's reads and writes
    (`spatial`), and commit the call's frames."""

    sink_frames: int
    spatial: SpatialCallCache

    def allocate(self, tokens_per_frame: int, heads: int, head_dim: int, dtype: torch.dtype, device) -> None: ...

    def begin(self, num_frames: int) -> torch.Tensor: ...

    @property
    def call_positions(self) -> torch.Tensor: ...

    def attn_mask(self, bidirectional: bool, device: torch.device) -> torch.Tensor: ...

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def commit(self) -> None: ...


class KVCache:
    """Per-layer temporal keys/values of the last `max_cond_frames` clean frames, preallocated.

    One key and one value buffer per layer, each its own tensor at a static address, (B*S, heads, slots, head_dim):
    a compiled step then writes a call's frames into their slots in place instead of copying a buffer shared by all
    layers. Slots: the sink's, then one ring of the queue's frames and the (up to chunk_size) frames of the current
    call, frame p in slot sink + (p - sink) % (max_cond_frames + chunk_size), then padding up to a multiple of
    SLOT_ALIGN that no frame takes and the mask always hides; attention reads one fixed-size buffer instead of
    concatenating the cache.
    `allocate()` (done by `model.begin_call`) sizes them once the token count S and the head shape are known.

    With a spatial prefix (`model.spatial_prefix`) its `spatial` ring also keeps, per layer, the spatial keys/values
    of the frames a chunk's spatial attention reads (`SpatialPrefixRing`); the cache begins and commits its calls.

    A frame sink (`sink_frames` = s) keeps the first s frames in view for the whole video, in slots 0..s-1 before
    the ring, besides the `max_cond_frames` rolling frames. With RoPE (`rotate_sink`) the sink's keys are turned,
    once per call, to sit just before the oldest rolling frame, so every distance in view stays below
    s + max_cond_frames + chunk_size.

    cache_dtype 'int8' or 'float8_e4m3fn' stores the temporal keys/values in 8 bits with a bf16 scale per token and
    head (`kv_quant`; `k_scale`, `v_scale` (B*S, heads, slots, 1)); a call attends to them dequantized, its own
    frames exact. The spatial prefix keeps the model's dtype.
    """

    def __init__(self, num_layers: int, batch_size: int, max_cond_frames: int, chunk_size: int,
                 spatial_prefix: str | None = None, sink_frames: int = 0, rotate_sink: bool = False,
                 cache_dtype: str | None = None):
        if max_cond_frames < 1 or chunk_size < 1 or sink_frames < 0:
            raise ValueError(f"KV cache needs max_cond_frames >= 1, chunk_size >= 1 and sink_frames >= 0, got "
                             f"{max_cond_frames}, {chunk_size}, {sink_frames}")
        self.cache_dtype = check_cache_dtype(cache_dtype)
        if cache_dtype is not None and rotate_sink and sink_frames:
            raise ValueError(f"an 8-bit cache ({cache_dtype}) cannot turn a RoPE model's sink keys: use sink_frames=0 "
                             "or the model's dtype")
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.max_cond_frames = max_cond_frames
        self.chunk_size = chunk_size
        self.sink_frames = sink_frames
        self.rotate_sink = rotate_sink and sink_frames > 0
        self.sink_k: torch.Tensor | None = None  # RoPE: the sink's keys as written, (L, B*S, H, sink, Dh)
        self._sink_shift = 0  # the rotation the sink slots of `k` hold now
        self.num_slots = sink_frames + max_cond_frames + chunk_size  # the slots a frame can take
        self.padded_slots = padded_slots(self.num_slots)  # the buffers' slot length
        self.k: list[torch.Tensor] = []  # per layer (B*S, H, padded_slots, Dh); empty until allocated
        self.v: list[torch.Tensor] = []
        self.k_scale: list[torch.Tensor] = []  # 8-bit: per layer (B*S, H, padded_slots, 1) bf16; else empty
        self.v_scale: list[torch.Tensor] = []
        self.dtype: torch.dtype | None = None  # the model's dtype, in which calls attend (known once allocated)
        self.slot_pos = torch.full((self.num_slots,), -1, dtype=torch.long)  # absolute position per slot, -1 empty
        self.spatial_prefix = spatial_prefix
        self.spatial = SpatialPrefixRing(num_layers, batch_size, spatial_prefix)
        self.next_position = 0  # absolute position of the next frame to be written
        self._num_new = 0
        self._slots: torch.Tensor | None = None  # (T,) slots of the current call's frames, on the buffers' device

    def __len__(self) -> int:
        return min(self.next_position, self.sink_frames) + max(0, self.next_position - self.rolling_start)

    @property
    def rolling_start(self) -> int:
        """Position of the oldest rolling (non-sink) frame in view (or that the next one will take)."""
        return max(self.sink_frames, self.next_position - self.max_cond_frames)

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers, spatial prefix and sink included (0 before the first write)."""
        sink = 0 if self.sink_k is None else self.sink_k.nbytes
        return sink + sum(t.nbytes for t in self.buffers)

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the cache keeps its frames in: keys, values, 8-bit scales and the spatial prefix's."""
        return (*self.k, *self.v, *self.k_scale, *self.v_scale, *self.spatial.buffers)

    @property
    def positions(self) -> torch.Tensor:
        """Absolute positions of the cached frames, oldest first -> (len,): the sink, then the rolling queue."""
        sink = torch.arange(min(self.next_position, self.sink_frames))
        return torch.cat([sink, torch.arange(self.rolling_start, self.next_position)])

    def slots_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Slot of each absolute position: the sink's own slots, then the ring."""
        s, ring = self.sink_frames, self.max_cond_frames + self.chunk_size
        return torch.where(positions < s, positions, s + (positions - s) % ring)

    def reset(self) -> None:
        """Forget every frame; buffers are kept for reuse."""
        self.slot_pos.fill_(-1)
        self.spatial.reset()
        self.sink_k, self._sink_shift = None, 0
        self.next_position = 0

    def seek(self, position: int) -> None:
        """Write the next call at absolute `position` (>= next_position), leaving out the frames before it: the
        rolling frames held so far leave the queue, the sink stays. A re-encode (after `reset()`) writes the sink,
        seeks to the oldest rolling frame in view and writes the rest, so every frame keeps its position; len() and
        `positions` count the frames left out until the writes reach the old end of the queue again."""
        if position < self.next_position or (position > self.next_position and self.next_position < self.sink_frames):
            raise ValueError(f"cannot seek from frame {self.next_position} to frame {position}: only forward, and "
                             f"only once the {self.sink_frames} sink frames are written")
        self.slot_pos[self.slot_pos >= self.sink_frames] = -1
        self.next_position = position

    def clone(self) -> "KVCache":
        """An independent copy, to branch a generation."""
        other = copy.copy(self)
        other.k, other.v = [t.clone() for t in self.k], [t.clone() for t in self.v]
        other.k_scale, other.v_scale = [t.clone() for t in self.k_scale], [t.clone() for t in self.v_scale]
        other.slot_pos = self.slot_pos.clone()
        other.sink_k = None if self.sink_k is None else self.sink_k.clone()
        other.spatial = self.spatial.clone()
        other._mark_static()
        return other

    def rows(self, start: int, count: int) -> "KVCache":
        """An empty cache of `count` rows whose buffers are rows start.. start + count of this one's (views: what it
        writes lands here). The stream engine keeps one pool of rows and gives each stream such a cache."""
        if not self.k:
            raise ValueError("allocate the pool's buffers before taking rows of them")
        if start < 0 or count < 1 or start + count > self.batch_size:
            raise ValueError(f"rows {start}..{start + count - 1} are outside the cache's {self.batch_size} rows")
        other = KVCache(self.num_layers, count, self.max_cond_frames, self.chunk_size, self.spatial_prefix,
                        self.sink_frames, self.rotate_sink, self.cache_dtype)
        tokens = self.k[0].shape[0] // self.batch_size
        token_rows = slice(start * tokens, (start + count) * tokens)
        other.k, other.v = [t[token_rows] for t in self.k], [t[token_rows] for t in self.v]
        other.k_scale, other.v_scale = [t[token_rows] for t in self.k_scale], [t[token_rows] for t in self.v_scale]
        other.dtype = self.dtype
        other.spatial = self.spatial.rows(start, count)
        return other

    def take(self, rows: torch.Tensor) -> "KVCache":
        """An empty cache of len(rows) rows holding copies of the temporal keys/values (and 8-bit scales) of those
        rows (R,) of this one's, in that order: a cache write over streams whose rows do not lie side by side.
        `put` writes them back; its spatial ring stays empty (a pooled write stages into each stream's own)."""
        other = KVCache(self.num_layers, len(rows), self.max_cond_frames, self.chunk_size, self.spatial_prefix,
                        self.sink_frames, self.rotate_sink, self.cache_dtype)
        index = self._token_rows(rows)
        other.k, other.v = [t.index_select(0, index) for t in self.k], [t.index_select(0, index) for t in self.v]
        other.k_scale = [t.index_select(0, index) for t in self.k_scale]
        other.v_scale = [t.index_select(0, index) for t in self.v_scale]
        other.dtype = self.dtype
        return other

    def put(self, taken: "KVCache", rows: torch.Tensor) -> None:
        """Write the temporal keys/values (and scales) of a cache `take(rows)` made back into those rows."""
        index = self._token_rows(rows)
        for mine, theirs in zip((*self.k, *self.v, *self.k_scale, *self.v_scale),
                                (*taken.k, *taken.v, *taken.k_scale, *taken.v_scale)):
            as_bytes(mine).index_copy_(0, index, as_bytes(theirs))  # 8-bit floats have no index_copy

    def _token_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The buffers' token rows (R*S,) of cache rows (R,), on their device."""
        tokens = self.k[0].shape[0] // self.batch_size
        return (rows[:, None] * tokens + torch.arange(tokens)).flatten().to(self.k[0].device)

    def clear(self) -> None:
        """`reset()`, and zero every buffer, so nothing of the frames held is left in memory."""
        self.reset()
        for buffer in self.buffers:
            as_bytes(buffer).zero_()

    def state_dict(self) -> dict:
        """The queue's keys/values (L, B*S, H, len, Dh), oldest first, as stored (8-bit: with their scales k_scale,
        v_scale (L, B*S, H, len, 1)), and its positions; with a spatial prefix also its buffers (L, B, H, slots, S, Dh)
        and the position held in each slot."""
        k = v = k_scale = v_scale = None
        if self.k:
            slots = self.slots_of(self.positions).to(self.k[0].device)
            k, v, k_scale, v_scale = (
                torch.stack([as_bytes(t)[:, :, slots] for t in buffers]).view(buffers[0].dtype) if buffers else None
                for buffers in (self.k, self.v, self.k_scale, self.v_scale))
            sink = min(self.next_position, self.sink_frames)
            if self.sink_k is not None and sink:  # the sink as written, not as turned for the current call
                k[:, :, :, :sink] = self.sink_k[:, :, :, :sink]
        return {
            "k": k,
            "v": v,
            "k_scale": k_scale,
            "v_scale": v_scale,
            **self.spatial.state_dict(),
            "next_position": self.next_position,
            "max_cond_frames": self.max_cond_frames,
            "chunk_size": self.chunk_size,
            "batch_size": self.batch_size,
            "num_layers": self.num_layers,
            "spatial_prefix": self.spatial_prefix,
            "sink_frames": self.sink_frames,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; the cache must have the same queue length, chunk size, batch size and depth.

        Buffers already allocated keep their device and dtype; otherwise they take the state's, and the next
        `allocate()` moves every tensor of the cache to the model's. An 8-bit state loads into a cache of the same
        8-bit dtype as stored, into any other dequantized (and quantized again if this cache is 8-bit)."""
        for name in STATE_FIELDS:
            if state.get(name) != getattr(self, name):
                raise ValueError(f"cache state has {name}={state.get(name)}, this cache has {getattr(self, name)} "
                                 f"({STATE_FIELDS[name]} differs)")
        self.next_position = int(state["next_position"])
        positions = self.positions
        slots = self.slots_of(positions)
        self.slot_pos = torch.full((self.num_slots,), -1, dtype=torch.long)
        self.slot_pos[slots] = positions
        self.sink_k, self._sink_shift = None, 0
        if state["k"] is not None:
            k, v, saved_8bit = state["k"], state["v"], state.get("k_scale") is not None
            if not self.k:
                self._allocate(k[..., :1, :].float() if saved_8bit else k)  # 8-bit: float32 until the model's
            index = slots.to(self.k[0].device)
            if saved_8bit and k.dtype == self.k[0].dtype:  # as stored: bit for bit
                for layer in range(self.num_layers):
                    for buffer, saved in ((self.k, k), (self.v, v), (self.k_scale, state["k_scale"]),
                                          (self.v_scale, state["v_scale"])):
                        as_bytes(buffer[layer])[:, :, index] = as_bytes(saved[layer].to(buffer[layer].device))
            else:
                if saved_8bit:
                    k, v = dequantize(k, state["k_scale"], self.dtype), dequantize(v, state["v_scale"], self.dtype)
                for layer in range(self.num_layers):
                    self._store(layer, index, k[layer].to(self.k[0].device, self.dtype),
                                v[layer].to(self.k[0].device, self.dtype))
            self._keep_sink(torch.arange(min(self.next_position, self.sink_frames)))
        self.spatial.load_state_dict(state)

    def _allocate(self, like: torch.Tensor) -> None:
        """Allocate the buffers like a (L or nothing, B*S, H, T, Dh) tensor: its trailing shape, dtype and device."""
        rows, heads, _, head_dim = like.shape[-4:]
        if rows % self.batch_size:
            raise ValueError(f"cache built for batch size {self.batch_size}, got {rows} token rows")
        self.allocate(rows // self.batch_size, heads, head_dim, like.dtype, like.device)

    def allocate(self, tokens_per_frame: int, heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        """Preallocate the buffers (B * tokens_per_frame rows); nothing happens if they already are so.

        Done before the first call, so a compiled step sees fixed buffers: stored in the model's dtype (bf16
        halves the bytes) at static addresses, which CUDA graphs then read and write in place. Buffers held on
        another device or in another dtype (a state loaded on the CPU) move, and every other tensor with them.
        """
        device = torch.device(device)
        shape = (self.batch_size * tokens_per_frame, heads, self.padded_slots, head_dim)
        if not self.k:
            self.dtype = dtype
            storage = dtype if self.cache_dtype is None else self._storage_dtype
            self.k = [torch.zeros(shape, dtype=storage, device=device) for _ in range(self.num_layers)]
            self.v = [torch.zeros_like(buffer) for buffer in self.k]
            if self.cache_dtype is not None:
                self.k_scale = [torch.zeros(*shape[:3], 1, dtype=SCALE_DTYPE, device=device) for _ in self.k]
                self.v_scale = [torch.zeros_like(buffer) for buffer in self.k_scale]
            self.spatial.allocate(tokens_per_frame, heads, head_dim, dtype, device)
        elif self.k[0].shape != shape:
            raise ValueError(f"cache holds buffers of shape {tuple(self.k[0].shape)}, this call needs {shape}")
        elif self.dtype != dtype or self.k[0].device != device:
            self._move(device, dtype)
        else:
            return
        self._mark_static()

    @property
    def _storage_dtype(self) -> torch.dtype:
        return CACHE_DTYPES[self.cache_dtype][0]

    def _move(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the buffers, the sink's keys and the current call's slot indices to `device` (buffers in `dtype`, or
        8-bit as they are)."""
        storage = dtype if self.cache_dtype is None else self._storage_dtype
        self.k, self.v = [t.to(device, storage) for t in self.k], [t.to(device, storage) for t in self.v]
        self.k_scale, self.v_scale = [t.to(device) for t in self.k_scale], [t.to(device) for t in self.v_scale]
        self.dtype = dtype
        self.spatial.move(device, dtype)
        if self.sink_k is not None:
            self.sink_k = self.sink_k.to(device, dtype)
        if self._slots is not None:
            self._slots = self._slots.to(device)

    def _mark_static(self) -> None:
        """Tell dynamo every buffer keeps its address, so a compiled step takes them as fixed inputs."""
        for buffer in self.buffers:
            torch._dynamo.mark_static_address(buffer)

    def begin(self, num_frames: int) -> torch.Tensor:
        """Start a call on `num_frames` new frames; returns their absolute positions (T,)."""
        if num_frames > self.chunk_size:
            raise ValueError(
                f"{num_frames} frames in one call, but the cache stages at most chunk_size={self.chunk_size}; "
                "pass a larger chunk_size to new_cache()"
            )
        self._num_new = num_frames
        device = self.k[0].device if self.k else None
        self._slots = self._new_slots.to(device)  # a tensor, so a compiled step does not see the slots change
        self.spatial.begin(self.next_position, num_frames, device)
        self._turn_sink()
        return self.call_positions

    @property
    def call_positions(self) -> torch.Tensor:
        """Absolute positions of the current call's frames (T,), as `begin` returned them; none between calls."""
        return torch.arange(self.next_position, self.next_position + self._num_new)

    @property
    def _new_slots(self) -> torch.Tensor:
        """Slots of the current call's frames, on the CPU (T,)."""
        return self.slots_of(self.call_positions)

    def _turn_sink(self) -> None:
        """RoPE sink: rewrite the sink's key slots turned by (rolling start - s), from the keys as written, so they
        sit just before the oldest rolling frame; done once per call, only when the shift changes."""
        shift = self.rolling_start - self.sink_frames
        if self.sink_k is None or shift == self._sink_shift:
            return
        sink = min(self.next_position, self.sink_frames)
        cos, sin = rope_cos_sin(torch.tensor([shift]), self.sink_k.shape[-1])
        device = self.sink_k.device
        turned = apply_rope(self.sink_k[:, :, :, :sink], cos.to(device), sin.to(device))  # (L, B*S, H, sink, Dh)
        for buffer, keys in zip(self.k, turned):
            buffer[:, :, :sink] = keys
        self._sink_shift = shift

    def _keep_sink(self, positions: torch.Tensor) -> None:
        """RoPE sink: remember the keys of the sink frames among `positions` as they were written."""
        positions = positions[positions < self.sink_frames]
        if not self.rotate_sink or not len(positions):
            return
        if self.sink_k is None:
            rows, heads, _, head_dim = self.k[0].shape
            self.sink_k = self.k[0].new_zeros(self.num_layers, rows, heads, self.sink_frames, head_dim)
        index = positions.to(self.sink_k.device)
        self.sink_k[:, :, :, index] = torch.stack([buffer[:, :, index] for buffer in self.k])

    def attn_mask(self, bidirectional: bool, device: torch.device) -> torch.Tensor:
        """Which slots each new frame sees -> (T, padded_slots) bool: the sink and the queue, then this call's
        frames causally (or all of them); slots of frames out of the queue, not written, or padding are hidden."""
        start = self.next_position
        sink = (self.slot_pos >= 0) & (self.slot_pos < min(start, self.sink_frames))
        queued = sink | ((self.slot_pos >= self.rolling_start) & (self.slot_pos < start))  # (num_slots,)
        mask = torch.zeros(self._num_new, self.padded_slots, dtype=torch.bool)
        mask[:, : self.num_slots] = queued
        mask[:, self._new_slots] = staged_mask(self._num_new, bidirectional)
        return mask.to(device)

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this call's keys/values (B*S, H, T, Dh) of `layer` into their slots, as plain values."""
        if not self.k:
            self._allocate(k)
        if k.shape[0] != self.k[layer].shape[0]:
            raise ValueError(f"cache holds {self.k[layer].shape[0]} token rows per frame, got {k.shape[0]}")
        self._store(layer, self._slots, k.detach(), v.detach())

    def _store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write keys/values (B*S, H, T, Dh) into `slots` (T,) of `layer`, quantized if the cache is 8-bit."""
        if self.cache_dtype is None:
            self.k[layer].index_copy_(2, slots, k)
            self.v[layer].index_copy_(2, slots, v)
            return
        for buffer, scales, x in ((self.k[layer], self.k_scale[layer], k), (self.v[layer], self.v_scale[layer], v)):
            q, scale = quantize(x, self.cache_dtype)
            as_bytes(buffer).index_copy_(2, slots, as_bytes(q))
            scales.index_copy_(2, slots, scale)

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage this call's keys/values (B*S, H, T, Dh) -> (B*S, H, padded_slots, Dh) to attend to.

        Without autograd they are the layer's buffers themselves. A call that records a graph (a user outside
        no_grad, a student trained through the cache) attends to a copy of them holding its own k, v, so the
        gradient reaches them and the buffers never hold a graph.
        """
        self.stage(layer, k, v)
        if self.cache_dtype is not None:  # the cached frames as stored, this call's own exact
            keys = dequantize(self.k[layer], self.k_scale[layer], k.dtype).index_copy_(2, self._slots, k)
            values = dequantize(self.v[layer], self.v_scale[layer], v.dtype).index_copy_(2, self._slots, v)
            return keys, values
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            return self.k[layer].index_copy(2, self._slots, k), self.v[layer].index_copy(2, self._slots, v)
        return self.k[layer], self.v[layer]

    def commit(self) -> None:
        """Make the frames of the last call part of the queue (their keys/values are in place already); the
        oldest leave it when it is full."""
        new = self.call_positions
        self.slot_pos[self._new_slots] = new
        if self.k:
            self._keep_sink(new)
        self.spatial.commit()
        self.next_position += self._num_new
        self._num_new = 0
