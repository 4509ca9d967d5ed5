"""The stream engine: every stream's frames equal the same video made alone by AutoregressiveGenerator, while other
streams join, leave, switch captions and branch; closing leaves nothing behind; admission refuses in one line.

The engine batches streams into one call, so its arithmetic is the generator's in another order only where a
kernel's blocking depends on the batch size. In float64 those differences are ~1e-16 and stay there, so the engine
must match to 1e-12 of the largest value in every setting. In float32 a random model amplifies them from chunk to
chunk (its latents grow to hundreds), so the float32 and bf16 checks use weights at 0.3 scale, where they stay at
rounding level: float32 within 1e-5 of the largest value, bf16 within the suite's bf16 bound (2^-6).
"""

import pytest
import torch

from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from causalvdm.diffusion import IDDPM
from causalvdm.models.utils import randomize_weights
from causalvdm.sampling import AutoregressiveGenerator
from causalvdm.serving import EngineFull, StreamEngine

C, H, W, L, TEXT = 4, 4, 4, 6, 16  # the tiny config's latent channels and size, caption length and width
BF16_TOL = 2**-6


def settings(**overrides) -> dict:
    return dict(dict(sampler="ddim", num_steps=3, chunk_size=2, max_cond_frames=5, cfg_scale=2.0), **overrides)


def captions(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(1, L, TEXT, generator=gen) for _ in range(n)]


def latents(n0: int, seed: int) -> torch.Tensor:
    return torch.randn(1, C, n0, H, W, generator=torch.Generator().manual_seed(seed))


def run_streams(model, kw: dict, gather_writes: bool = True):
    """Five streams through one engine (see the comments), then each stream's chunks against the generator's
    -> the largest difference relative to the largest value, over every chunk of every stream. Out of step, their
    cache writes are gathered from rows apart (gather_writes) or run over the rows between too."""
    diffusion = IDDPM()
    y1, y2 = captions(2)
    engine = StreamEngine(model, diffusion, latent_size=(H, W), max_rows=8, gather_writes=gather_writes, **kw)
    take, gathered = engine.pool.take, []
    engine.pool.take = lambda rows: gathered.append(rows.tolist()) or take(rows)
    videos = {}  # stream id -> dict(first, y, seed, switches, recache, chunks {index: latents})

    def open_stream(n0, y, seed, **extra):
        first = latents(n0, seed)
        sid = engine.open(first if n0 else None, y=y, seed=seed, **extra)
        videos[sid] = dict(first=first, y=y, seed=seed, switches=[], recache=False, chunks={})
        return sid

    a = open_stream(1, y1, 1)  # guided, one given frame
    b = open_stream(0, None, 2)  # no caption, no given frame: one row
    c = d = e = None
    for tick in range(30):
        if tick == 4:  # a keeps its cached frames at the switch
            videos[a]["switches"].append((engine.switch(a, y2), y2, None))
        if tick == 6:  # c: three given frames, more than a chunk, written in two calls
            c = open_stream(3, y2, 3)
        if tick == 9:
            state = engine.save(a)
        if tick == 10:  # b leaves, d takes its row
            engine.close(b)
            d = open_stream(2, None, 4)
        if tick == 11:  # e branches from a's state at tick 9 with a's seed: it makes what a makes from there on
            e = engine.open(state=state, seed=1)
            videos[e] = dict(videos[a], chunks={})
        if tick == 12:  # c re-encodes its frames under the new caption
            videos[c]["switches"].append((engine.switch(c, y1, recache=True), y1, None))
            videos[c]["recache"] = True
        if tick == 15:  # d holds for three ticks after a step of its chunk while the others go on
            engine.pause(d)
        if tick == 18:
            engine.pause(d, False)
        if tick == 25:
            engine.close(a)
        for chunk in engine.step():
            videos[chunk.stream]["chunks"][chunk.index] = chunk.latents
    assert {a, b, c, d, e} == set(videos) and all(len(v["chunks"]) >= 3 for v in videos.values())
    assert bool(gathered) == gather_writes, gathered
    worst = 0.0
    for video in videos.values():
        n0, k = video["first"].shape[2], kw["chunk_size"]
        last = max(video["chunks"])
        generator = AutoregressiveGenerator(model, diffusion, **kw)
        reference = generator.generate(video["first"], n0 + (last + 1) * k, y=video["y"], seed=video["seed"],
                                       switches=video["switches"], recache_on_switch=video["recache"])
        for index, chunk in video["chunks"].items():
            expected = reference[:, :, n0 + index * k:n0 + (index + 1) * k]
            worst = max(worst, float((chunk - expected).abs().max() / expected.abs().max()))
    return worst


