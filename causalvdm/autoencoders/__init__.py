"""Autoencoders between pixels (B, 3, T, H, W) in [-1, 1] and latents (B, C, T, H/f, W/f)."""

from causalvdm.autoencoders.pixel import PixelVAE
from causalvdm.autoencoders.sd_vae import SDVAE

__all__ = ["PixelVAE", "SDVAE"]
