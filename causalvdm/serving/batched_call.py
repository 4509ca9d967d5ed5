"""One model call over every row of the stream engine's pool, each row reading and writing its own stream's cache.

The pool is one `KVCache` of R rows; a stream's cache is a view of some of its rows (`KVCache.rows`), with its own
queue, positions and sink. A batched call gives each row what `prepare_call` gives a lone stream: its frames'
slots, its mask over the slots, its temporal positions (TPE rows or RoPE tables), its caption and its spatial prefix.
Rows of streams not in the call, and idle rows, stage into slots no queue holds (their own next frames' slots, which
the stream's next call writes again before it reads them) under a mask of their own frames, and their output is
ignored.
"""

from dataclasses import dataclass

import torch

from causalvdm.models.call_context import CallContext, SpatialPrefix, TextContext
from causalvdm.models.kv_cache import KVCache, staged_mask
from causalvdm.models.kv_quant import as_bytes, dequantize, quantize
from causalvdm.models.positional import rope_cos_sin, sincos_2d, tpe_index


@dataclass
class RowBlock:
    """The rows `start`.. `start + count` of the pool that one stream's `cache` holds; `active`: in this call (its
    cache's call begun for the call's frames)."""

    start: int
    count: int
    cache: KVCache
    active: bool


class TextPool:
    """Every row's caption as the cross-attention reads it, at fixed addresses: tokens (R, L, D), mask (R, 1, 1, L),
    per block k, v (R, H, L, Dh). A stream writes its rows when it opens or switches; idle rows hold zeros."""

    def __init__(self, model, rows: int):
        self.context = None
        if model.caption_channels:
            heads, dim = model.num_heads, model.hidden_size
            device, dtype = model.x_embedder.proj.weight.device, model.dtype
            length = model.model_max_length
            self.context = TextContext(
                tokens=torch.zeros(rows, length, dim, dtype=dtype, device=device),
                mask=torch.ones(rows, 1, 1, length, dtype=torch.bool, device=device),
                kv=[(torch.zeros(rows, heads, length, dim // heads, dtype=dtype, device=device),
                     torch.zeros(rows, heads, length, dim // heads, dtype=dtype, device=device))
                    for _ in model.blocks])

    def write(self, start: int, text: TextContext | None) -> None:
        """Put a stream's TextContext (its rows first to last) into rows start.. start + rows."""
        if self.context is None:
            return
        rows = slice(start, start + text.tokens.shape[0])
        self.context.tokens[rows] = text.tokens
        self.context.mask[rows] = text.mask
        for (k, v), (text_k, text_v) in zip(self.context.kv, text.kv):
            k[rows], v[rows] = text_k, text_v

    def first(self, rows: int) -> TextContext | None:
        """The captions of the first `rows` rows (views)."""
        if self.context is None:
            return None
        c = self.context
        return TextContext(c.tokens[:rows], c.mask[:rows], [(k[:rows], v[:rows]) for k, v in c.kv])

    def clear(self, start: int, count: int) -> None:
        """Forget the caption of rows start.. start + count."""
        if self.context is None:
            return
        rows = slice(start, start + count)
        for tensor in (self.context.tokens, *(t for kv in self.context.kv for t in kv)):
            tensor[rows] = 0
        self.context.mask[rows] = True


class PooledSpatial:
    """The spatial prefix of a pooled call: reads take the pool's rings under each row's mask, a write keeps the
    spatial keys/values of the frames of the streams in the call, each in its own ring."""

    def __init__(self, pool: KVCache, blocks: list[RowBlock], num_frames: int, tokens_per_frame: int, device):
        self.pool, self.blocks, self.num_frames = pool.spatial, blocks, num_frames
        slots = self.pool.slots
        masks = torch.ones(pool.batch_size, slots * tokens_per_frame + tokens_per_frame, dtype=torch.bool)
        for block in blocks:
            if block.active:
                mask = block.cache.spatial.mask(tokens_per_frame, "cpu")
                if mask is not None:
                    masks[block.start:block.start + block.count] = mask
        self._mask = masks.to(device).repeat_interleave(num_frames, dim=0)[:, None, None]  # (R*T, 1, 1, C + S)

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        t = self.num_frames
        for block in self.blocks:
            if block.active:
                rows = slice(block.start * t, (block.start + block.count) * t)
                block.cache.spatial.stage(layer, k[rows], v[rows])

    def mask(self, tokens_per_frame: int, device) -> torch.Tensor:
        return self._mask

    def context(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.context(layer)


class PooledCall:
    """A `CallCache` over every row of the pool for one call of `num_frames` frames (the engine begins the call of
    each active stream's cache before, and commits those of a write after)."""

    def __init__(self, pool: KVCache, blocks: list[RowBlock], num_frames: int, tokens_per_frame: int,
                 bidirectional: bool):
        self.pool = pool
        self.sink_frames = pool.sink_frames
        self.num_frames = num_frames
        device = pool.k[0].device
        rows, t = pool.batch_size, num_frames
        slots = torch.arange(t).repeat(rows, 1)  # idle rows: the first slots, hidden from everyone
        masks = torch.zeros(rows, t, pool.padded_slots, dtype=torch.bool)
        masks[:, :, :t] = staged_mask(t, False)
        positions = torch.arange(t).repeat(rows, 1)
        for block in blocks:
            rows_of = slice(block.start, block.start + block.count)
            cache = block.cache
            if block.active:
                positions[rows_of] = cache.call_positions
                slots[rows_of] = cache.slots_of(cache.call_positions)
                masks[rows_of] = cache.attn_mask(bidirectional, "cpu")
            else:  # the slots its own next frames take: no queue holds them
                mine = cache.slots_of(torch.arange(cache.next_position, cache.next_position + t))
                slots[rows_of] = mine
                masks[rows_of] = False
                masks[rows_of, :, mine] = staged_mask(t, False)
        self.positions = positions  # (R, T) on the CPU
        heads, head_dim = pool.k[0].shape[1], pool.k[0].shape[3]
        # Per row to the device, per token there: a copy of an expanded tensor to another device is a full one (the
        # paper's model at 8 streams: an index of 151 MB from the host on every call, where the rows' is 512 bytes).
        token_slots = slots.to(device).repeat_interleave(tokens_per_frame, dim=0)  # (R*S, T)
        self._index = token_slots[:, None, :, None].expand(-1, heads, -1, head_dim)  # a view: (R*S, H, T, Dh)
        self._scale_index = self._index[..., :1]
        self.mask = masks.to(device).repeat_interleave(tokens_per_frame, dim=0)[:, None]  # (R*S, 1, T, slots)
        self.spatial = PooledSpatial(pool, blocks, t, tokens_per_frame, device)

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write every row's keys/values (R*S, H, T, Dh) of `layer` into its own slots."""
        pool = self.pool
        if pool.cache_dtype is None:
            pool.k[layer].scatter_(2, self._index, k.detach())
            pool.v[layer].scatter_(2, self._index, v.detach())
            return
        for buffer, scales, x in ((pool.k[layer], pool.k_scale[layer], k), (pool.v[layer], pool.v_scale[layer], v)):
            q, scale = quantize(x, pool.cache_dtype)
            as_bytes(buffer).scatter_(2, self._index, as_bytes(q))
            scales.scatter_(2, self._scale_index, scale)

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage this call's keys/values (R*S, H, T, Dh) -> the pool's (R*S, H, slots, Dh) to attend to (8-bit:
        dequantized, this call's own frames exact)."""
        self.stage(layer, k, v)
        pool = self.pool
        if pool.cache_dtype is None:
            return pool.k[layer], pool.v[layer]
        keys = dequantize(pool.k[layer], pool.k_scale[layer], k.dtype).scatter_(2, self._index, k)
        values = dequantize(pool.v[layer], pool.v_scale[layer], v.dtype).scatter_(2, self._index, v)
        return keys, values


def pooled_context(model, call: PooledCall, text: TextContext | None, height: int, width: int,
                   write: bool) -> CallContext:
    """The CallContext of a pooled call: `prepare_call`'s, row by row (masks, TPE rows or RoPE tables per row)."""
    device, dtype = model.x_embedder.proj.weight.device, model.dtype
    rows, t = call.positions.shape
    tokens = call.mask.shape[0] // rows
    tpe = rope = None
    if model.tpe_mode == "rope":
        cos, sin = rope_cos_sin(call.positions.flatten(), model.hidden_size // model.num_heads)  # (R*T, Dh)
        cos, sin = (z.view(rows, t, -1).to(device).repeat_interleave(tokens, dim=0)[:, None] for z in (cos, sin))
        rope = (cos, sin)  # (R*S, 1, T, Dh)
    else:
        index = torch.cat([tpe_index(row, model.tpe_mode, model.max_tpe_len, None, call.sink_frames)
                           for row in call.positions])  # (R, T)
        tpe = model.pos_embed_temporal[index.to(device)].to(dtype)
    ph, pw = model.patch_size[1:]
    pos_spatial = sincos_2d(model.hidden_size, height // ph, width // pw, model.space_scale).to(device, dtype)
    spatial = None
    if model.spatial_prefix is not None:
        spatial = SpatialPrefix("write") if write else SpatialPrefix("read", mask=call.spatial.mask(tokens, device))
    return CallContext(attn_mask=call.mask, tpe=tpe, rope=rope, pos_spatial=pos_spatial, cache=call, text=text,
                       spatial=spatial)
