"""Positional embeddings: 2D sin-cos over the patch grid and the temporal modes (absolute, cyclic, rope)."""

import functools

import torch

TPE_MODES = ("absolute", "cyclic", "rope")


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding of `positions` (any shape) -> (*positions.shape, dim), float32."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[..., None] * omega  # (..., dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


@functools.lru_cache(maxsize=16)
def sincos_2d(dim: int, grid_h: int, grid_w: int, scale: float = 1.0) -> torch.Tensor:
    """Spatial embedding of an (h, w) patch grid, row-major -> (h*w, dim).

    Follows the PixArt / Open-Sora v1 convention so pretrained weights see the embedding they were
    trained with: the first half of the channels encodes the column (x), the second the row (y), and
    grid coordinates are divided by `scale` (Open-Sora's `space_scale`).
    """
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    xs, ys = xs.flatten() / scale, ys.flatten() / scale
    return torch.cat([sincos_1d(dim // 2, xs), sincos_1d(dim // 2, ys)], dim=-1)


def tpe_index(positions: torch.Tensor, mode: str, max_len: int, offset: torch.Tensor | None = None,
              sink: int = 0) -> torch.Tensor:
    """Table index of each frame for the absolute and cyclic modes.

    positions: (T,) absolute frame positions; offset: (B,) random training offsets (cyclic only), on any device.
    Returns (B, T) or (1, T), on the offsets' device when given. Cyclic: (position + offset) mod max_len, so a cache queue can roll forever; with a
    frame sink of `sink` frames they keep rows 0..sink-1 and the others roll over the remaining rows,
    sink + (position - sink + offset) mod (max_len - sink), so no rolling frame ever takes a sink's row.
    """
    if mode == "absolute":
        if int(positions.max()) >= max_len:
            raise ValueError(
                f"frame position {int(positions.max())} is beyond max_tpe_len={max_len} in 'absolute' TPE mode; "
                "use tpe_mode='cyclic' or 'rope' for longer videos"
            )
        return positions[None]
    if mode == "cyclic":
        if offset is not None:  # offsets live on the model's device; positions are host-side bookkeeping
            positions = positions.to(offset.device)
        shifted = positions[None] if offset is None else positions[None] + offset[:, None]
        rolling = sink + (shifted - sink) % (max_len - sink)
        return torch.where(positions[None] < sink, positions[None], rolling)
    raise ValueError(f"tpe_index is for 'absolute' and 'cyclic' modes, not {mode!r}")


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """Rotary tables for temporal positions (T,) -> cos, sin of shape (T, head_dim), float32."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq  # (T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (..., T, head_dim) by position; rotation of half-split pairs (GPT-NeoX layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def sincos_table(dim: int, length: int) -> torch.Tensor:
    """The fixed temporal embedding table for the absolute and cyclic modes -> (length, dim)."""
    return sincos_1d(dim, torch.arange(length))


def check_tpe_mode(mode: str) -> str:
    """Return `mode` if known, else raise a one-line ValueError."""
    if mode not in TPE_MODES:
        raise ValueError(f"tpe_mode must be one of {', '.join(TPE_MODES)}, got {mode!r}")
    return mode

