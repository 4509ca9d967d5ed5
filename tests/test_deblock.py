"""The deblocking filter on token borders: equal to a pixel-by-pixel reference, softens seams, keeps edges; wired
into the pipeline and the stream engine for generated frames only."""

import math
import random

import pytest
import torch

from causalvdm.eval.metrics import token_grid_ratio
from causalvdm.sampling.deblock import CLIP, EDGE, FLAT, LEVELS, deblock_frames


def reference_deblock(video: torch.Tensor, token, strength: float) -> torch.Tensor:
    """The filter as its docstring states it, one border of one row at a time: columns' borders, then rows'."""
    edge, flat, clip = (strength * v / LEVELS for v in (EDGE, FLAT, CLIP))

    def rows(x, size):  # filter the borders along the last dim, each read from the unfiltered x
        out = x.clone()
        for index in range(x[..., 0].numel()):
            line, new = x.reshape(-1, x.shape[-1])[index].tolist(), out.reshape(-1, x.shape[-1])[index]
            for q in range(size, len(line) - 1, size):
                p1, p0, q0, q1 = line[q - 2], line[q - 1], line[q], line[q + 1]
                if abs(q0 - p0) < edge and abs(p1 - p0) < flat and abs(q1 - q0) < flat:
                    d = min(max(((q0 - p0) * 4 + (p1 - q1)) / 8, -clip), clip)
                    new[q - 1], new[q] = p0 + d, q0 - d
        return out

    return rows(rows(video, token[1]).transpose(-1, -2).contiguous(), token[0]).transpose(-1, -2)


def seamed(shape, token, gen, offset=4.0):
    """A smooth picture (..., H, W) in [-1, 1] plus a constant offset per token of up to `offset` grey levels."""
    h, w = shape[-2:]
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    phase = torch.rand(shape[:-2] + (1, 1), generator=gen, dtype=torch.float64) * 6
    smooth = 0.3 * torch.sin(x / 9 + phase) * torch.cos(y / 11 - phase)
    blocks = (torch.rand(shape[:-2] + (math.ceil(h / token[0]), math.ceil(w / token[1])), generator=gen,
                         dtype=torch.float64) * 2 - 1) * offset / LEVELS
    blocks = blocks.repeat_interleave(token[0], -2)[..., :h, :].repeat_interleave(token[1], -1)[..., :w]
    return smooth, smooth + blocks


def test_matches_the_pixel_by_pixel_reference():
    """Random token sizes (square or not, dividing the frame or not), strengths and pictures with seams, real edges
    and texture: the vectorised filter equals the reference exactly (float64, the same operations)."""
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        token = (rng.randint(2, 8), rng.randint(2, 8))
        shape = (rng.randint(1, 3), rng.randint(1, 2), rng.randint(9, 26), rng.randint(9, 26))
        strength = rng.choice([0.5, 1.0, 2.5])
        _, video = seamed(shape, token, gen)
        edges = torch.rand(shape, generator=gen, dtype=torch.float64) < 0.05  # real edges and a little texture
        video = (video + edges * 0.8 + torch.randn(shape, generator=gen, dtype=torch.float64) * 0.02).clamp(-1, 1)
        out = deblock_frames(video, token, strength)
        torch.testing.assert_close(out, reference_deblock(video, token, strength), rtol=0, atol=0)
        changed = (out != video).float().mean().item()
        assert 0 < changed < 4 / min(token)  # some border pixels move, never more than the two beside each border


def test_softens_seams_and_keeps_the_rest():
    """A smooth picture with a few grey levels of offset per 8x8 token tiles (ratio over 1.4); filtered, its
    grid no longer shows, it is closer to the smooth picture, only pixels beside a border moved, each by at most
    CLIP levels; a step of EDGE levels or more across a border (an edge of the picture) is kept."""
    gen = torch.Generator().manual_seed(1)
    smooth, video = seamed((3, 6, 32, 32), (8, 8), gen)

    def ratio(x):  # (3, T, H, W) in [-1, 1] -> (T,)
        return token_grid_ratio(((x.permute(1, 2, 3, 0) + 1) * LEVELS).round().to(torch.uint8), (8, 8))

    out = deblock_frames(video, (8, 8))
    assert ratio(smooth).max() < 1.1 and ratio(video).min() > 1.4 and ratio(out).max() < 1.1
    # only the pixels beside a border move, so the offset inside a token stays: closer, not equal, to the smooth one
    assert (out - smooth).square().mean() < 0.9 * (video - smooth).square().mean()
    moved = (out != video).any(dim=(0, 1))  # (H, W)
    beside = torch.tensor([i % 8 in (0, 7) for i in range(32)])
    assert not moved[~beside][:, ~beside].any() and moved.any()
    assert (out - video).abs().max() * LEVELS <= CLIP + 1e-9

    edge = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    edge[..., 8:] = EDGE / LEVELS  # a clean step of EDGE levels at the border between the two tokens of each row
    # kept at strength 1; at 1.1 it counts as a seam, each side moved by the clip (the full correction is 12 levels)
    torch.testing.assert_close(deblock_frames(edge, (8, 8)), edge, rtol=0, atol=0)
    torch.testing.assert_close(deblock_frames(edge, (8, 8), strength=1.1)[..., 7:9],
                               torch.tensor([CLIP * 1.1, EDGE - CLIP * 1.1],
                                            dtype=torch.float64).expand(1, 1, 16, 2) / LEVELS, rtol=0, atol=1e-12)


def test_strength_zero_and_bad_arguments():
    video = torch.zeros(3, 2, 8, 8)
    assert deblock_frames(video, (1, 1), 0.0) is video  # off: nothing to check, nothing done
    with pytest.raises(ValueError, match="strength must be >= 0, got -1"):
        deblock_frames(video, (8, 8), -1)
    with pytest.raises(ValueError, match="tokens of at least 2x2 pixels, got 1x4"):
        deblock_frames(video, (1, 4))
