"""Autoregressive sampling: the chunk generator (shared cache or recompute) and the streaming video writer."""

from causalvdm.sampling.generator import AutoregressiveGenerator, chunk_generator

__all__ = ["AutoregressiveGenerator", "chunk_generator"]
