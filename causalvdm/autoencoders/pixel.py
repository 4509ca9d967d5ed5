"""A lossless pixel-space 'VAE' (space-to-depth) so CPU demos train without a neural autoencoder."""

import torch
from torch import nn

from causalvdm.registry import VAES


@VAES.register_module()
class PixelVAE(nn.Module):
    """Space-to-depth by `factor`: pixels (B, 3, T, H, W) <-> latents (B, 3 f^2, T, H/f, W/f), exactly invertible.

    Same interface as the diffusers VAE wrapper: `encode`, `decode`, `out_channels`, `downsample`.
    """

    def __init__(self, factor: int = 2, scaling_factor: float = 1.0):
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor
        self.scaling_factor = scaling_factor
        self.out_channels = 3 * factor * factor
        self.downsample = factor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, 3 f^2, T, H/f, W/f)."""
        b, c, t, h, w = x.shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"frame size {h}x{w} is not a multiple of the PixelVAE factor {f}")
        z = x.view(b, c, t, h // f, f, w // f, f).permute(0, 1, 4, 6, 2, 3, 5)  # (B, C, f, f, T, h, w)
        return z.reshape(b, c * f * f, t, h // f, w // f) * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 3 f^2, T, h, w) -> (B, 3, T, h f, w f)."""
        b, _, t, h, w = z.shape
        f = self.factor
        x = (z / self.scaling_factor).view(b, 3, f, f, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)  # (B, C, T, h, f, w, f)
        return x.reshape(b, 3, t, h * f, w * f)
