"""Video transforms in plain torch (torchvision has no working CPU build here): resize, crop, normalise.

Frames come from the readers as uint8 (T, H, W, 3) and leave as float (3, T, H, W) in [-1, 1].
"""

import torch
import torch.nn.functional as F

# Frames converted to float at a time: bounds the memory of a 720p clip to a few tens of MB.
_CHUNK_FRAMES = 8


def to_size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An int or an (H, W) pair -> (H, W), checked positive."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"image_size must be a positive int or an (H, W) pair, got {image_size!r}")
    return size


def resized_shape(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """The smallest aspect-preserving (h, w) that covers `size`: for a square target, the short side."""
    scale = max(size[0] / height, size[1] / width)
    return max(size[0], round(height * scale)), max(size[1], round(width * scale))


def crop_offsets(height: int, width: int, size: tuple[int, int],
                 generator: torch.Generator | None = None) -> tuple[int, int]:
    """(top, left) of a `size` crop in a (height, width) frame: uniform with `generator`, else centred."""
    free_h, free_w = height - size[0], width - size[1]
    if generator is None:
        return free_h // 2, free_w // 2
    top = int(torch.randint(0, free_h + 1, (1,), generator=generator))
    left = int(torch.randint(0, free_w + 1, (1,), generator=generator))
    return top, left


def resize_frames(frames: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """float (T, 3, h, w) -> (T, 3, H, W), bilinear with antialiasing (a no-op when the shape matches)."""
    if tuple(frames.shape[-2:]) == tuple(shape):
        return frames
    return F.interpolate(frames, size=shape, mode="bilinear", antialias=True, align_corners=False)


def resize_to_cover(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (T, h, w, 3) -> uint8 (T, H', W', 3) covering `size` (resized_shape), resized as in video_transform."""
    shape = resized_shape(frames.shape[1], frames.shape[2], size)
    if tuple(frames.shape[1:3]) == shape:
        return frames
    out = [resize_frames(chunk.permute(0, 3, 1, 2).float(), shape).round_().clamp_(0, 255).to(torch.uint8)
           for chunk in frames.split(_CHUNK_FRAMES)]  # each (t, 3, H', W')
    return torch.cat(out).permute(0, 2, 3, 1).contiguous()  # (T, H', W', 3)


def video_transform(frames: torch.Tensor, image_size, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (T, h, w, 3) -> float (3, T, H, W) in [-1, 1]: resize to cover `image_size`, then crop.

    The crop is random (drawn from `generator`, the same for every frame) or centred when no generator is given.
    Frames that already cover `image_size` exactly (as the readers return them given `cover_size`) are only
    cropped: the crop, drawn from the same shape, is the same as for the full-size frames.
    Frames are processed in small chunks; each frame is resized independently, so the result does not
    depend on how a video is split into calls.
    """
    size = to_size(image_size)
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    shape = resized_shape(frames.shape[1], frames.shape[2], size)
    top, left = crop_offsets(*shape, size, generator)
    out = []
    for chunk in frames.split(_CHUNK_FRAMES):
        x = chunk.permute(0, 3, 1, 2).float()  # (t, 3, h, w)
        x = resize_frames(x, shape)[:, :, top:top + size[0], left:left + size[1]]  # (t, 3, H, W)
        out.append(x.clamp_(0, 255).div_(127.5).sub_(1))
    return torch.cat(out).permute(1, 0, 2, 3).contiguous()  # (3, T, H, W)
