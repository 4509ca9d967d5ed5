import pytest
import torch

from causalvdm.models import KVCache
from causalvdm.models.reference_cache import ReferenceKVCache
from causalvdm.models.cache_check import verify


def _text(model, batch, gen):
    """A CFG batch of text: conditional rows with a padding mask, then the null caption."""
    half = batch // 2
    y_null, m_null = model.null_text(batch - half)
    y = torch.cat([torch.randn(half, *y_null.shape[1:], generator=gen), y_null])
    mask = torch.cat([torch.arange(y.shape[1]).expand(half, -1) < 4, m_null])
    return y, mask


def _fill(cache, layer_values):
    """Write frames whose keys equal their absolute position, one call per list entry."""
    for n in layer_values:
        positions = cache.begin(n)
        k = positions.float().view(1, 1, n, 1).expand(1, 1, n, 2).contiguous()
        for layer in range(cache.num_layers):
            cache.attend(layer, k, k)
        cache.commit()


def test_capacity_and_eviction_order():
    cache = KVCache(num_layers=2, batch_size=1, max_cond_frames=5, chunk_size=3)
    assert len(cache) == 0 and cache.nbytes == 0
    _fill(cache, [1, 3])
    assert len(cache) == 4 and cache.positions.tolist() == [0, 1, 2, 3]
    _fill(cache, [3])  # 7 frames written, the 2 oldest evicted
    assert len(cache) == 5 and cache.positions.tolist() == [2, 3, 4, 5, 6]
    # frame p lives in slot p % 8 (5 queued + 3 for a call); nothing moved
    assert cache.slot_pos.tolist() == [0, 1, 2, 3, 4, 5, 6, -1]
    assert cache.k[0][0, 0, :7, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert cache.state_dict()["k"][0, 0, 0, :, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]  # the queue, oldest first
    # the next call's frames 7, 8, 9 take slots 7, 0, 1: those of frames out of the queue, hidden from it
    cache.begin(3)
    assert cache.attn_mask(bidirectional=False, device="cpu").tolist() == [
        [False, False, True, True, True, True, True, True],
        [True, False, True, True, True, True, True, True],
        [True, True, True, True, True, True, True, True],
    ]
    nbytes = cache.nbytes
    assert nbytes == 2 * 2 * 1 * 1 * (5 + 3) * 2 * 4
    _fill(cache, [3, 3, 3])
    assert cache.nbytes == nbytes  # preallocated: never grows
    assert cache.state_dict()["k"][0, 0, 0, :, 0].tolist() == [11.0, 12.0, 13.0, 14.0, 15.0]
    with pytest.raises(ValueError, match="chunk_size=3"):
        cache.begin(4)
    cache.reset()
    assert len(cache) == 0 and cache.next_position == 0


def test_mask_sees_filled_slots_and_causal_chunk():
    cache = KVCache(num_layers=1, batch_size=1, max_cond_frames=4, chunk_size=2)
    _fill(cache, [2])
    cache.begin(2)
    mask = cache.attn_mask(bidirectional=False, device="cpu")
    # frames 0, 1 queued in slots 0, 1; this call's frames 2, 3 in slots 2, 3; slots 4, 5 never written; slots 6, 7
    # pad the 4 + 2 slots to a multiple of 8 and are never seen
    assert mask.tolist() == [[True, True, True, False, False, False, False, False],
                             [True, True, True, True, False, False, False, False]]
    assert cache.attn_mask(bidirectional=True, device="cpu")[0].tolist() == [True] * 4 + [False] * 4
    assert cache.k[0].shape == (1, 1, 8, 2) and cache.slot_pos.shape == (6,)


@pytest.mark.numerics
@pytest.mark.parametrize("tpe_mode", ["absolute", "cyclic", "rope"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("spatial_prefix", [None, "first_frame", "prev_frames_3"])
def test_cached_chunks_match_reference(make_model, tpe_mode, bidirectional, spatial_prefix):
    """Recompute baseline before eviction, naive keep-everything cache after, with text and a CFG batch; with a
    spatial prefix the naive cache keeps every frame's spatial keys/values and picks frame 0 or the last N."""
    model = make_model(tpe_mode=tpe_mode, chunk_bidirectional=bidirectional, spatial_prefix=spatial_prefix)
    steps = 3 if tpe_mode == "absolute" else 6  # absolute TPE: within its 33 frames
    results = verify(model, ar_steps=steps, chunk=8, max_cond=17, latent_size=(4, 4), first_frames=1,
                     denoise_calls=2, batch_size=2)
    assert [r["reference"] for r in results][:3] == ["recompute", "recompute", "recompute"]
    if tpe_mode != "absolute":
        assert "naive" in {r["reference"] for r in results}
    assert max(r["max_abs_diff"] for r in results) <= 1e-4


@pytest.mark.numerics
@pytest.mark.parametrize("tpe_mode", ["cyclic", "rope"])
def test_frame_sink_matches_reference_across_wraps(make_model, tpe_mode):
    """A sink of 2 frames beside a queue of 9 (ring of 13 slots), a 17-row cyclic table (15 rolling rows): 12 chunks
    wrap the ring and the rolling rows three times; recompute before eviction, the naive cache (first frames kept,
    RoPE sink turned at attention time) after it, all weights random, text and a guidance batch."""
    model = make_model(tpe_mode=tpe_mode, max_tpe_len=17)
    results = verify(model, ar_steps=12, chunk=4, max_cond=9, latent_size=(4, 4), denoise_calls=2, sink_frames=2)
    assert [r["reference"] for r in results].count("naive") == 9  # 1 + 3 * 4 = 13 > 2 + 9: from the 4th chunk
    assert max(r["max_abs_diff"] for r in results) <= 1e-4


def test_frame_sink_slots_and_state(make_model):
    """The sink's slots come before the ring, the mask shows them for ever; state_dict / load_state_dict and
    clone carry the sink (RoPE: as written, not as turned) and continue exactly."""
    model = make_model(tpe_mode="rope")
    cache = model.new_cache(2, 3, chunk_size=2, sink_frames=2)
    gen = torch.Generator().manual_seed(0)
    model.write_cache(torch.randn(2, 4, 1, 4, 4, generator=gen), cache)
    _generate_k(model, cache, 4, gen, k=2)  # 9 frames written: sink 0, 1; queue 6, 7, 8
    assert cache.positions.tolist() == [0, 1, 6, 7, 8] and len(cache) == 5
    assert cache.slot_pos[:2].tolist() == [0, 1]
    cache.begin(2)
    mask = cache.attn_mask(False, "cpu")
    assert mask[0, :2].all() and mask[0].sum() == 5 + 1
    restored = model.new_cache(2, 3, chunk_size=2, sink_frames=2)
    restored.load_state_dict(cache.state_dict())
    branch = cache.clone()
    outs = [_generate_k(model, c, 3, torch.Generator().manual_seed(5), k=2) for c in (cache, restored, branch)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    with pytest.raises(ValueError, match="sink_frames"):
        model.new_cache(2, 3, chunk_size=2).load_state_dict(cache.state_dict())


@torch.inference_mode()
def test_cpu_state_follows_the_model_to_its_device(make_model):
    """A state saved on the CPU (RoPE sink, spatial prefix) loaded into the cache of a model on another device: the
    next call moves every tensor the cache's calls use there (buffers, the sink's keys as written, slot indices).
    The meta device fails, as CUDA would, on an op that mixes it with a CPU tensor."""
    model = make_model(tpe_mode="rope", spatial_prefix="prev_frames_2")
    cache = model.new_cache(2, 3, chunk_size=2, sink_frames=2)
    gen = torch.Generator().manual_seed(0)
    model.write_cache(torch.randn(2, 4, 1, 4, 4, generator=gen), cache)
    _generate_k(model, cache, 4, gen, k=2)  # the queue has rolled: the sink's keys are turned at the next call
    model.to("meta")
    restored = model.new_cache(2, 3, chunk_size=2, sink_frames=2)
    restored.load_state_dict(cache.state_dict())
    model.begin_call(restored, 2, 4, 4)
    ctx = model.prepare(2, 4, 4, restored, model.encode_text(None, None, 2))
    out = model.step(torch.randn(2, 4, 2, 4, 4, device="meta"), torch.full((2, 2), 500, device="meta"), ctx)
    model.write_cache(out[:, :4], restored)
    held = [*restored.k, *restored.v, *restored.spatial.k, *restored.spatial.v, restored.sink_k, restored._slots,
            *restored.spatial._new[1:]]
    assert len(held) == 4 * len(model.blocks) + 4
    assert all(t.device.type == "meta" for t in held)
    assert restored.next_position == cache.next_position + 2


def _generate_k(model, cache, chunks, gen, k):
    outs = []
    for _ in range(chunks):
        out = model(torch.randn(2, model.in_channels, k, 4, 4, generator=gen), torch.full((2, k), 500), cache=cache)
        model.write_cache(out[:, : model.in_channels], cache)
        outs.append(out)
    return torch.cat(outs, dim=2)


def _generate(model, cache, chunks, y, mask, gen):
    outs = []
    for _ in range(chunks):
        x = torch.randn(2, model.in_channels, 4, 4, 4, generator=gen)
        t = torch.full((2, 4), 500)
        out = model(x, t, y, mask, cache=cache)
        model.write_cache(out[:, : model.in_channels], cache, y, mask)
        outs.append(out)
    return torch.cat(outs, dim=2)


def test_eviction_changes_output(make_model):
    """The queue bound is real: a chunk after eviction differs from one that sees every frame."""
    model = make_model()
    gen = torch.Generator().manual_seed(1)
    y, mask = _text(model, 2, gen)
    first = torch.randn(2, 4, 1, 4, 4, generator=gen)
    outs = []
    for capacity in (5, 64):
        cache = model.new_cache(2, capacity, chunk_size=4)
        model.write_cache(first, cache, y, mask)
        outs.append(_generate(model, cache, 4, y, mask, torch.Generator().manual_seed(2)))
    per_frame = (outs[0] - outs[1]).abs().amax(dim=(0, 1, 3, 4))
    assert per_frame[:4].max() <= 1e-5  # 1 + 0 frames cached: nothing evicted yet
    assert per_frame[-4:].min() > 1e-4


@torch.no_grad()
@pytest.mark.numerics
@pytest.mark.parametrize("spatial_prefix", [None, "prev_frames_2"])
def test_clone_and_state_dict_continue_exactly(make_model, spatial_prefix):
    model = make_model(spatial_prefix=spatial_prefix)
    gen = torch.Generator().manual_seed(0)
    y, mask = _text(model, 2, gen)
    cache = model.new_cache(2, 9, chunk_size=4)
    model.write_cache(torch.randn(2, 4, 1, 4, 4, generator=gen), cache, y, mask)
    _generate(model, cache, 3, y, mask, gen)  # 13 frames written: the queue has wrapped

    branch = cache.clone()
    restored = model.new_cache(2, 9, chunk_size=4)
    restored.load_state_dict(cache.state_dict())
    continued = [_generate(model, c, 3, y, mask, torch.Generator().manual_seed(7)) for c in (cache, branch, restored)]
    assert torch.equal(continued[0], continued[1])
    assert torch.equal(continued[0], continued[2])
    assert branch.next_position == cache.next_position == 25
    with pytest.raises(ValueError, match="capacity"):
        model.new_cache(2, 10).load_state_dict(cache.state_dict())


@torch.no_grad()
def test_forward_with_cache_leaves_it_unchanged(make_model):
    model = make_model()
    gen = torch.Generator().manual_seed(0)
    cache = model.new_cache(2, 6, chunk_size=4)
    model.write_cache(torch.randn(2, 4, 3, 4, 4, generator=gen), cache)
    before = cache.state_dict()
    first = model(torch.randn(2, 4, 4, 4, 4, generator=gen), torch.full((2, 4), 10), cache=cache)
    after = cache.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]) if torch.is_tensor(value) else value == after[key], key
    assert len(cache) == 3 and cache.next_position == 3
    assert first.abs().max() > 0


def test_reference_cache_attends_to_last_frames():
    ref = ReferenceKVCache(num_layers=1, max_cond_frames=3)
    for n in (2, 2, 2):
        positions = ref.begin(n)
        k = positions.float().view(1, 1, n, 1)
        keys, _ = ref.attend(0, k, k)
        ref.commit()
    assert keys[0, 0, :, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]  # last 3 cached + 2 new


@pytest.mark.numerics
def test_output_convolutions_keep_cached_chunks_exact(make_model):
    """The output refiner's and the head's convolutions work within each frame, so the cache stays exact: recompute
    before eviction, the naive cache after it, every weight (theirs too) random."""
    model = make_model(output_refine=8, head_kernel=3)
    assert model.refiner.conv2.weight.abs().sum() > 0 and model.final_layer.neighbours.weight.abs().sum() > 0
    results = verify(model, ar_steps=6, chunk=8, max_cond=17, latent_size=(4, 4), first_frames=1, denoise_calls=2,
                     batch_size=2)
    assert {r["reference"] for r in results} == {"recompute", "naive"}
    assert max(r["max_abs_diff"] for r in results) <= 1e-4


@pytest.mark.parametrize("cache_dtype", [None, "int8", "float8_e4m3fn"])
def test_take_copies_rows_in_order_and_put_writes_back_only_them(cache_dtype):
    # Four rows of 3 tokens, every buffer element distinct; rows 3 and 1 taken, changed, put back.
    pool = KVCache(num_layers=2, batch_size=4, max_cond_frames=2, chunk_size=1, cache_dtype=cache_dtype)
    pool.allocate(3, 2, 4, torch.float32, "cpu")
    for i, buffer in enumerate(pool.buffers):
        buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(i)).to(buffer.dtype))
    before = [buffer.clone() for buffer in pool.buffers]
    rows = torch.tensor([3, 1])
    taken = pool.take(rows)
    assert taken.batch_size == 2 and len(taken.buffers) == len(pool.buffers)
    for mine, theirs in zip(pool.buffers, taken.buffers):
        assert torch.equal(theirs.view(2, 3, *theirs.shape[1:]), mine.view(4, 3, *mine.shape[1:])[rows])
        theirs.copy_(torch.ones_like(theirs))
    pool.put(taken, rows)
    for mine, old in zip(pool.buffers, before):
        mine, old = mine.view(4, 3, *mine.shape[1:]), old.view(4, 3, *old.shape[1:])
        assert torch.equal(mine[rows], torch.ones_like(mine[rows])) and torch.equal(mine[[0, 2]], old[[0, 2]])
