"""Exactness tests that would catch a mistake shared by the cached path and its reference.

The other cache tests compare the ring-buffer KV cache with references that run the same model code
(`ReferenceKVCache`, `tools/verify_cache.py`), before any cyclic TPE wrap, and with a v-prediction,
fixed-variance diffusion. The tests here close those gaps:

1. Generator level, cyclic TPE with a short table (chunk 4, 9 cached frames, max_tpe_len 13 = 9 + 4, the
   tightest the generator allows): the TPE rows every frame in view gets are recovered from the model's
   call context and checked chunk by chunk against hand-written lists, across the wrap. Cache == recompute
   until the table is full; after wrap + eviction an exact recompute reference exists for a one-block model
   (see `test_wrap_and_evict_cache_matches_exact_recompute`), also used for the spatial prefix.
2. The IDDPM epsilon + learned-variance sampler (the paper's setting) in both modes, and proof that the
   variance half of the 2C output channels is what the ancestral steps use.
3. One block's cached temporal attention re-implemented with plain torch ops (projections from the weight
   tensors, positional encoding written out, causal frame mask, softmax) over a queue that has wrapped and
   evicted, compared with what the model computes for that layer.

Nothing here calls project helpers for positions, masks or attention on the reference side.
"""

import copy
import inspect
import math

import pytest
import torch

from causalvdm.diffusion import IDDPM
from causalvdm.sampling import AutoregressiveGenerator

pytestmark = pytest.mark.numerics  # every test here compares two float computations (.ci/run runs them on AVX2 too)

# The generator setting of tests 1 and 2: 1 given frame, chunks of 4, 9 cached frames (a ring of 9 + 4 = 13
# slots). TPE_LEN = 13 is the shortest cyclic table the generator accepts (every row in view once the queue is
# full); LONG_TPE_LEN = 15 differs from the ring's 13 slots, so TPE rows taken from slots would show.
N0, K, MAX_COND, TPE_LEN, LONG_TPE_LEN = 1, 4, 9, 13, 15


