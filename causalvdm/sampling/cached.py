"""A chunk's calls through the shared KV cache: the model runs on the chunk's frames only and reads the cache.

Its twin without a cache is `recompute.RecomputedChunk`; both give the generator's denoising loop the call context,
the model input and the chunk's part of the output, so `denoise_chunk` has one path.
"""

import torch


class CachedChunk:
    """A chunk's calls through the cache: the model runs on its k frames (B, C, k, h, w) only and their temporal
    attention reads the cache; the cache's call is begun here, once for every denoising step."""

    prefix = 0  # no written frames in the model's input

    def __init__(self, model, cache, text, num_frames: int, height: int, width: int):
        model.begin_call(cache, num_frames, height, width)
        self.ctx = model.prepare(num_frames, height, width, cache, text)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """The chunk's latents (B, C, k, h, w), as they are."""
        return x

    def chunk_output(self, out: torch.Tensor) -> torch.Tensor:
        """The model output (B, 2C, k, h, w): all the chunk's."""
        return out
