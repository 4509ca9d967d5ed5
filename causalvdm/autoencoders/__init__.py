"""Autoencoders between pixels (B, 3, T, H, W) in [-1, 1] and latents (B, C, T, H/f, W/f)."""

from causalvdm.autoencoders.pixel import PixelVAE

__all__ = ["PixelVAE"]
