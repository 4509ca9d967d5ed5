"""Many streams, one model: the stream engine advances every open video by one denoising step per tick, in one
batched model call (continuous batching, as LLM servers batch sequences).

A stream's state is bounded: its rows of a preallocated pool of KV-cache rows (`max_rows`; a guided stream takes
two, conditional and null caption), its caption, its sampler and the latents of the chunk it is denoising. A tick
(`step`) runs one denoising step of every stream that is denoising, whatever its chunk, step index, caption or
guidance, as one call over the whole pool; then one batched t = 0 pass over the writing streams' rows writes the
chunks just finished and the first frames of streams just opened into their caches (on the CPU, their rows copied
together when others lie between: `gather_writes`), and one VAE call decodes the finished chunks. A stream's frames
equal those of the same video made alone by `AutoregressiveGenerator` with the same seed and settings.
"""

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from causalvdm.diffusion import make_sampler
from causalvdm.models.causal_stdit import guide
from causalvdm.models.kv_quant import check_cache_dtype
from causalvdm.models.layout import check_layout
from causalvdm.sampling.deblock import deblock_frames, token_pixels
from causalvdm.sampling.generator import chunk_generator, perturb, video_text
from causalvdm.sampling.recompute import WrittenFrames
from causalvdm.sampling.switching import reencode
from causalvdm.serving.batched_call import PooledCall, RowBlock, TextPool, pooled_context

LATENCY_WINDOW = 64  # chunk latencies kept per stream for its figures


class EngineFull(RuntimeError):
    """A stream the pool has no room for; the message names the limit."""


@dataclass
class FinishedChunk:
    """A chunk a tick finished: latents (1, C, k, h, w), frames (1, 3, k, H, W) in [-1, 1] (None without a VAE)."""

    stream: int
    index: int  # the chunk's index in its video (0: the first after the given frames)
    start: int  # the video frame its first frame is (given frames count)
    latents: torch.Tensor
    frames: torch.Tensor | None
    latency: float  # seconds from the chunk's first denoising step to its end