CASES = {
    "cyclic": (dict(tpe_mode="cyclic", max_tpe_len=9), {}),
    "cyclic-sink": (dict(tpe_mode="cyclic", max_tpe_len=9), dict(sink_frames=1)),
    "rope-sink": (dict(tpe_mode="rope"), dict(sink_frames=1)),
    "absolute": (dict(tpe_mode="absolute", max_tpe_len=33), {}),
    "first-frame-prefix": (dict(tpe_mode="cyclic", max_tpe_len=9, spatial_prefix="first_frame"), {}),
    "prev-frames-prefix": (dict(tpe_mode="cyclic", max_tpe_len=9, spatial_prefix="prev_frames_2"), {}),
    "bidirectional-chunk": (dict(tpe_mode="rope", chunk_bidirectional=True), {}),
    "perturbed-prefix-iddpm": (dict(tpe_mode="cyclic", max_tpe_len=9), dict(prefix_perturb_t=50, sampler="iddpm")),
    "int8-cache": (dict(tpe_mode="cyclic", max_tpe_len=9), dict(cache_dtype="int8")),
    "fp8-cache-no-guidance": (dict(tpe_mode="rope"), dict(cache_dtype="float8_e4m3fn", cfg_scale=1.0)),
    "dpm-solver": (dict(tpe_mode="cyclic", max_tpe_len=9), dict(sampler="dpm-solver++")),  # steps stream by stream
}


