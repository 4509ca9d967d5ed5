"""The recompute baseline, and the written latents in view it reads.

mode="recompute" runs without a cache: every denoising step runs the model on [last <= max_cond_frames written
frames | chunk]. It draws the same noise from the same seeds as the cache, so before the first eviction both produce
the same video (fp32: to ~1e-5). After it the window's frames keep their absolute positions, as in the cache
(recompute_positions='absolute', the reference code's baseline), or are numbered from 0 ('window'). A chunk's calls
come as an object that gives the call context, the model input and the chunk's part of the output: `RecomputedChunk`
here, `CachedChunk` for the cache.
"""

import torch

RECOMPUTE_POSITIONS = ("absolute", "window")


class WrittenFrames:
    """The written (perturbed) latents in view, bounded: the sink's (B, C, <= sink_frames, h, w), the rolling window's
    (B, C, <= max_cond_frames, h, w) and, with keep_first, frame 0 (B, C, 1, h, w) (cache mode, spatial_prefix=
    'first_frame': its spatial keys are read for ever). The recompute baseline's conditioning frames, and what a
    re-encode writes again in cache mode."""

    def __init__(self, like: torch.Tensor, sink_frames: int, max_cond_frames: int, keep_first: bool):
        self.sink_frames = sink_frames
        self.max_cond_frames = max_cond_frames
        self.keep_first = keep_first
        self.sink = self.window = like[:, :, :0]  # empty, on the latents' device and in their dtype
        self.first: torch.Tensor | None = None
        self.written = 0  # frames written so far, so the window starts at written - its length

    @property
    def frames(self) -> torch.Tensor:
        """The sink's frames, then the window's -> (B, C, n, h, w)."""
        return torch.cat([self.sink, self.window], dim=2)

    def keep(self, frames: torch.Tensor) -> None:
        """Add written frames (B, C, n, h, w) to the sink (while it has room) and the rolling window."""
        if self.keep_first and self.written == 0 and frames.shape[2]:
            self.first = frames[:, :, :1]
        to_sink = max(0, min(frames.shape[2], self.sink_frames - self.written))
        self.sink = torch.cat([self.sink, frames[:, :, :to_sink]], dim=2)
        self.window = torch.cat([self.window, frames[:, :, to_sink:]], dim=2)[:, :, -self.max_cond_frames:]
        self.written += frames.shape[2]


class RecomputedChunk:
    """A chunk's calls without a cache: [written frames in view | chunk] (B, C, p + k, h, w) at every step, the
    written frames at t = 0, positions 'absolute' (the sink at 0.., the rest where the cache has them) or 'window'."""

    def __init__(self, model, written: WrittenFrames, text, num_frames: int, height: int, width: int,
                 positions: str):
        self.cond = written.frames  # (B, C, p, h, w)
        p = self.prefix = self.cond.shape[2]
        k = num_frames
        if positions == "window":
            frame_positions = torch.arange(p + k)
        else:
            rolling = torch.arange(written.written - written.window.shape[2], written.written + k)
            frame_positions = torch.cat([torch.arange(written.sink.shape[2]), rolling])
        self.ctx = model.prepare(p + k, height, width, text=text, chunk=(p, p + k), positions=frame_positions,
                                 sink_frames=written.sink_frames)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """The chunk's latents (B, C, k, h, w) after the written frames -> (B, C, p + k, h, w)."""
        return torch.cat([self.cond, x], dim=2)

    def chunk_output(self, out: torch.Tensor) -> torch.Tensor:
        """The model output (B, 2C, p + k, h, w) -> the chunk's frames (B, 2C, k, h, w)."""
        return out[:, :, self.prefix:]
