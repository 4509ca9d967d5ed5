"""The 8-bit KV cache: what a stored value may lose, what attention over it may lose (a bound derived below and
checked with the cache's own calls), its bytes, and saving and loading it bit for bit.

Attention bound. A call's queries q attend to cached keys k_j and values v_j stored as k'_j = k_j + dk_j and
v'_j = v_j + dv_j. Its logits move by d_j = q . dk_j / sqrt(Dh), |d_j| <= e, so every softmax weight changes by a
factor within [exp(-2e), exp(2e)] and |p'_j - p_j| <= (exp(2e) - 1) p_j. The output sum_j p'_j v'_j then differs from
sum_j p_j v_j by at most max|dv| + (exp(2e) - 1) max|v'|. The test computes e and the two maxima from the stored
values (dk, dv are known exactly) and checks the attention over the cache's buffers against it, with float32
rounding (4 ulps of the largest value) on top.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from causalvdm.models.kv_cache import KVCache
from causalvdm.models.kv_quant import CACHE_DTYPES, dequantize, quantize

pytestmark = pytest.mark.numerics


@pytest.mark.parametrize("name", list(CACHE_DTYPES))
def test_stored_values_keep_their_bound(name):
    """int8: within s/2 of each value; float8 e4m3: within 2^-4 of its magnitude plus s 2^-10 (subnormals); nothing
    clips (the scale is rounded up to bf16); a zero vector stores zeros."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen) * torch.rand(512, 1, generator=gen).pow(4) * 30
    x[:3] = 0
    q, scale = quantize(x, name)
    back = dequantize(q, scale, torch.float32)
    s = scale.float()
    bound = s / 2 if name == "int8" else x.abs() * 2**-4 + s * 2**-10
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    assert (s * CACHE_DTYPES[name][1] >= x.abs().amax(-1, keepdim=True)).all()
    assert not back[:3].any()


def _filled_cache(cache_dtype, frames, gen):
    """A cache of 1 layer, 2 rows x 3 tokens, 2 heads of 16, whose queue holds `frames` committed frames."""
    cache = KVCache(num_layers=1, batch_size=2, max_cond_frames=4, chunk_size=2, cache_dtype=cache_dtype)
    cache.allocate(3, 2, 16, torch.float32, "cpu")
    written = []
    for _ in range(frames):
        cache.begin(1)
        k, v = (torch.randn(6, 2, 1, 16, generator=gen) * 3 for _ in range(2))
        cache.stage(0, k, v)
        cache.commit()
        written.append((k, v))
    return cache, written


@pytest.mark.parametrize("name", list(CACHE_DTYPES))
def test_attention_over_8bit_cache_within_derived_bound(name):
    """The cache's attention (after eviction: 6 frames written, 4 kept) with 8-bit storage against the same frames
    kept exactly: within the bound of the module docstring; the call's own frames are not quantized."""
    exact, _ = _filled_cache(None, 6, torch.Generator().manual_seed(1))
    stored, _ = _filled_cache(name, 6, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(6, 2, 2, 16, generator=gen) * 3 for _ in range(3))
    outputs, keys = [], []
    for cache in (exact, stored):
        cache.begin(2)
        mask = cache.attn_mask(False, "cpu")
        cache_k, cache_v = cache.attend(0, k, v)
        outputs.append(F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask))
        keys.append((cache_k, cache_v, mask))
    (k0, v0, mask), (k1, v1, _) = keys
    seen = mask.any(0)
    dk, dv = (k1 - k0)[:, :, seen], (v1 - v0)[:, :, seen]
    assert dk.abs().max() > 0  # the cached frames were stored in 8 bits
    slots = exact.slots_of(exact.call_positions)
    assert torch.equal(k1[:, :, slots], k) and torch.equal(v1[:, :, slots], v)  # the call's own, exact
    eps = (q @ dk.transpose(-1, -2)).abs().max() / math.sqrt(16)
    bound = dv.abs().max() + (math.exp(2 * eps) - 1) * v1[:, :, seen].abs().max()
    error = (outputs[1] - outputs[0]).abs().max()
    assert error <= bound + 4 * torch.finfo(torch.float32).eps * outputs[0].abs().max()
    assert error > 0


def test_8bit_cache_bytes_and_state_round_trip():
    """At the demo's head size (64) an int8 cache takes at most 0.53x of a bf16 one, scales included; a saved 8-bit
    state loads back bit for bit, and into a float cache as its dequantized values."""
    caches = {}
    for cache_dtype in (None, "int8", "float8_e4m3fn"):
        cache = KVCache(num_layers=2, batch_size=1, max_cond_frames=5, chunk_size=3, cache_dtype=cache_dtype)
        cache.allocate(4, 2, 64, torch.bfloat16, "cpu")
        caches[cache_dtype] = cache
    for name in CACHE_DTYPES:
        assert caches[name].nbytes <= 0.53 * caches[None].nbytes
    gen = torch.Generator().manual_seed(3)
    stored, _ = _filled_cache("int8", 6, gen)
    state = stored.state_dict()
    again, _ = _filled_cache("int8", 0, gen)
    again.load_state_dict(state)
    for name in ("k", "v", "k_scale", "v_scale"):
        assert torch.equal(again.state_dict()[name], state[name])
    plain, _ = _filled_cache(None, 0, gen)
    plain.load_state_dict(state)
    assert torch.equal(plain.state_dict()["k"], dequantize(state["k"], state["k_scale"], torch.float32))