@pytest.mark.numerics
@pytest.mark.parametrize("gather_writes", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_streams_equal_generator_alone_float64(make_model, case, gather_writes):
    """Joins, leaves, switches with and without re-encoding, a branch, a pause and a reopened row, in float64, with
    cache writes gathered from rows apart or not: exact."""
    model_kw, kw = CASES[case]
    model = make_model(**model_kw).double()
    assert run_streams(model, settings(**kw), gather_writes) <= 1e-12


@pytest.mark.numerics
def test_streams_equal_generator_alone_float32(make_model):
    model = randomize_weights(make_model(tpe_mode="cyclic", max_tpe_len=9), seed=0, scale=0.3)
    assert run_streams(model, settings()) <= 1e-5


@pytest.mark.numerics
def test_streams_equal_generator_alone_bf16(make_model):
    model = randomize_weights(make_model(tpe_mode="rope"), seed=0, scale=0.3).to(torch.bfloat16)
    assert run_streams(model, settings(sink_frames=1)) <= BF16_TOL


def test_closing_leaves_nothing_and_admission_refuses(make_model):
    """A closed stream's rows hold zeros and its caption is gone; a full pool refuses in one line naming the limit."""
    model = make_model(tpe_mode="cyclic", max_tpe_len=9)
    engine = StreamEngine(model, IDDPM(), latent_size=(H, W), max_rows=3, **settings())
    (y,) = captions(1)
    guided = engine.open(latents(1, 0), y=y, seed=0)
    plain = engine.open(latents(1, 1), seed=1)
    assert engine.free_rows == 0
    with pytest.raises(EngineFull, match=r"max_rows=3"):
        engine.open(seed=2)
    for _ in range(4):
        engine.step()
    engine.close(guided)
    rows = slice(0, 2 * engine.tokens_per_frame)  # the guided stream's two rows, in token rows
    assert all(not buffer[rows].any() for buffer in (*engine.pool.k, *engine.pool.v))
    assert not engine.text.context.tokens[:2].any() and engine.text.context.mask[:2].all()
    assert engine.pool.k[0][2 * engine.tokens_per_frame:].any()  # the open stream's rows are untouched
    with pytest.raises(KeyError, match=f"no open stream {guided}"):
        engine.switch(guided)
    first, second = engine.open(seed=3), engine.open(seed=4)  # rows 0 and 1; the third holds `plain`
    engine.close(first)
    engine.close(plain)
    assert engine.free_rows == 2
    with pytest.raises(EngineFull, match="2 rows side by side, 2 of the pool's max_rows=3 rows are free"):
        engine.open(seed=5, y=y)
    assert engine.streams.keys() == {second}


def test_engine_reports_stream_figures(make_model):
    model = make_model(tpe_mode="cyclic", max_tpe_len=9)
    engine = StreamEngine(model, IDDPM(), latent_size=(H, W), max_rows=2, fps=1e-6, **settings())
    sid = engine.open(latents(1, 0), seed=0)
    chunks = [chunk for _ in range(7) for chunk in engine.step()]
    assert [chunk.index for chunk in chunks] == [0, 1]  # the first tick writes the given frame, then 3 steps each
    figures = engine.stats()[sid]
    assert figures["frames"] == 4 and figures["keeps_up"] and figures["latency_p95"] >= figures["latency_p50"] > 0
    assert 0 < figures["first_chunk"] and figures["frames_per_s"] > 0


def test_compiled_tick_compiles_once(make_model):
    """compile=True: one graph serves every tick while streams join, switch and leave (static shapes), and the
    frames are the eager engine's (float32, 1e-5 of the largest value)."""
    model = randomize_weights(make_model(tpe_mode="cyclic", max_tpe_len=9), seed=0, scale=0.3)
    (y,) = captions(1)
    videos = {}
    for compile in (False, True):
        torch._dynamo.reset()
        counters.clear()
        engine = StreamEngine(model, IDDPM(), latent_size=(H, W), max_rows=4, compile=compile, **settings())
        a = engine.open(latents(1, 0), y=y, seed=0)
        chunks = []
        for tick in range(16):
            if tick == 3:
                b = engine.open(seed=1)
            if tick == 6:
                engine.switch(a, None)
            if tick == 9:
                engine.close(b)
            chunks += [chunk.latents for chunk in engine.step() if chunk.stream == a]
        videos[compile] = torch.cat(chunks, dim=2)
    assert counters["stats"]["unique_graphs"] == 1
    assert (videos[True] - videos[False]).abs().max() <= 1e-5 * videos[False].abs().max()


class _Kernels(TorchDispatchMode):
    """Counts the ops a block of code runs that make new tensors (a view launches no kernel)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sampler", ["ddim", "iddpm"])
def test_a_tick_runs_as_many_ops_for_six_streams_as_for_two(make_model, sampler):
    """A denoising tick is one call for all streams, guided and unguided: its ops, each a kernel launch on a GPU,
    do not grow with the streams, between chunk boundaries and in a tick whose call is made anew because one stream
    paused (the others' tables are kept from the call before)."""
    model = make_model(tpe_mode="cyclic", max_tpe_len=9)
    y, = captions(1)
    steady, after_pause = {}, {}
    for n in (2, 6):
        engine = StreamEngine(model, IDDPM(), latent_size=(H, W), max_rows=12, **settings(sampler=sampler,
                                                                                        num_steps=4))
        for i in range(n):
            engine.open(None, y=y if i % 2 else None, seed=i)  # every other stream guided: two rows
        engine.step()  # the first step of every stream's chunk, and the call's context
        for counts in (steady, after_pause):
            if counts is after_pause:
                engine.pause(0)
            counter = _Kernels()
            with counter:
                assert engine.step() == []  # no chunk ends
            counts[n] = counter.count
    assert steady[2] == steady[6] and after_pause[2] == after_pause[6], (steady, after_pause)


@pytest.mark.numerics
@pytest.mark.parametrize("gather_writes, apart", [(False, 5), (True, 4)])
def test_a_write_runs_on_the_writing_streams_rows_only(make_model, monkeypatch, gather_writes, apart):
    """A cache write runs the model on its writing streams' rows: one stream's rows when it alone ends a chunk;
    around a stream that goes on denoising between two that end together, on every row from the first writer's to
    the last's, or on the two writers' rows alone (gather_writes). In float64 every stream's chunks stay the
    generator's alone (1e-12 of the largest value)."""
    model = make_model(tpe_mode="cyclic", max_tpe_len=9, spatial_prefix="prev_frames_2").double()
    kw = settings()
    y1, y2 = captions(2)
    engine = StreamEngine(model, IDDPM(), latent_size=(H, W), max_rows=6, gather_writes=gather_writes, **kw)
    write_rows = []
    trunk = model._trunk

    def spy(x, t, ctx, kv_only_last=False):
        if kv_only_last:
            write_rows.append(x.shape[0])
        return trunk(x, t, ctx, kv_only_last=kv_only_last)

    monkeypatch.setattr(model, "_trunk", spy)
    videos = {}
    for seed, y in ((1, y1), (2, None), (3, y2)):  # rows 0-1 (guided), 2, 3-4 (guided)
        first = latents(1, seed)
        videos[engine.open(first, y=y, seed=seed)] = dict(first=first, y=y, seed=seed, chunks={})
    middle = list(videos)[1]
    engine.pause(middle)  # tick 0 writes the first frames; paused in tick 1, it ends its chunks a tick after the others
    for tick in range(12):
        if tick == 2:
            engine.pause(middle, False)
        for chunk in engine.step():
            videos[chunk.stream]["chunks"][chunk.index] = chunk.latents
    assert write_rows[0] == 5 and set(write_rows[1:]) == {apart, 1}, write_rows  # the first frames, then by chunk
    for video in videos.values():
        last = max(video["chunks"])
        reference = AutoregressiveGenerator(model, IDDPM(), **kw).generate(
            video["first"], 1 + (last + 1) * kw["chunk_size"], y=video["y"], seed=video["seed"])
        for index, chunk in video["chunks"].items():
            expected = reference[:, :, 1 + index * 2:3 + index * 2]
            assert (chunk - expected).abs().max() <= 1e-12 * expected.abs().max()
