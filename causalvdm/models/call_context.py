"""A model call's context: everything a call of the causal ST-DiT reads besides x and t (text, masks, positions, the
spatial prefix, the cache), and how a call on a cache begins.

`begin_call` is the only part that changes anything (the cache's buffers and its call); `prepare_call` reads, so the
context of a chunk is made once, on the device, and every denoising step is pure tensor work.
"""

from dataclasses import dataclass

import torch

from causalvdm.models.kv_cache import CallCache
from causalvdm.models.positional import rope_cos_sin, sincos_2d, tpe_index
from causalvdm.models.spatial_prefix import spatial_context


@dataclass
class TextContext:
    """A caption as the cross-attention reads it; from `model.encode_text`, constant for a whole video."""

    tokens: torch.Tensor  # (B, L, D) output of the caption MLP
    mask: torch.Tensor  # (B, 1, 1, L) bool, True = attend
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per block k, v (B, H, L, Dh); None: projected per call


@dataclass
class SpatialPrefix:
    """How a call's spatial attention reads earlier frames (`spatial_prefix`): "read" the cache's (a chunk being
    denoised), "write" this call's into it (a cache write), or "window": the frames from `start` on (the chunk) read
    this call's frames `frames` (training and the recompute baseline, which have no cache)."""

    mode: str
    frames: list[int] | None = None  # window: the context frames, as indices into this call's frames
    start: int = 0  # window: the first frame that reads them
    mask: torch.Tensor | None = None  # read: (1, C + S) bool, empty cache slots hidden


@dataclass
class CallContext:
    """Everything a model call needs besides x and t, from `model.prepare`: the same for every denoising step
    of a chunk, so it is built once per chunk on the device and the per-step call is pure tensor work."""

    attn_mask: torch.Tensor  # (T, keys) bool, True = attend
    tpe: torch.Tensor | None  # (B or 1, T, D) table embedding added to the first block's temporal input
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin (T, head_dim) float32
    pos_spatial: torch.Tensor  # (S, D) 2D sin-cos embedding of the patch grid
    cache: CallCache | None  # KVCache (or the reference cache) read by this call
    text: TextContext | None  # None for an unconditional model
    spatial: SpatialPrefix | None = None  # None: spatial attention within each frame only


def frame_mask(num_frames: int, chunk: tuple[int, int] | None, device) -> torch.Tensor:
    """Causal mask over frames (T, T), True = attend; frames inside `chunk` = (start, end) see each other."""
    mask = torch.ones(num_frames, num_frames, dtype=torch.bool).tril()
    if chunk is not None:
        start, end = chunk
        mask[start:end, start:end] = True
    return mask.to(device)


def _tokens_per_frame(model, height: int, width: int) -> int:
    """Tokens S of a frame of height x width latents; fails in one line off the patch grid."""
    ph, pw = model.patch_size[1:]
    if height % ph or width % pw:
        raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {ph}x{pw}")
    return (height // ph) * (width // pw)


def begin_call(model, cache: CallCache, num_frames: int, height: int, width: int) -> torch.Tensor:
    """Start a call of `model` on `num_frames` new frames of height x width latents on `cache` -> positions (T,).

    Sizes the cache's buffers for the model once (a state loaded elsewhere moves to its device and dtype) and begins
    the call there: its frames take the next slots, and a RoPE sink turns. `prepare_call` then reads it.
    """
    head_dim = model.hidden_size // model.num_heads
    cache.allocate(_tokens_per_frame(model, height, width), model.num_heads, head_dim, model.dtype,
                   model.x_embedder.proj.weight.device)
    return cache.begin(num_frames)


def prepare_call(model, num_frames: int, height: int, width: int, cache: CallCache | None = None,
                 text: TextContext | None = None, chunk: tuple[int, int] | None = None, tpe_offset=None,
                 write: bool = False, positions: torch.Tensor | None = None, sink_frames: int = 0) -> CallContext:
    """The context of `model`'s calls on `num_frames` frames of height x width latents (arguments: `model.forward`).

    Changes nothing: with a cache it reads the call `begin_call` started there (positions follow its queue). write: a
    cache write of clean frames (causal among themselves, and their spatial keys/values are kept for the spatial
    prefix). Without a cache: positions (T,) the absolute positions of the frames (default 0..T-1; the recompute
    baseline's window after eviction), and sink_frames, how many of the first positions are a frame sink (a cache
    knows its own).
    """
    tokens = _tokens_per_frame(model, height, width)
    ph, pw = model.patch_size[1:]
    device, dtype = model.x_embedder.proj.weight.device, model.dtype
    head_dim = model.hidden_size // model.num_heads
    if cache is None:
        positions = torch.arange(num_frames) if positions is None else positions.cpu()
        attn_mask = frame_mask(num_frames, chunk if model.chunk_bidirectional else None, device)
    else:
        positions = cache.call_positions
        if len(positions) != num_frames:
            raise ValueError(f"the cache's call holds {len(positions)} frames, this one {num_frames}: begin it first "
                             "(model.begin_call)")
        attn_mask = cache.attn_mask(model.chunk_bidirectional and not write, device)
    sink = cache.sink_frames if cache is not None else sink_frames
    tpe = rope = None
    if model.tpe_mode == "rope":
        if cache is None and sink:  # the sink sits just before the oldest rolling frame, as the cache turns it
            rolling = positions[positions >= sink]
            positions = torch.where(positions < sink, positions + (rolling[0] - sink if len(rolling) else 0),
                                    positions)
        cos, sin = rope_cos_sin(positions, head_dim)
        rope = (cos.to(device), sin.to(device))
    else:
        index = tpe_index(positions, model.tpe_mode, model.max_tpe_len, tpe_offset, sink)
        tpe = model.pos_embed_temporal[index.to(device)].to(dtype)  # (B or 1, T, D)
    pos_spatial = sincos_2d(model.hidden_size, height // ph, width // pw, model.space_scale).to(device, dtype)
    spatial = _spatial_prefix(model.spatial_prefix, cache, chunk, write, tokens, device)
    return CallContext(attn_mask=attn_mask, tpe=tpe, rope=rope, pos_spatial=pos_spatial, cache=cache, text=text,
                       spatial=spatial)


def _spatial_prefix(rule: str | None, cache, chunk, write: bool, tokens_per_frame: int, device) -> SpatialPrefix | None:
    """How this call's spatial attention reads earlier frames under `rule`; None when it does not."""
    if rule is None:
        return None
    if cache is not None:
        if write:
            return SpatialPrefix("write")
        return SpatialPrefix("read", mask=cache.spatial.mask(tokens_per_frame, device))
    if chunk is None:  # no chunk being denoised (a plain causal pass)
        return None
    frames = spatial_context(rule, chunk[0])
    return SpatialPrefix("window", frames=frames, start=chunk[0]) if frames else None
