"""Diffusion: the IDDPM Gaussian diffusion, the clean-prefix training loss and the chunk samplers."""

from causalvdm.diffusion.clean_prefix import clean_prefix_loss, prefix_lengths
from causalvdm.diffusion.gaussian import IDDPM, GaussianDiffusion
from causalvdm.diffusion.samplers import make_sampler

__all__ = ["IDDPM", "GaussianDiffusion", "clean_prefix_loss", "make_sampler", "prefix_lengths"]
