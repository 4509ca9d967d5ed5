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
class RowTables:
    """A stream's part of a pooled call's tables, made on the host: its frames' positions and slots (T,), its mask
    over the slots (T, padded_slots) and its spatial-prefix mask ((1, C + S); None: every key)."""

    positions: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor
    spatial: torch.Tensor | None


@dataclass
class RowBlock:
    """The rows `start`.. `start + count` of the pool that one stream's `cache` holds; `active`: in this call (its
    cache's call begun for the call's frames); `tables`: its RowTables for the call, when its owner kept them from an
    earlier call (else they are made)."""

    start: int
    count: int
    cache: KVCache
    active: bool
    tables: RowTables | None = None


def row_tables(block: RowBlock, num_frames: int, tokens_per_frame: int, bidirectional: bool) -> RowTables:
    """A block's RowTables for a call of `num_frames` frames. A block not in the call stages into the slots its own
    next frames take (no queue holds them) and sees only those."""
    cache = block.cache
    if block.active:
        positions = cache.call_positions
        return RowTables(positions, cache.slots_of(positions), cache.attn_mask(bidirectional, "cpu"),
                         cache.spatial.mask(tokens_per_frame, "cpu"))
    mine = cache.slots_of(torch.arange(cache.next_position, cache.next_position + num_frames))
    mask = torch.zeros(num_frames, cache.padded_slots, dtype=torch.bool)
    mask[:, mine] = staged_mask(num_frames, False)
    return RowTables(torch.arange(num_frames), mine, mask, None)


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

    def rows(self, rows: slice | torch.Tensor) -> TextContext | None:
        """The captions of some rows: a slice of them (views), or an index (R,) of rows in that order (copies)."""
        if self.context is None:
            return None
        c = self.context
        if isinstance(rows, torch.Tensor):
            rows = rows.to(c.tokens.device)
        return TextContext(c.tokens[rows], c.mask[rows], [(k[rows], v[rows]) for k, v in c.kv])

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

    def __init__(self, pool: KVCache, blocks: list[RowBlock], per_row: list[RowTables], num_frames: int,
                 tokens_per_frame: int, device):
        """per_row: each row's RowTables (its block's, or an idle row's)."""
        self.pool, self.blocks, self.num_frames = pool.spatial, blocks, num_frames
        every_key = torch.ones(1, self.pool.slots * tokens_per_frame + tokens_per_frame, dtype=torch.bool)
        masks = torch.cat([every_key if row.spatial is None else row.spatial for row in per_row])  # (R, C + S)
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
        idle_mask = torch.zeros(t, pool.padded_slots, dtype=torch.bool)
        idle_mask[:, :t] = staged_mask(t, False)
        idle = RowTables(torch.arange(t), torch.arange(t), idle_mask, None)  # the first slots, hidden from everyone
        tables = [block.tables or row_tables(block, t, tokens_per_frame, bidirectional) for block in blocks]
        per_row = [idle] * rows
        for block, table in zip(blocks, tables):
            per_row[block.start:block.start + block.count] = [table] * block.count
        # one stack per table: a call's host work does not grow with its streams
        positions, slots, masks = (torch.stack([getattr(row, name) for row in per_row])
                                   for name in ("positions", "slots", "mask"))
        self.tables = tables  # the blocks' RowTables, for the caller to keep
        self.positions = positions  # (R, T) on the CPU
        heads, head_dim = pool.k[0].shape[1], pool.k[0].shape[3]
        # Per row to the device, per token there: a copy of an expanded tensor to another device is a full one (the
        # paper's model at 8 streams: an index of 151 MB from the host on every call, where the rows' is 512 bytes).
        token_slots = slots.to(device).repeat_interleave(tokens_per_frame, dim=0)  # (R*S, T)
        self._index = token_slots[:, None, :, None].expand(-1, heads, -1, head_dim)  # a view: (R*S, H, T, Dh)
        self._scale_index = self._index[..., :1]
        self.mask = masks.to(device).repeat_interleave(tokens_per_frame, dim=0)[:, None]  # (R*S, 1, T, slots)
        self.spatial = PooledSpatial(pool, blocks, per_row, t, tokens_per_frame, device)

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
        # element-wise in the positions: every row at once
        index = tpe_index(call.positions.flatten(), model.tpe_mode, model.max_tpe_len, None, call.sink_frames)
        index = index.view(rows, t)  # (R, T)
        tpe = model.pos_embed_temporal[index.to(device)].to(dtype)
    ph, pw = model.patch_size[1:]
    pos_spatial = sincos_2d(model.hidden_size, height // ph, width // pw, model.space_scale).to(device, dtype)
    spatial = None
    if model.spatial_prefix is not None:
        spatial = SpatialPrefix("write") if write else SpatialPrefix("read", mask=call.spatial.mask(tokens, device))
    return CallContext(attn_mask=call.mask, tpe=tpe, rope=rope, pos_spatial=pos_spatial, cache=call, text=text,
                       spatial=spatial)
