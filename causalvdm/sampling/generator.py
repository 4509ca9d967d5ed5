"""Autoregressive chunk-by-chunk generation, through the shared KV cache or the recompute baseline.

Split gpt-fast style: `prefill` writes the given clean frames to the cache once, `denoise_chunk` is
the hot loop (the model runs on the k chunk frames only and reads the cache, which it never changes),
`commit` appends the finished chunk with one t = 0 pass. The queue holds `max_cond_frames` frames and
evicts the oldest, so the cost of a chunk and the memory stay constant however long the video.

mode="recompute" is the baseline without a cache (`recompute.py`); a caption can change at a chunk boundary
(`switch_prompt`, or `switches` of `iter_chunks`; `switching.py`).
"""

import time

import numpy as np
import torch
from tqdm import tqdm

from causalvdm.diffusion import make_sampler
from causalvdm.models.kv_quant import check_cache_dtype
from causalvdm.models.layout import check_layout
from causalvdm.sampling.cached import CachedChunk
from causalvdm.sampling.recompute import RECOMPUTE_POSITIONS, RecomputedChunk, WrittenFrames
from causalvdm.sampling.switching import caption_at, check_switches, reencode, resume_chunk
from causalvdm.utils.dtypes import resolve_dtype

MODES = ("cache", "recompute")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def chunk_generator(seed: int, chunk: int) -> torch.Generator:
    """The CPU generator of chunk `chunk` (-1: the given frames), independent of every other chunk's.

    One stream per chunk, so a generation resumed at chunk j draws what the uninterrupted run drew.
    """
    state = np.random.SeedSequence([seed, chunk + 1]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def video_text(model, y, mask, batch_size: int, guided: bool):
    """Caption y (B, L, C_text), mask (B, L) (None: the null caption) -> the TextContext a video's calls read: B rows,
    or 2B when guided (conditional, then null), every block's keys/values projected once; None for an
    unconditional model."""
    if not model.caption_channels:
        return None
    if y is not None:
        y = y.to(model.x_embedder.proj.weight.device)
        mask = None if mask is None else mask.to(y.device)
    if not guided:
        return model.encode_text(y, mask, batch_size, per_block_kv=True)
    if y is None:  # a guided video without a caption yet: null on both halves
        y, mask = model.null_text(batch_size)
    return model.guided_text(y, mask, per_block_kv=True)


def perturb(diffusion, frames: torch.Tensor, level: int, generator: torch.Generator | None) -> torch.Tensor:
    """Forward-noise clean frames (B, C, T, h, w) to timestep `level`, as the training prefix was (noise drawn in
    float32 on the CPU from `generator`, whatever the frames' dtype); `level` 0 leaves them as they are."""
    if level == 0 or frames.shape[2] == 0:
        return frames
    noise = torch.randn(frames.shape, generator=generator, dtype=torch.float32).to(frames.device, frames.dtype)
    t = torch.full((frames.shape[0],), level, dtype=torch.long, device=frames.device)
    return diffusion.q_sample(frames, t, noise)


class AutoregressiveGenerator:
    """Generate video latents chunk by chunk from n0 given frames.

    model: CausalSTDiT (eval mode); diffusion: the training GaussianDiffusion (1000 steps);
    sampler: 'iddpm' | 'ddim' | 'dpm-solver++' over `num_steps` steps; chunk_size: k frames per chunk;
    max_cond_frames: queue length; cfg_scale: classifier-free guidance (skipped at 1 or for an
    unconditional model); prefix_perturb_t: forward-noise level of the written clean frames (as in
    training; their timestep input stays 0); mode: 'cache' | 'recompute'; progress: tqdm over steps;
    dtype: None keeps the model's dtype, else the model is cast to it in place, so weights and KV cache are
    stored in it (latents, sampler arithmetic and model outputs stay float32); compile: False, True or a
    torch.compile mode ('reduce-overhead': CUDA graphs) for the per-step model call; recompute_positions:
    'absolute' | 'window', the positions of the recompute window's frames (see the module docstring);
    sink_frames: the first frames of the video stay in view for its whole length, besides the rolling queue;
    cache_dtype: None (the model's dtype) or 'int8' / 'float8_e4m3fn', the KV cache in 8 bits (`models.kv_quant`).
    """

    def __init__(self, model, diffusion, sampler: str = "iddpm", num_steps: int = 100, chunk_size: int = 8,
                 max_cond_frames: int = 25, cfg_scale: float = 1.0, prefix_perturb_t: int = 0, mode: str = "cache",
                 progress: bool = False, dtype: torch.dtype | str | None = None, compile: bool | str = False,
                 recompute_positions: str = "absolute", sink_frames: int = 0, cache_dtype: str | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if recompute_positions not in RECOMPUTE_POSITIONS:
            raise ValueError(f"recompute_positions must be one of {', '.join(RECOMPUTE_POSITIONS)}, "
                             f"got {recompute_positions!r}")
        check_layout(model, chunk_size, max_cond_frames, sink_frames)
        if not 0 <= prefix_perturb_t < diffusion.num_timesteps:
            raise ValueError(f"prefix_perturb_t must be in [0, {diffusion.num_timesteps}), got {prefix_perturb_t}")
        compile_mode = "default" if compile is True else compile or None
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile must be True or one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        if isinstance(dtype, str):
            dtype = resolve_dtype(dtype, next(model.parameters()).device)
        if dtype is not None:
            model.to(dtype)
        self.model = model
        self.diffusion = diffusion
        self.sampler = make_sampler(sampler, diffusion, num_steps)
        self.chunk_size = chunk_size
        self.max_cond_frames = max_cond_frames
        self.cfg_scale = cfg_scale
        self.prefix_perturb_t = prefix_perturb_t
        self.mode = mode
        self.recompute_positions = recompute_positions
        self.sink_frames = sink_frames
        self.cache_dtype = check_cache_dtype(cache_dtype)
        self.progress = progress
        self.cache = None  # KVCache of the current video (cache mode)
        self.chunk_times: list[float] = []  # wall seconds per chunk: denoising plus commit
        self.prefill_time = 0.0
        # The written (perturbed) latents in view: recompute mode's input, what a re-encode writes again in cache
        # mode; None when resumed from a cache state, which does not hold them.
        self._written: WrittenFrames | None = None
        self._given = 0  # n0 of the current video: the calls that wrote its frames are [0, n0), then chunks
        self._batch_size = 0
        self._text = None  # TextContext of the current caption (2B rows when guided), None if unconditional
        self._guided = False
        self._cuda_graphs = compile_mode in ("reduce-overhead", "max-autotune")
        self._call = self._model_call
        if compile_mode is not None:
            self._call = torch.compile(self._model_call, mode=compile_mode, dynamic=False, fullgraph=True)

    @property
    def _guidable(self) -> bool:
        return self.cfg_scale != 1.0 and self.model.caption_channels > 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights and of the KV cache."""
        return self.model.dtype

    # ------------------------------------------------------------------------------ phases
    @torch.inference_mode()
    def prefill(self, first_latents: torch.Tensor, y=None, mask=None, generator: torch.Generator | None = None,
                guided: bool | None = None) -> None:
        """Start a video: set its text and write the n0 given clean frames (B, C, n0, h, w) once (n0 may be 0), in
        calls of at most chunk_size frames.

        y (B, L, C_text), mask (B, L): the caption (None: the null caption); with guidance the cache holds
        2B rows, conditional then null text. generator draws the perturbation noise of the given frames.
        guided: run classifier-free guidance (if cfg_scale != 1); default: when there is a caption. A video that
        switches from no caption to one needs True (its conditional rows hold the null caption until then).
        """
        self._check_first(first_latents)
        b, _, n0 = first_latents.shape[:3]
        self._start(b, n0, y, mask, y is not None if guided is None else guided)
        frames = self._perturb(first_latents.to(self.device, torch.float32), generator)  # latents are float32 here
        keep_first = self.model.spatial_prefix == "first_frame" and self.mode == "cache"
        self._written = WrittenFrames(frames, self.sink_frames, self.max_cond_frames, keep_first)
        self._written.keep(frames)
        if self.mode == "cache":  # in calls of at most chunk_size frames, as the stream engine writes them
            for start in range(0, n0, self.chunk_size):
                self._write(frames[:, :, start:start + self.chunk_size])

    @torch.inference_mode()
    def denoise_chunk(self, noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoise one chunk from pure noise (B, C, k, h, w) -> clean latents (B, C, k, h, w); the cache is read only.

        What the steps share (attention mask, positions, TPE or RoPE tables, spatial embedding, timesteps, the
        sampler's noise) is made here once, on the device, so the loop below never waits for the host.
        """
        b, _, k, h, w = noise.shape
        x = noise.to(self.device, torch.float32, copy=True)  # made here, so every step's x is an inference tensor
        if self.mode == "cache":
            chunk = CachedChunk(self.model, self.cache, self._text, k, h, w)
        else:
            chunk = RecomputedChunk(self.model, self._written, self._text, k, h, w, self.recompute_positions)
        p = chunk.prefix
        self.sampler.reset()
        steps = len(self.sampler.timesteps)
        timesteps = torch.zeros(steps, b, p + k, dtype=torch.long, device=x.device)  # the written frames stay at 0
        timesteps[:, :, p:] = self.sampler.timesteps.to(x.device)[:, None, None]
        noises = self.sampler.step_noise(x.shape, generator, x.device)
        for i in tqdm(range(steps), desc="denoise", leave=False, disable=not self.progress):
            if self._cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's output has been consumed
            out = chunk.chunk_output(self._call(chunk.model_input(x), timesteps[i], chunk.ctx))  # (B, 2C, k, h, w)
            x = self.sampler.step(out, i, x, generator, None if noises is None else noises[i])
        return x

    @torch.inference_mode()
    def commit(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Append a finished chunk (B, C, k, h, w): perturb (if configured), one t = 0 pass, the queue evicts."""
        frames = self._perturb(latents, generator)
        if self._written is not None:  # None: resumed from a cache state, the latents in view are unknown
            self._written.keep(frames)
        if self.mode == "cache":
            self._write(frames)

    @torch.inference_mode()
    def switch_prompt(self, y=None, mask=None, recache: bool = False) -> None:
        """Between chunks: the caption y (B, L, C_text), mask (B, L) (None: the null caption) of the next chunks.

        Cache mode: the cached frames keep their keys/values (recache=False), or the frames in view are encoded
        again under the new caption (one t = 0 pass at their own positions, their written latents as first written,
        prefix perturbation included). Recompute mode re-encodes at every step anyway: recache changes nothing.
        """
        if y is not None and self._guidable and not self._guided:
            raise ValueError("a prompt switch to a caption in a video started without one, so without the null-caption "
                             "rows guidance needs: pass guided=True to prefill")
        self._text = self._encode_text(y, mask)
        if recache and self.mode == "cache":
            if self._written is None:
                raise ValueError("re-encoding at a prompt switch needs the latents of the frames in view, which a "
                                 "resumed cache state does not hold")
            reencode(self.cache, self._written, self._given, self.chunk_size, self._write)

    # ------------------------------------------------------------------------------ helpers
    def _check_first(self, first_latents: torch.Tensor) -> None:
        if first_latents.dim() != 5 or first_latents.shape[1] != self.model.in_channels:
            raise ValueError(f"first_latents must be (B, {self.model.in_channels}, n0, h, w), "
                             f"got {tuple(first_latents.shape)}")
        if first_latents.shape[2] > self.max_cond_frames:
            raise ValueError(f"{first_latents.shape[2]} given frames do not fit max_cond_frames={self.max_cond_frames}")

    @torch.inference_mode()
    def _start(self, batch_size: int, n0: int, y, mask, guided: bool) -> None:
        """Set the text of a new video (its cross-attention keys/values, projected once) and, in cache mode, a
        fresh cache (guidance: 2B rows)."""
        self._guided = self._guidable and guided
        self._batch_size, self._given = batch_size, n0
        self._text = self._encode_text(y, mask)
        self._written = None
        self.cache = None
        if self.mode == "cache":
            rows = 2 * batch_size if self._guided else batch_size
            self.cache = self.model.new_cache(rows, self.max_cond_frames, self.chunk_size, self.sink_frames,
                                              self.cache_dtype)

    def _encode_text(self, y, mask):
        return video_text(self.model, y, mask, self._batch_size, self._guided)

    def _perturb(self, frames: torch.Tensor, generator) -> torch.Tensor:
        return perturb(self.diffusion, frames, self.prefix_perturb_t, generator)

    def _write(self, frames: torch.Tensor) -> None:
        if self._guided:
            frames = torch.cat([frames, frames])
        self.model.write_cache(frames, self.cache, text=self._text)

    def _model_call(self, x, t, ctx) -> torch.Tensor:
        """The model output (B, 2C, T, h, w) float32, guided when this video has a caption and cfg_scale != 1."""
        if self._guided:
            return self.model.step_with_cfg(x, t, ctx, self.cfg_scale)
        return self.model.step(x, t, ctx)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # wall times must include the queued kernels

    # -------------------------------------------------------------------------------- loops
    def num_chunks(self, n0: int, num_frames: int) -> int:
        """Chunks needed to reach `num_frames` frames from n0 given ones (the last one may be cut short)."""
        return -(-(num_frames - n0) // self.chunk_size)

    def check_length(self, n0: int, num_frames: int) -> None:
        """Fail unless a video of `num_frames` frames can be generated from n0 given ones."""
        if num_frames < n0:
            raise ValueError(f"num_frames={num_frames} is fewer than the {n0} given frames")
        end = n0 + self.num_chunks(n0, num_frames) * self.chunk_size
        if self.model.tpe_mode == "absolute" and end > self.model.max_tpe_len:
            raise ValueError(f"absolute TPE covers max_tpe_len={self.model.max_tpe_len} frames, but {num_frames} frames "
                             f"in chunks of {self.chunk_size} need {end}; use a cyclic or rope model for longer videos")

    def check_switches(self, n0: int, num_frames: int, frames: list[int]) -> None:
        """Fail unless each prompt-switch frame starts a chunk of this video, n0 + i * chunk_size < num_frames, and
        no frame switches twice."""
        check_switches(n0, num_frames, frames, self.chunk_size)

    def iter_chunks(self, first_latents: torch.Tensor, num_frames: int, y=None, mask=None, seed: int = 0,
                    cache_state: dict | None = None, switches=(), recache_on_switch: bool = False):
        """Yield the latents (B, C, k, h, w) of each new chunk until `num_frames` frames (given ones included).

        A chunk is committed to the cache before it is yielded, so `self.cache.state_dict()` taken then can
        be passed as `cache_state` to a new generator with the same arguments: it skips the prefill and
        resumes at the next chunk, drawing the same noise as the uninterrupted run. The last chunk is cut to
        the requested length. Nothing kept here grows with the video's length.
        switches: (frame, y, mask) triples: from `frame` on (a chunk boundary) the caption is y, mask (None: the null
        caption); recache_on_switch: re-encode the frames in view under it (see `switch_prompt`).
        """
        self._check_first(first_latents)
        n0 = first_latents.shape[2]
        self.check_length(n0, num_frames)
        self.check_switches(n0, num_frames, [frame for frame, _, _ in switches])
        schedule = {frame: (y_new, mask_new) for frame, y_new, mask_new in switches}
        guided = y is not None or any(y_new is not None for y_new, _ in schedule.values())
        start = None
        if cache_state is not None:
            start = self._resume(first_latents, y, mask, cache_state, guided, schedule, recache_on_switch)
        return self._chunks(first_latents, num_frames, y, mask, seed, start, guided, schedule, recache_on_switch)

    def _chunks(self, first_latents, num_frames, y, mask, seed, start, guided, schedule, recache):
        """The loop of `iter_chunks` (a generator, so its checks above run at call time)."""
        b, c, n0, h, w = first_latents.shape
        self.chunk_times = []
        if start is None:
            started = time.perf_counter()
            self.prefill(first_latents, y, mask, chunk_generator(seed, -1), guided)
            self._sync()
            self.prefill_time = time.perf_counter() - started
            start = 0
        for j in range(start, self.num_chunks(n0, num_frames)):
            started = time.perf_counter()
            if n0 + j * self.chunk_size in schedule:
                self.switch_prompt(*schedule[n0 + j * self.chunk_size], recache=recache)
            gen = chunk_generator(seed, j)
            # float32 whatever the given frames' dtype: a seed makes one video, here and in the stream engine
            noise = torch.randn((b, c, self.chunk_size, h, w), generator=gen, dtype=torch.float32)
            latents = self.denoise_chunk(noise, gen)
            self.commit(latents, gen)
            self._sync()
            self.chunk_times.append(time.perf_counter() - started)
            keep = min(self.chunk_size, num_frames - n0 - j * self.chunk_size)
            yield latents[:, :, :keep]

    @torch.inference_mode()  # the cache's tensors are then made as in `prefill`, so a compiled step takes them as is
    def _resume(self, first_latents, y, mask, cache_state: dict, guided: bool, schedule: dict, recache: bool) -> int:
        """Load a cache state saved after some chunk -> index of the next chunk to generate; the caption is the one
        the schedule gives there (the state holds the effect of earlier switches)."""
        if self.mode != "cache":
            raise ValueError("resuming from a cache state needs mode='cache'")
        n0 = first_latents.shape[2]
        done = resume_chunk(cache_state, n0, self.chunk_size, schedule, recache)
        y, mask = caption_at(schedule, n0 + done * self.chunk_size, y, mask)
        self._start(first_latents.shape[0], n0, y, mask, guided)
        self.cache.load_state_dict(cache_state)
        return done

    def generate(self, first_latents: torch.Tensor, num_frames: int, y=None, mask=None, seed: int = 0,
                 callback=None, switches=(), recache_on_switch: bool = False) -> torch.Tensor:
        """The whole video's latents (B, C, num_frames, h, w), given frames first.

        callback(chunk_index, latents) is called on each chunk as it is finished; switches, recache_on_switch: prompt
        switches, as in `iter_chunks`.
        """
        chunks = [first_latents.to(self.device)]
        for j, latents in enumerate(self.iter_chunks(first_latents, num_frames, y, mask, seed, switches=switches,
                                                     recache_on_switch=recache_on_switch)):
            if callback is not None:
                callback(j, latents)
            chunks.append(latents)
        return torch.cat(chunks, dim=2)