@dataclass
class StreamStats:
    """A stream's figures: frames made, frames/s since it opened, time to its first chunk, chunk latencies (last
    LATENCY_WINDOW) and whether it keeps up with playback at `fps`."""

    frames: int = 0
    opened: float = field(default_factory=time.perf_counter)
    first_chunk: float | None = None  # seconds from opening to the first chunk
    latencies: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def frames_per_s(self) -> float:
        return self.frames / max(time.perf_counter() - self.opened, 1e-9)

    def keeps_up(self, chunk_size: int, fps: float) -> bool:
        """Whether its chunks come at least as fast as playback consumes them (median chunk latency)."""
        if not self.latencies:
            return False
        median = sorted(self.latencies)[len(self.latencies) // 2]
        return chunk_size / median >= fps


@dataclass
class Stream:
    """One video of the engine: its rows and cache, caption, seed, and where it is (`chunk`, `step`)."""

    id: int
    start: int  # first pool row
    rows: int  # 1, or 2 when guided
    cache: object  # KVCache over its rows
    guided: bool
    seed: int
    n0: int  # given frames
    caption: tuple  # (y, mask) in force
    text: object  # its TextContext
    written: WrittenFrames | None
    sampler: object
    given: torch.Tensor | None = None  # first latents still to write (None once written)
    chunk: int = 0  # index of the chunk being denoised
    step: int = 0  # its next denoising step
    x: torch.Tensor | None = None
    generator: torch.Generator | None = None
    noises: torch.Tensor | None = None
    started: float = 0.0
    pending: tuple | None = None  # (y, mask, recache): a caption switch at the next chunk boundary
    paused: bool = False  # a paused stream keeps its rows and state but takes no step
    stats: StreamStats = field(default_factory=StreamStats)


class _DenoiseContext:
    """What a run of denoising calls with the same streams shares: the CallContext, and index tables on the device.

    Over the N denoising streams (in order) and the call's R rows: source (R,) the stream each row takes x and t
    from (N: none, zeros); first (N,) each stream's first row; guided (G,) the guided streams and unconditional (G,)
    their second rows (None without guidance); step0 (N,) their step indices now, each one more at every call.
    """

    def __init__(self, key, call, streams: list[Stream], rows: int, device: torch.device):
        self.key, self.call = key, call
        source = [len(streams)] * rows
        for j, s in enumerate(streams):
            source[s.start:s.start + s.rows] = [j] * s.rows
        guided = [j for j, s in enumerate(streams) if s.guided]
        tables = [source, [s.start for s in streams], guided, [streams[j].start + 1 for j in guided],
                  [s.step for s in streams]]
        # One copy to the device (each copy from the host waits for the device's queue)
        on_device = torch.tensor(sum(tables, []), dtype=torch.long).to(device).split([len(t) for t in tables])
        self.source, self.first, guided_rows, unconditional, self.step0 = on_device
        self.guided, self.unconditional = (guided_rows, unconditional) if guided else (None, None)
        self.calls = 0

    def steps(self) -> torch.Tensor:
        """(N,) the streams' step indices at this call (every stream of the context steps at every call)."""
        steps = self.step0 + self.calls if self.calls else self.step0
        self.calls += 1
        return steps


class StreamEngine:
    """One model, a fixed pool of `max_rows` cache rows, many streams advanced together (see the module docstring).

    model, diffusion, vae (None: latents only): as the pipeline's; latent_size (h, w) of every stream; sampler,
    num_steps, chunk_size, max_cond_frames, cfg_scale, prefix_perturb_t, sink_frames, cache_dtype: as
    `AutoregressiveGenerator`'s, for every stream; fps: the playback rate a stream must keep up with;
    compile: torch.compile the tick's model call over every row of the pool (shapes never change, so it compiles
    once); eager calls run on the rows up to the last one in use; gather_writes: a cache write runs on its writing
    streams' rows alone, copied side by side and back, not on every row from the first writer's to the last's
    (None: on the CPU, where every row costs its arithmetic and a copy little; not on a GPU, where a small model's
    call costs its kernel launches, which the copies would add to); deblock: strength of the filter on the decoded
    frames' token borders (`sampling.deblock`; 0 off).
    """

    def __init__(self, model, diffusion, vae=None, *, latent_size: tuple[int, int], max_rows: int = 8,
                 sampler: str = "ddim", num_steps: int = 25, chunk_size: int = 8, max_cond_frames: int = 25,
                 cfg_scale: float = 1.0, prefix_perturb_t: int = 0, sink_frames: int = 0,
                 cache_dtype: str | None = None, fps: float = 8.0, compile: bool = False,
                 gather_writes: bool | None = None, deblock: float = 0.0):
        check_layout(model, chunk_size, max_cond_frames, sink_frames)
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if deblock < 0:
            raise ValueError(f"deblock must be >= 0, got {deblock}")
        # One sampler steps every stream at once where it keeps no state between steps (DDIM, IDDPM); DPM-Solver++
        # keeps each stream's multistep history in the stream's own. A bad name or step count fails here, in one line.
        self.sampler = make_sampler(sampler, diffusion, num_steps)
        self.model, self.diffusion, self.vae = model, diffusion, vae
        self.height, self.width = latent_size
        self.max_rows = max_rows
        self.sampler_name, self.num_steps = sampler, num_steps
        self.chunk_size, self.max_cond_frames = chunk_size, max_cond_frames
        self.cfg_scale, self.prefix_perturb_t, self.sink_frames = cfg_scale, prefix_perturb_t, sink_frames
        self.cache_dtype = check_cache_dtype(cache_dtype)
        self.fps = fps
        self.pool = model.new_cache(max_rows, max_cond_frames, chunk_size, sink_frames, cache_dtype)
        model.begin_call(self.pool, 1, self.height, self.width)  # sizes the pool's buffers; the pool never commits
        self.tokens_per_frame = self.pool.k[0].shape[0] // max_rows
        self.text = TextPool(model, max_rows)
        self.streams: dict[int, Stream] = {}
        self._ids = itertools.count()
        self.compiled = compile
        self._denoise_context: _DenoiseContext | None = None
        self._row_tables: dict[int, dict] = {}  # per stream, per kind of call: (its state, its RowTables)
        self._timesteps = self.sampler.timesteps.to(self.device)  # (S,) the model's timestep at each step
        self._step_call = torch.compile(model.step, dynamic=False) if compile else model.step
        self.gather_writes = self.device.type == "cpu" if gather_writes is None else gather_writes
        self.deblock = deblock

    # ------------------------------------------------------------------------------ streams
    @property
    def device(self) -> torch.device:
        return self.pool.k[0].device

    @property
    def free_rows(self) -> int:
        return self.max_rows - sum(stream.rows for stream in self.streams.values())

    def rows_needed(self, guided: bool) -> int:
        """Pool rows a stream takes: two with classifier-free guidance, else one."""
        return 2 if guided and self._guidable else 1

    @property
    def _guidable(self) -> bool:
        return self.cfg_scale != 1.0 and self.model.caption_channels > 0

    @torch.inference_mode()
    def open(self, first_latents: torch.Tensor | None = None, y=None, mask=None, seed: int = 0,
             guided: bool | None = None, state: dict | None = None) -> int:
        """Open a stream -> its id. first_latents (1, C, n0, h, w) given frames (None: none); y (1, L, C_text), mask
        (1, L): its caption (None: the null caption); guided: run guidance (default: when there is a caption; a stream
        that will switch to a caption later needs True); state: a `save()`d stream to branch from (its caption,
        frames and guidance come with it; `seed` draws its next chunks)."""
        if state is not None:
            return self._open_state(state, seed)
        c = self.model.in_channels
        if first_latents is None:
            first_latents = torch.zeros(1, c, 0, self.height, self.width)
        if (first_latents.dim() != 5 or first_latents.shape[:2] != (1, c)
                or tuple(first_latents.shape[3:]) != (self.height, self.width)):
            raise ValueError(f"first_latents must be (1, {c}, n0, {self.height}, {self.width}), "
                             f"got {tuple(first_latents.shape)}")
        n0 = first_latents.shape[2]
        if n0 > self.max_cond_frames:
            raise ValueError(f"{n0} given frames do not fit max_cond_frames={self.max_cond_frames}")
        guided = self._guidable and (y is not None if guided is None else guided)
        stream = self._new_stream(guided, seed, n0, (y, mask))
        frames = perturb(self.diffusion, first_latents.to(self.device, torch.float32), self.prefix_perturb_t,
                         chunk_generator(seed, -1))
        stream.written.keep(frames)
        if n0:
            stream.given = frames
        else:
            self._begin_chunk(stream)
        return stream.id

    def _new_stream(self, guided: bool, seed: int, n0: int, caption: tuple):
        rows = self.rows_needed(guided)
        start = self._find_rows(rows)
        cache = self.pool.rows(start, rows)
        keep_first = self.model.spatial_prefix == "first_frame"
        like = torch.zeros(1, self.model.in_channels, 0, self.height, self.width, device=self.device)
        stream = Stream(id=next(self._ids), start=start, rows=rows, cache=cache, guided=guided, seed=seed, n0=n0,
                        caption=caption, text=video_text(self.model, *caption, 1, guided),
                        written=WrittenFrames(like, self.sink_frames, self.max_cond_frames, keep_first),
                        sampler=make_sampler(self.sampler_name, self.diffusion, self.num_steps))
        self.text.write(start, stream.text)
        self.streams[stream.id] = stream
        return stream

    def _find_rows(self, rows: int) -> int:
        """The first `rows` free rows side by side; EngineFull naming the limit when there are none."""
        taken = torch.zeros(self.max_rows, dtype=torch.bool)
        for stream in self.streams.values():
            taken[stream.start:stream.start + stream.rows] = True
        for start in range(self.max_rows - rows + 1):
            if not taken[start:start + rows].any():
                return start
        kind = "a guided stream needs 2 rows side by side" if rows == 2 else "a stream needs 1 row"
        raise EngineFull(f"no room for another stream: {kind}, {int((~taken).sum())} of the pool's max_rows="
                         f"{self.max_rows} rows are free ({len(self.streams)} streams open)")

    def _stream(self, stream_id: int) -> Stream:
        if stream_id not in self.streams:
            raise KeyError(f"no open stream {stream_id}")
        return self.streams[stream_id]

    @torch.inference_mode()
    def switch(self, stream_id: int, y=None, mask=None, recache: bool = False) -> int:
        """Switch a stream's caption to y (1, L, C_text), mask (1, L) (None: the null caption) at its next chunk
        boundary -> the frame it takes effect at; recache: re-encode the frames in view under it (as
        `AutoregressiveGenerator.switch_prompt`). A later switch before that boundary replaces it."""
        stream = self._stream(stream_id)
        if y is not None and self._guidable and not stream.guided:
            raise ValueError(f"stream {stream_id} was opened without guidance: a switch to a caption needs "
                             "guided=True at open")
        stream.pending = (y, mask, recache)
        return stream.n0 + (stream.chunk + (stream.given is None)) * self.chunk_size

    @torch.inference_mode()
    def save(self, stream_id: int) -> dict:
        """A stream's state after its last finished chunk (the chunk in progress starts again from noise in a
        branch): cache state, caption, frames in view, seed and position; `open(state=...)` branches from it."""
        stream = self._stream(stream_id)
        if stream.given is not None:
            raise ValueError(f"stream {stream_id} has not written its first frames yet: save it after a tick")
        written = stream.written
        return dict(cache=stream.cache.state_dict(), caption=stream.caption, guided=stream.guided, n0=stream.n0,
                    chunk=stream.chunk, seed=stream.seed, pending=stream.pending,
                    written=dict(sink=written.sink, window=written.window, first=written.first,
                                 written=written.written))

    def _open_state(self, state: dict, seed: int) -> int:
        stream = self._new_stream(state["guided"], seed, state["n0"], state["caption"])
        stream.cache.load_state_dict(state["cache"])
        for name, value in state["written"].items():
            setattr(stream.written, name, value)
        stream.chunk, stream.pending = state["chunk"], state["pending"]
        self._begin_chunk(stream)
        return stream.id

    def pause(self, stream_id: int, paused: bool = True) -> None:
        """Hold a stream where it is (paused=False: let it go on); its rows stay taken."""
        self._stream(stream_id).paused = paused

    @torch.inference_mode()
    def close(self, stream_id: int) -> None:
        """Close a stream: its rows are zeroed and free for the next one."""
        stream = self.streams.pop(self._stream(stream_id).id)
        self._row_tables.pop(stream.id, None)
        stream.cache.clear()
        self.text.clear(stream.start, stream.rows)

    def stats(self) -> dict[int, dict]:
        """Per open stream: frames, frames/s, time to first chunk, chunk latency p50 / p95 (s), keeps up with fps."""
        figures = {}
        for stream in self.streams.values():
            s = stream.stats
            latencies = sorted(s.latencies)
            pick = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]) if latencies else None
            figures[stream.id] = dict(frames=s.frames, frames_per_s=s.frames_per_s(), first_chunk=s.first_chunk,
                                      latency_p50=pick and pick(0.5), latency_p95=pick and pick(0.95),
                                      keeps_up=s.keeps_up(self.chunk_size, self.fps))
        return figures

    # ---------------------------------------------------------------------------------- tick
    @torch.inference_mode()
    def step(self) -> list[FinishedChunk]:
        """One tick: a denoising step of every denoising stream in one batched call, then one batched write of the
        chunks it finished and of newly opened streams' first frames -> the chunks finished, decoded in one call."""
        denoising = [s for s in self.streams.values() if s.given is None and not s.paused]
        finished = self._denoise(denoising) if denoising else []
        writes = [(s, s.x) for s in finished] + [(s, s.given) for s in self.streams.values() if s.given is not None]
        self._write(writes)
        out = self._finish(finished)
        for stream, _ in writes:
            stream.given = None
            self._begin_chunk(stream)
        return out

    def _call_rows(self) -> int:
        """Rows a denoising call runs on, from the first. Compiled: every row (one graph); eager: up to the last row
        in use, so a pool with few streams does not pay for its empty rows."""
        if self.compiled:
            return self.max_rows
        return max((s.start + s.rows for s in self.streams.values()), default=1)

    def _span(self, start: int, count: int) -> tuple[object, object]:
        """The pool's cache and the text over rows start.. start + count (the pool's own when that is every row)."""
        if start == 0 and count == self.max_rows:
            return self.pool, self.text.context
        return self.pool.rows(start, count), self.text.rows(slice(start, start + count))

    def _pooled_call(self, active: list[Stream], placed: list[tuple[Stream, int]], pool, num_frames: int,
                     bidirectional: bool) -> PooledCall:
        """The PooledCall of a call over `pool` (a cache over some of the pool's rows) holding the `placed` streams,
        each from the given row of it, where `active` take part; every stream's tables kept for the next calls: a
        stream that has not moved since (its rows, position and chunk) gives its kept ones, so a call made because
        one stream began a chunk does not make every other stream's tables again."""
        ids = {s.id for s in active}
        streams = [s for s, _ in placed]
        blocks, states = [], []
        for s, row in placed:
            block = RowBlock(row, s.rows, s.cache, s.id in ids)
            variant = (block.active, num_frames, bidirectional)
            state = (s.start, s.rows, s.cache.next_position, s.chunk)
            kept = self._row_tables.setdefault(s.id, {}).get(variant)
            if kept is not None and kept[0] == state:
                block.tables = kept[1]
            blocks.append(block)
            states.append((variant, state))
        call = PooledCall(pool, blocks, num_frames, self.tokens_per_frame, bidirectional)
        for s, (variant, state), tables in zip(streams, states, call.tables):
            self._row_tables[s.id][variant] = (state, tables)
        return call

    def _denoise(self, streams: list[Stream]) -> list[Stream]:
        """One denoising step of `streams` in one call -> those whose chunk is now denoised (x holds its latents).

        Every per-stream part of the tick (its rows of x and t, guidance, the sampler's step) is one call over all of
        them, through index tables made with the call's context: a tick's kernel launches do not grow with the
        streams, where a small model's tick on a GPU is bound by its launches."""
        c, k = self.model.in_channels, self.chunk_size
        rows = self._call_rows()
        pool, text = self._span(0, rows)
        # The context changes when a stream joins, leaves, pauses or begins a chunk, not at every step: made once
        # for the steps in between, as the generator makes it once per chunk.
        active = {s.id for s in streams}
        key = (rows, tuple((s.id, s.start, s.rows, s.id in active, s.cache.next_position, s.chunk)
                           for s in self.streams.values()))
        context = self._denoise_context
        if context is None or context.key != key:
            placed = [(s, s.start) for s in self.streams.values()]
            call = self._pooled_call(streams, placed, pool, k, self.model.chunk_bidirectional)
            context = _DenoiseContext(key, pooled_context(self.model, call, text, self.height, self.width, write=False),
                                      streams, rows, self.device)
            self._denoise_context = context
        steps = context.steps()  # (N,) each stream's step index, on the device
        x_streams = torch.cat([s.x for s in streams])  # (N, C, k, h, w)
        zero = x_streams.new_zeros(1, *x_streams.shape[1:])  # rows of no denoising stream
        x = torch.cat([x_streams, zero])[context.source]  # (R, C, k, h, w)
        t = torch.cat([self._timesteps[steps], self._timesteps.new_zeros(1)])[context.source, None].expand(rows, k)
        out = self._step_call(x, t, context.call)  # (R, 2C, k, h, w)
        pred = out[context.first]  # (N, 2C, k, h, w)
        if context.guided is not None:
            pred[context.guided] = guide(pred[context.guided], out[context.unconditional], self.cfg_scale, c)
        if hasattr(self.sampler, "step_rows"):
            noise = None if streams[0].noises is None else torch.cat([s.noises[s.step] for s in streams])
            new_x = self.sampler.step_rows(pred, steps, x_streams, noise).split(1)
        else:
            new_x = [s.sampler.step(pred[j:j + 1], s.step, s.x, s.generator,
                                    None if s.noises is None else s.noises[s.step]) for j, s in enumerate(streams)]
        done = []
        for s, x_next in zip(streams, new_x):
            s.x = x_next
            s.step += 1
            if s.step == len(self._timesteps):
                done.append(s)
        return done

    def _write(self, writes: list[tuple[Stream, torch.Tensor]]) -> None:
        """Write clean frames into the streams' caches: the finished chunks (perturbed from the chunk's generator, as
        the generator commits) and the first frames, in calls of at most chunk_size frames, batched by length."""
        pieces = []
        for stream, frames in writes:
            if stream.given is None:
                frames = perturb(self.diffusion, frames, self.prefix_perturb_t, stream.generator)
                stream.written.keep(frames)
            pieces += [(stream, frames[:, :, i:i + self.chunk_size]) for i in range(0, frames.shape[2],
                                                                                     self.chunk_size)]
        while pieces:  # a stream's pieces in order: at most one of each stream per call, calls grouped by length
            seen, now, later = set(), [], []
            for stream, frames in pieces:
                (later if stream.id in seen else now).append((stream, frames))
                seen.add(stream.id)
            for length in sorted({frames.shape[2] for _, frames in now}):
                self._write_call([(s, f) for s, f in now if f.shape[2] == length], length)
            pieces = later

    def _write_call(self, writes: list[tuple[Stream, torch.Tensor]], num_frames: int) -> None:
        """One cache write of `writes` over their streams' rows: with streams at different points of their chunks,
        most writes are one stream's or a few, and the pool's other rows would be work for nothing. The rows from
        the first writer's to the last's, or (`gather_writes`, when others lie between) the writers' rows copied
        side by side, and their keys/values copied back after."""
        c = self.model.in_channels
        for stream, _ in writes:
            self.model.begin_call(stream.cache, num_frames, self.height, self.width)
        first = min(s.start for s, _ in writes)
        span = max(s.start + s.rows for s, _ in writes) - first
        streams = [s for s, _ in writes]
        taken = None
        if self.gather_writes and sum(s.rows for s in streams) < span:
            taken = torch.cat([torch.arange(s.start, s.start + s.rows) for s in streams])
            pool, text = self.pool.take(taken), self.text.rows(taken)
            placed = list(zip(streams, itertools.accumulate([0] + [s.rows for s in streams[:-1]])))
        else:
            pool, text = self._span(first, span)
            placed = [(s, s.start - first) for s in self.streams.values()
                      if first <= s.start and s.start + s.rows <= first + span]
        rows = pool.batch_size
        x = torch.zeros(rows, c, num_frames, self.height, self.width, device=self.device)
        row = {s.id: r for s, r in placed}
        for stream, frames in writes:
            x[row[stream.id]:row[stream.id] + stream.rows] = frames
        call = self._pooled_call(streams, placed, pool, num_frames, False)
        ctx = pooled_context(self.model, call, text, self.height, self.width, write=True)
        t = torch.zeros(rows, num_frames, dtype=torch.long, device=self.device)
        self.model._trunk(x, t, ctx, kv_only_last=True)
        if taken is not None:
            self.pool.put(pool, taken)
        for stream in streams:
            stream.cache.commit()

    def _finish(self, finished: list[Stream]) -> list[FinishedChunk]:
        """The finished chunks, decoded by one VAE call; the streams' figures."""
        if not finished:
            return []
        latents = torch.cat([s.x for s in finished])
        frames = None
        if self.vae is not None:
            frames = deblock_frames(self.vae.decode(latents), token_pixels(self.vae, self.model), self.deblock)
        now = time.perf_counter()
        out = []
        for i, s in enumerate(finished):
            latency = now - s.started
            s.stats.frames += self.chunk_size
            s.stats.latencies.append(latency)
            if s.stats.first_chunk is None:
                s.stats.first_chunk = now - s.stats.opened
            start = s.n0 + s.chunk * self.chunk_size
            out.append(FinishedChunk(s.id, s.chunk, start, s.x, None if frames is None else frames[i:i + 1], latency))
            s.chunk += 1
        return out

    def _begin_chunk(self, stream: Stream) -> None:
        """Start a stream's next chunk: its pending caption switch (re-encoding if asked), its chunk's call, noise."""
        if stream.pending is not None:
            y, mask, recache = stream.pending
            stream.pending, stream.caption = None, (y, mask)
            stream.text = video_text(self.model, y, mask, 1, stream.guided)
            self.text.write(stream.start, stream.text)
            if recache:
                reencode(stream.cache, stream.written, stream.n0, self.chunk_size, self._write_alone(stream))
        self.model.begin_call(stream.cache, self.chunk_size, self.height, self.width)
        gen = chunk_generator(stream.seed, stream.chunk)
        c = self.model.in_channels
        noise = torch.randn((1, c, self.chunk_size, self.height, self.width), generator=gen, dtype=torch.float32)
        stream.x = noise.to(self.device, copy=True)
        stream.sampler.reset()
        stream.noises = stream.sampler.step_noise(stream.x.shape, gen, self.device)
        stream.generator, stream.step, stream.started = gen, 0, time.perf_counter()

    def _write_alone(self, stream: Stream):
        """A stream's own cache write (a re-encode, rare): the generator's, on its rows only."""
        def write(frames: torch.Tensor) -> None:
            if stream.guided:
                frames = torch.cat([frames, frames])
            self.model.write_cache(frames, stream.cache, text=stream.text)
        return write
