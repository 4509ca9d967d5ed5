"""Prefix-enhanced spatial attention (Ca2-VDM): which earlier frames a chunk's spatial attention also reads, and
the attention over a frame's own tokens plus theirs. The KV cache keeps those frames' spatial keys/values."""

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