# ------------------------------------------------------------------------------ written-out positions
def sincos_table(dim: int, length: int) -> torch.Tensor:
    """The temporal TPE table, written out here (Open-Sora v1 / DiT 1D sin-cos): row p is
    [sin(p w_0) .. sin(p w_{D/2-1}), cos(p w_0) .. cos(p w_{D/2-1})] with w_i = 10000^(-2i/D)."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    omega = 10000.0 ** (-2.0 * torch.arange(dim // 2, dtype=torch.float64) / dim)
    return torch.cat([torch.sin(pos * omega), torch.cos(pos * omega)], dim=1).float()


def rotate(z: torch.Tensor, positions: list[int], base: float = 10000.0) -> torch.Tensor:
    """RoPE written out (GPT-NeoX half split): pairs (z_j, z_{j+Dh/2}) turn by angle p * base^(-2j/Dh)."""
    half = z.shape[-1] // 2
    inv_freq = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / z.shape[-1])
    angles = torch.tensor(positions, dtype=torch.float64)[:, None] * inv_freq  # (T, Dh/2)
    cos, sin = angles.cos().float(), angles.sin().float()
    z1, z2 = z[..., :half], z[..., half:]
    return torch.cat([z1 * cos - z2 * sin, z2 * cos + z1 * sin], dim=-1)


def table_rows(tpe: torch.Tensor, table: torch.Tensor) -> list[int]:
    """Which row of `table` (L, D) each frame's embedding in a call's `tpe` (1, T, D) is -> T row indices."""
    assert tpe.shape[0] == 1, "inference must use one TPE row set for the whole batch (offset 0)"
    dist = (tpe[0, :, None].float() - table[None]).abs().amax(-1)  # (T, L)
    assert dist.min(-1).values.max() < 1e-6, "a frame's TPE is not a row of the sin-cos table"
    return dist.argmin(-1).tolist()


def rope_positions(rope: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    """The frame positions a call's RoPE tables (cos, sin each (T, Dh)) encode, read off the slowest pair,
    whose angle p * 10000^(-(Dh-2)/Dh) stays far below pi for the positions used here."""
    cos, sin = rope
    head_dim = cos.shape[-1]
    slowest = 10000.0 ** (-(head_dim - 2) / head_dim)
    angle = torch.atan2(sin[:, head_dim // 2 - 1].double(), cos[:, head_dim // 2 - 1].double())
    return torch.round(angle / slowest).long().tolist()


# ------------------------------------------------------------------------------ recording the calls
def record_prepare(model) -> list[dict]:
    """Wrap `model.prepare` (what every denoising step and cache write of the generator goes through) and log,
    per call, its kind and the positions its frames get: TPE table rows (absolute/cyclic) or RoPE positions.

    kinds: 'write' (a t = 0 cache write: a call made inside `model.write_cache`), 'chunk' (a cached chunk: the
    chunk's frames only) and 'window' (a recompute call on [conditioning frames | chunk]).
    """
    original, original_write = model.prepare, model.write_cache
    signature = inspect.signature(original)
    table = sincos_table(model.hidden_size, model.max_tpe_len)
    log = []
    writing = []

    def write_cache(*args, **kwargs):
        writing.append(True)
        try:
            return original_write(*args, **kwargs)
        finally:
            writing.pop()

    def prepare(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        cache = call.arguments.get("cache")
        if cache is None:
            kind = "window"
        else:
            kind = "write" if writing else "chunk"
        ctx = original(*call.args, **call.kwargs)
        if ctx.tpe is not None:
            rows = table_rows(ctx.tpe, table)
        else:
            rows = rope_positions(ctx.rope)
        log.append(dict(kind=kind, rows=rows))
        return ctx

    model.prepare, model.write_cache = prepare, write_cache
    return log


def in_view(log: list[dict]) -> list[list[int]]:
    """Per denoised chunk, the TPE rows (or RoPE positions) of every frame its temporal attention sees, oldest
    first. Cache mode: the rows the queued frames (the last MAX_COND written) got when they were written, then the
    chunk's own; recompute mode: the rows of the window call."""
    written, views = [], []
    for entry in log:
        if entry["kind"] == "write":
            written += entry["rows"]
        elif entry["kind"] == "chunk":
            views.append(written[-MAX_COND:] + entry["rows"])
        else:
            views.append(entry["rows"])
    return views


def inputs(model, batch=2, seed=1):
    """One given frame (B, C, 1, 4, 4), caption tokens with a padding mask (the second caption shorter)."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(batch, model.in_channels, N0, 4, 4, generator=gen)
    y = torch.randn(batch, model.model_max_length, model.caption_channels, generator=gen)
    mask = torch.ones(batch, model.model_max_length, dtype=torch.bool)
    mask[1, 3:] = False
    return first, y, mask


def generate(model, diffusion, mode, num_chunks, recompute_positions="absolute", cfg_scale=1.0, seed=3):
    """A video of N0 + num_chunks * K frames (iddpm, 4 steps, perturbed prefix) and the log of its model calls.

    recompute_positions: 'absolute' gives the recompute window's frames the positions they have in cache mode,
    'window' numbers them from 0 (see AutoregressiveGenerator).
    """
    log = record_prepare(model)
    first, y, mask = inputs(model)
    gen = AutoregressiveGenerator(model, diffusion, "iddpm", num_steps=4, chunk_size=K, max_cond_frames=MAX_COND,
                                  cfg_scale=cfg_scale, prefix_perturb_t=20, mode=mode,
                                  recompute_positions=recompute_positions)
    video = gen.generate(first, N0 + num_chunks * K, y, mask, seed=seed)
    del model.prepare, model.write_cache  # unwrap: the next generation records afresh
    return video, log


def assert_close_rel(actual, expected, rel):
    """|actual - expected| <= rel * max|expected| everywhere (fp32 round-off grows with the values)."""
    scale = expected.abs().max().item()
    worst = (actual - expected).abs().max().item()
    assert worst <= rel * scale, f"max abs diff {worst:.3e} > {rel:g} x largest value {scale:.3e}"


def chunk_errors(actual, expected, num_chunks) -> list[float]:
    """Per generated chunk j (frames N0 + K j .. N0 + K (j + 1)): max |actual - expected| / max |expected|."""
    errors = []
    for j in range(num_chunks):
        frames = slice(N0 + K * j, N0 + K * (j + 1))
        errors.append(((actual[:, :, frames] - expected[:, :, frames]).abs().max()
                       / expected[:, :, frames].abs().max()).item())
    return errors


# Hand-written: chunk j of K = 4 frames starts at absolute position s = 1 + 4j; the frames in view are the last
# MAX_COND = 9 written ones (positions max(0, s - 9) .. s - 1) then the chunk (s .. s + 3), and in cyclic mode
# at inference frame n gets TPE row n mod max_tpe_len (DESIGN.md section 2: offset 0 at inference).
VIEWS_13 = [  # max_tpe_len 13
    [0, 1, 2, 3, 4],  # chunk 0: positions 0..4
    [0, 1, 2, 3, 4, 5, 6, 7, 8],  # chunk 1: 0..8
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],  # chunk 2: 0..12, every row once: the table is full
    [4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 1, 2, 3],  # chunk 3: 4..16, frames 0..3 evicted, the chunk wraps
    [8, 9, 10, 11, 12, 0, 1, 2, 3, 4, 5, 6, 7],  # chunk 4: 8..20, the wrap inside the queue
]
VIEWS_15 = [  # max_tpe_len 15
    [0, 1, 2, 3, 4],  # chunk 0: positions 0..4
    [0, 1, 2, 3, 4, 5, 6, 7, 8],  # chunk 1: 0..8
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],  # chunk 2: 0..12
    [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0, 1],  # chunk 3: 4..16, frames 0..3 evicted, the chunk wraps
    [8, 9, 10, 11, 12, 13, 14, 0, 1, 2, 3, 4, 5],  # chunk 4: 8..20, the wrap inside the queue
    [12, 13, 14, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # chunk 5: 12..24
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],  # chunk 6: 16..28, no wrap in view
    [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0, 1, 2],  # chunk 7: 20..32, the second wrap, inside the chunk
]


# ------------------------------------------------------------------------------ 1. cyclic TPE wrap
@torch.no_grad()
def test_cyclic_tpe_rows_per_chunk_and_cache_matches_recompute_until_the_table_is_full(make_model):
    """Cache vs recompute through the generator with a 13-row cyclic table and 9 + 4 frames in view.

    Catches: a TPE index built from ring-buffer slots, from the queue length or from a per-call position
    instead of the absolute frame position mod max_tpe_len (the rows per chunk are checked against hand-written
    lists, through the first wrap); an off-by-one at the table's end (chunk 2 uses all 13 rows, nothing evicted,
    and must equal the recompute baseline); cached frames whose TPE changes after they were written.

    No wrap can happen before an eviction here: the generator requires max_cond_frames + chunk_size <=
    max_tpe_len and positions start at 0, so with nothing evicted every position is < max_tpe_len. The exact
    comparison across wrap and eviction is the next test. The recompute baseline's window keeps the rows of the
    cache by default ('absolute'); recompute_positions='window' restarts it at row 0 after eviction.
    """
    model = make_model(max_tpe_len=TPE_LEN, learn_sigma=False)
    diffusion = IDDPM(prediction_type="v_prediction", learn_sigma=False)  # O(1) samples from a random model
    cached, cache_log = generate(model, diffusion, "cache", num_chunks=5)
    recomputed, window_log = generate(model, diffusion, "recompute", num_chunks=5)
    from_zero, from_zero_log = generate(model, diffusion, "recompute", num_chunks=5, recompute_positions="window")

    assert [e["kind"] for e in cache_log] == ["write"] + ["chunk", "write"] * 5
    assert cache_log[0]["rows"] == [0] and [e["rows"] for e in cache_log[2::2]] == [
        [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [0, 1, 2, 3], [4, 5, 6, 7]]  # rows stored with each frame
    assert in_view(cache_log) == VIEWS_13
    assert in_view(window_log) == VIEWS_13  # the baseline's window at the rows its frames have in the cache
    assert in_view(from_zero_log) == VIEWS_13[:3] + [list(range(TPE_LEN))] * 2  # after eviction: from row 0

    frames_full_table = N0 + 3 * K  # chunks 0-2: at most 9 conditioning frames, nothing evicted
    assert cached[:, :, 1:].std() > 0.3
    assert torch.equal(from_zero[:, :, :frames_full_table], recomputed[:, :, :frames_full_table])
    assert_close_rel(cached[:, :, :frames_full_table], recomputed[:, :, :frames_full_table], rel=1e-5)
    # After eviction the cached frames keep the context they were written with: the baselines part.
    assert (cached[:, :, frames_full_table:] - recomputed[:, :, frames_full_table:]).abs().max() > 1e-2


@pytest.mark.parametrize("tpe_mode", ["cyclic", "rope"])
@torch.no_grad()
def test_wrap_and_evict_cache_matches_exact_recompute(make_model, tpe_mode):
    """After wrap and eviction, the cached path equals a plain no-cache forward over [queue | chunk].

    With one block the temporal keys/values of a frame depend on that frame (and its timestep and position)
    alone, so the context a cached frame was written with does not matter and the recompute baseline is exact
    after eviction, provided its window's frames get the same positions as in cache mode (the generator's default
    recompute_positions='absolute'). With 'window' (numbered from 0 after eviction) rope still agrees, its
    positions being relative, and cyclic does not. 8 chunks with a 15-row table: the cyclic rows wrap twice, the
    queue evicts from chunk 3 on.

    Catches, without any reference cache: the ring buffer attending to a wrong or stale slot after it wraps,
    an eviction off by one, cyclic rows taken from slots, RoPE positions taken mod the table or from slots.
    """
    model = make_model(depth=1, tpe_mode=tpe_mode, max_tpe_len=LONG_TPE_LEN, learn_sigma=False)
    diffusion = IDDPM(prediction_type="v_prediction", learn_sigma=False)
    cached, cache_log = generate(model, diffusion, "cache", num_chunks=8)
    recomputed, window_log = generate(model, diffusion, "recompute", num_chunks=8)
    from_zero, from_zero_log = generate(model, diffusion, "recompute", num_chunks=8, recompute_positions="window")

    starts = [max(0, N0 + K * j - MAX_COND) for j in range(8)]
    if tpe_mode == "cyclic":
        assert in_view(cache_log) == VIEWS_15
        assert in_view(window_log) == VIEWS_15
        assert in_view(from_zero_log) == [[p % LONG_TPE_LEN for p in range(N0 + K * j + K - s)]
                                          for j, s in enumerate(starts)]
    else:  # absolute positions in the cache, never wrapped; the 'window' baseline's from 0
        assert in_view(cache_log) == [list(range(s, N0 + K * j + K)) for j, s in enumerate(starts)]
        assert in_view(window_log) == in_view(cache_log)
        assert in_view(from_zero_log) == [list(range(N0 + K * j + K - s)) for j, s in enumerate(starts)]
    assert cached[:, :, 1:].std() > 0.3
    assert_close_rel(cached, recomputed, rel=1e-5)
    evicted = N0 + 3 * K  # from chunk 3 on the 'window' baseline numbers its frames from 0
    if tpe_mode == "rope":
        assert_close_rel(cached, from_zero, rel=1e-5)
    else:
        assert (cached[:, :, evicted:] - from_zero[:, :, evicted:]).abs().max() > 1e-2


@pytest.mark.parametrize("spatial_prefix", ["first_frame", "prev_frames_3"])
@torch.no_grad()
def test_spatial_prefix_cache_matches_exact_recompute_after_eviction(make_model, spatial_prefix):
    """The one-block exact reference above, with the prefix-enhanced spatial attention (the chunk's spatial
    attention also reads frame 0, or the 3 frames before the chunk, whose spatial keys/values are cached).

    In one block those keys/values depend on their frame alone, so cache and recompute must agree after eviction
    too. Catches: the spatial-prefix ring (N slots) reading a wrong or stale slot after it wraps, and either mode
    reading other frames than the rule names once the queue has evicted. 'first_frame' agrees only until frame 0
    leaves the recompute window: the baseline reads its window's oldest frame then (as the reference code's
    baseline does), the cache frame 0 for ever (checked against the naive cache in test_kv_cache).
    """
    model = make_model(depth=1, max_tpe_len=LONG_TPE_LEN, learn_sigma=False, spatial_prefix=spatial_prefix)
    diffusion = IDDPM(prediction_type="v_prediction", learn_sigma=False)
    cached, _ = generate(model, diffusion, "cache", num_chunks=5)
    recomputed, _ = generate(model, diffusion, "recompute", num_chunks=5)
    before_eviction = N0 + 3 * K
    assert_close_rel(cached[:, :, :before_eviction], recomputed[:, :, :before_eviction], rel=1e-5)
    if spatial_prefix == "first_frame":
        assert (cached[:, :, before_eviction:] - recomputed[:, :, before_eviction:]).abs().max() > 1e-3
    else:
        assert_close_rel(cached, recomputed, rel=1e-5)  # chunks 3, 4: frames 0..3, then 0..7, have left the queue


# ------------------------------------------------------------------------------ 2. epsilon + learned sigma
@pytest.mark.parametrize("depth", [1, 2])
@torch.no_grad()
def test_iddpm_epsilon_learned_sigma_cache_matches_recompute(make_model, depth):
    """The paper's sampler (IDDPM ancestral steps, epsilon prediction, learned-range variance from the second
    half of the 2C output channels), with guidance, in cache and recompute mode, in float64 and in fp32.

    depth 1: every chunk of 8 (wrap and eviction included) against the exact recompute reference of the test
    above; depth 2: the chunks before the first eviction against the generator's baseline as is.
    Catches: the cached path slicing or ordering the 2C channels differently from the recompute path (e.g.
    `[:, :, p:]` on the wrong axis, a variance half dropped or taken from the unconditional half in one mode).

    Bounds: a random epsilon model's x0 estimates reach hundreds (x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    multiplies the model's round-off by up to 1 / sqrt(abar_999) ~ 160 at the first step), and later chunks attend
    to those frames, so the fp32 round-off of this computation is measured, not assumed: E is the largest per-chunk
    error of the fp32 recompute video against the same video with the model in float64, relative to the chunk's
    largest value (the latents and sampler stay fp32, as the generator keeps them). Measured: E = 2.4e-4 at depth 1
    under both the avx2 and the default kernels, 5.7e-6 (avx2) and 3.4e-6 (default) at depth 2; 5e-7 to 6e-4 over 14
    model seeds.
    - float64, the two modes within E: measured bit-equal (float64 differences vanish in the fp32 latents).
    - fp32, the two modes within 8 E: each fp32 video is off the float64 one by about E, but the largest of a few
      hundred amplified round-offs fluctuates between two ways of summing: over 14 model seeds x 2 depths x the avx2
      and default kernels the modes differed by up to 4.0 E (the cache's own error reached 3.1 E).
    Mistakes sit far above: the variance taken from the unconditional half in cache mode moves the chunks by 15 E
    to 2000 E, a cache that keeps one frame fewer by 230 E (depth 2) to 3000 E (depth 1).
    """
    model = make_model(depth=depth, max_tpe_len=LONG_TPE_LEN if depth == 1 else TPE_LEN)
    model64 = copy.deepcopy(model).double()
    diffusion = IDDPM(prediction_type="epsilon", learn_sigma=True)
    assert model.out_channels == 2 * model.in_channels and diffusion.learn_sigma
    num_chunks = 8 if depth == 1 else 3
    cached, _ = generate(model, diffusion, "cache", num_chunks, cfg_scale=2.0)
    recomputed, _ = generate(model, diffusion, "recompute", num_chunks, cfg_scale=2.0)
    cached64, _ = generate(model64, diffusion, "cache", num_chunks, cfg_scale=2.0)
    exact, _ = generate(model64, diffusion, "recompute", num_chunks, cfg_scale=2.0)
    assert cached.shape == (2, model.in_channels, N0 + num_chunks * K, 4, 4)
    assert torch.isfinite(cached).all() and cached[:, :, 1:].std() > 1.0

    fp32_error = max(chunk_errors(recomputed, exact, num_chunks))
    # > 0: the float64 model really ran in float64; < 1e-3: fp32 round-off leaves the video as it is, so 8 E stays
    # far below what a mistake does
    assert 0 < fp32_error < 1e-3, fp32_error
    for j, (in_float64, in_fp32) in enumerate(zip(chunk_errors(cached64, exact, num_chunks),
                                                  chunk_errors(cached, recomputed, num_chunks))):
        assert in_float64 <= fp32_error, f"chunk {j}, float64: {in_float64:.2e} > E = {fp32_error:.2e}"
        assert in_fp32 <= 8 * fp32_error, f"chunk {j}, fp32: {in_fp32:.2e} > 8 E, E = {fp32_error:.2e}"


@torch.no_grad()
def test_learned_variance_half_drives_the_iddpm_steps(make_model):
    """The sampler really takes the learned-variance branch: the model returns 2C channels, and shifting only the
    variance half (channels C..2C) of every model output changes the video, while a zero shift leaves it bit-exact.

    Catches: a sampler or generator that silently falls back to the fixed variance (or reads the epsilon half as
    the variance) when the model has learn_sigma.
    """
    model = make_model(depth=1, max_tpe_len=TPE_LEN)
    diffusion = IDDPM(prediction_type="epsilon", learn_sigma=True)
    c = model.in_channels
    base, _ = generate(model, diffusion, "cache", num_chunks=2)
    original_step = model.step
    videos = {}
    for shift in (0.0, 0.5):
        def step(x, t, ctx, shift=shift):
            out = original_step(x, t, ctx)
            assert out.shape[1] == 2 * c
            return torch.cat([out[:, :c], out[:, c:] + shift], dim=1)

        model.step = step
        videos[shift], _ = generate(model, diffusion, "cache", num_chunks=2)
    del model.step
    assert torch.equal(videos[0.0], base)
    first_chunk = slice(N0, N0 + K)
    change = (videos[0.5][:, :, first_chunk] - base[:, :, first_chunk]).abs().max()
    assert change > 1e-2 * base[:, :, first_chunk].abs().max(), change


# ------------------------------------------------------------------------------ 3. plain-torch temporal attention
def capture_blocks(model) -> list[dict]:
    """Hooks recording, per model call and block: the block's input stream x (B, T, S, D) and per-frame
    modulation t0 (B, T, 6D), its spatial-attention output (B*T, S, D) and its temporal-attention output
    (B*S, T, D) (absent where a cache write stops at the last block's keys/values)."""
    calls = []

    def block_input(block, args):
        x, t0, _ctx, layer, _kv_only = args
        if layer == 0:
            calls.append({})
        calls[-1][layer] = dict(x=x, t0=t0)

    for layer, block in enumerate(model.blocks):
        block.register_forward_pre_hook(block_input)
        block.attn.register_forward_hook(lambda m, a, out, layer=layer: calls[-1][layer].update(spatial=out))
        block.attn_temp.register_forward_hook(lambda m, a, out, layer=layer: calls[-1][layer].update(temporal=out))
    return calls


def plain_qkv(block, rec: dict, positions: list[int], layer: int, tpe_mode: str, max_tpe_len: int, num_heads: int):
    """Temporal q, k, v (B*S, H, T, Dh) of one call's frames from the captured block input, with plain torch ops.

    The temporal input is the unnormalised stream after the gated spatial attention (adaLN-single: gate_msa is
    row 2 of scale_shift_table + t0), plus, in block 0 only, the cyclic TPE row position mod max_tpe_len
    (Open-Sora v1); rope turns q and k by absolute position instead.
    """
    x, t0, spatial = rec["x"], rec["t0"], rec["spatial"]
    b, t, s, d = x.shape
    gate_msa = block.scale_shift_table[2] + t0.view(b, t, 6, d)[:, :, 2]  # (B, T, D)
    stream = x + gate_msa[:, :, None] * spatial.view(b, t, s, d)
    if tpe_mode == "cyclic" and layer == 0:
        rows = torch.tensor([p % max_tpe_len for p in positions])
        stream = stream + sincos_table(d, max_tpe_len)[rows][None, :, None]
    h = stream.transpose(1, 2).reshape(b * s, t, d)  # one sequence of frames per spatial position
    qkv = h @ block.attn_temp.qkv.weight.T + block.attn_temp.qkv.bias  # (B*S, T, 3D): q | k | v
    q, k, v = (z.reshape(b * s, t, num_heads, d // num_heads).transpose(1, 2) for z in qkv.split(d, dim=-1))
    if tpe_mode == "rope":
        q, k = rotate(q, positions), rotate(k, positions)
    return q, k, v


def plain_attention(block, q, k, v, mask):
    """softmax(q k^T / sqrt(Dh) masked) v, heads joined, then the output projection -> (B*S, T, D)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    o = (weights @ v).transpose(1, 2).flatten(2)
    return o @ block.attn_temp.proj.weight.T + block.attn_temp.proj.bias


@pytest.mark.parametrize("tpe_mode, bidirectional", [("cyclic", False), ("rope", False), ("cyclic", True)])
@torch.no_grad()
def test_cached_temporal_attention_matches_plain_torch(make_model, tpe_mode, bidirectional):
    """Each block's cached temporal attention, recomputed with plain tensors from the weights.

    A 5-frame queue (ring of 5 + 3 slots) gets 2 + 3 + 3 + 3 written frames (positions 0..10: the ring has
    wrapped, frames 0..5 are evicted, cyclic rows wrap at max_tpe_len 9, not at the ring's 8), then a 3-frame
    chunk (positions 11..13, per-frame timesteps) is run through the cache. For every block, the reference takes
    the keys/values of queued frames 6..10 from what that block received when they were written, and the chunk's
    q/k/v from what it receives now; each chunk frame sees every queued frame and the chunk frames up to itself
    (all of them when chunk-bidirectional). Block 1 is the last one, whose cache write only projects keys/values
    (`write_kv`), so both projection paths are covered.

    Catches: a wrong slot or mask in the ring, an eviction off by one, q/k/v split or head layout errors, a
    missing or extra TPE (block 0 only) or a TPE/RoPE at the wrong position, a wrong softmax scale.
    """
    max_tpe_len, capacity, chunk = 9, 5, 3
    model = make_model(tpe_mode=tpe_mode, max_tpe_len=max_tpe_len, chunk_bidirectional=bidirectional)
    calls = capture_blocks(model)
    gen = torch.Generator().manual_seed(5)
    b, c = 2, model.in_channels
    y = torch.randn(b, model.model_max_length, model.caption_channels, generator=gen)
    mask = torch.ones(b, model.model_max_length, dtype=torch.bool)
    mask[1, 2:] = False

    cache = model.new_cache(b, capacity, chunk_size=chunk)
    sizes = [2, 3, 3, 3]
    for n in sizes:
        model.write_cache(torch.randn(b, c, n, 4, 4, generator=gen), cache, y, mask)
    x = torch.randn(b, c, chunk, 4, 4, generator=gen)
    model(x, torch.tensor([[900, 400, 30], [10, 600, 999]]), y, mask, cache=cache)
    assert len(calls) == len(sizes) + 1 and cache.next_position == sum(sizes)

    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]  # positions of each write call: 0-1, 2-4, 5-7, 8-10
    queued = list(range(bounds[-1] - capacity, bounds[-1]))  # 6..10
    new = list(range(bounds[-1], bounds[-1] + chunk))  # 11..13
    visible = torch.ones(chunk, chunk, dtype=torch.bool) if bidirectional else torch.ones(chunk, chunk).tril().bool()
    frame_mask = torch.cat([torch.ones(chunk, capacity, dtype=torch.bool), visible], dim=1)  # (T, queued + T)
    for layer, block in enumerate(model.blocks):
        keys, values = [], []
        for call, lo, hi in zip(calls, bounds[:-1], bounds[1:]):
            _, k, v = plain_qkv(block, call[layer], list(range(lo, hi)), layer, tpe_mode, max_tpe_len, model.num_heads)
            keys.append(k)
            values.append(v)
        keys, values = torch.cat(keys, dim=2), torch.cat(values, dim=2)  # positions 0..10
        q, k_new, v_new = plain_qkv(block, calls[-1][layer], new, layer, tpe_mode, max_tpe_len, model.num_heads)
        expected = plain_attention(block, q, torch.cat([keys[:, :, queued], k_new], dim=2),
                                   torch.cat([values[:, :, queued], v_new], dim=2), frame_mask)
        got = calls[-1][layer]["temporal"]
        assert_close_rel(got, expected, rel=1e-5)

        # Not vacuous: keeping the last evicted frame (5) in the queue gives a clearly different output.
        one_more = [queued[0] - 1, *queued]
        wider = torch.cat([torch.ones(chunk, 1, dtype=torch.bool), frame_mask], dim=1)
        stale = plain_attention(block, q, torch.cat([keys[:, :, one_more], k_new], dim=2),
                                torch.cat([values[:, :, one_more], v_new], dim=2), wider)
        assert (stale - got).abs().max() > 1e-3 * got.abs().max()
