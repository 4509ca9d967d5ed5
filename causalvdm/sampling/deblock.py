"""Deblocking: soften the small steps a model's token grid leaves at token borders of its decoded frames.

Each token of a patch-based model is made with its own error, so a border between two tokens can show a step that
neither side of it has: the tiles the token-grid ratio measures (`eval.metrics.token_grid_ratio`). Video codecs meet
the same seams at their block borders and answer with a deblocking filter; this is H.264's normal-strength one, with
one strength for every border. It only touches the two pixels beside a border, only where the step is small and
both sides are flat (a larger step is an edge of the picture and kept), and by at most a few grey levels.
"""

import torch

# Grey levels (0-255) at strength 1. A step across a border of EDGE or more is a real edge; a side whose step next to
# the border is FLAT or more is texture, where a step is no seam; CLIP bounds a pixel's change. Measured on the demo
# (docs/demo_recipe.md): FLAT decides most of what is filtered, EDGE and CLIP matter little near these values.
EDGE, FLAT, CLIP = 32.0, 12.0, 6.0
LEVELS = 127.5  # grey levels per unit of the [-1, 1] pixel scale


def token_pixels(vae, model) -> tuple[int, int]:
    """(height, width) in pixels of one model token: the VAE's downsampling times the model's patch size."""
    return tuple(vae.downsample * p for p in model.patch_size[1:])


def deblock_frames(video: torch.Tensor, token: tuple[int, int], strength: float = 1.0) -> torch.Tensor:
    """Pixels (..., H, W) in [-1, 1], e.g. (3, T, H, W) -> the same with every token border filtered, the borders
    between columns first, then between rows; token (th, tw) in pixels, each >= 2; strength scales EDGE, FLAT and
    CLIP (0 returns `video` itself). Each colour channel is filtered on its own.
    """
    if strength < 0:
        raise ValueError(f"deblocking strength must be >= 0, got {strength}")
    if strength == 0:
        return video
    if min(token) < 2:
        raise ValueError(f"deblocking needs tokens of at least 2x2 pixels, got {token[0]}x{token[1]}")
    edge, flat, clip = (strength * v / LEVELS for v in (EDGE, FLAT, CLIP))
    out = _filter_borders(video, token[1], edge, flat, clip)
    return _filter_borders(out.transpose(-1, -2), token[0], edge, flat, clip).transpose(-1, -2)


def _filter_borders(x: torch.Tensor, size: int, edge: float, flat: float, clip: float) -> torch.Tensor:
    """Filter the borders every `size` pixels along the last dim of x (..., L): between p1 p0 | q0 q1, where
    |q0 - p0| < edge, |p1 - p0| < flat and |q1 - q0| < flat, p0 += d and q0 -= d with
    d = clip(((q0 - p0) * 4 + (p1 - q1)) / 8, -clip, clip). Every border reads the unfiltered x."""
    q = torch.arange(size, x.shape[-1] - 1, size, device=x.device)  # the first pixel of each token after the first
    p1, p0, q0, q1 = (x[..., q + offset] for offset in (-2, -1, 0, 1))
    step = q0 - p0
    seam = (step.abs() < edge) & ((p1 - p0).abs() < flat) & ((q1 - q0).abs() < flat)
    d = torch.where(seam, ((step * 4 + (p1 - q1)) / 8).clamp(-clip, clip), torch.zeros_like(step))
    out = x.clone()
    out[..., q - 1] = p0 + d
    out[..., q] = q0 - d
    return out
