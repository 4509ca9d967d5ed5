"""The SD VAE and T5 wrappers, with tiny random diffusers / transformers models saved to a temporary folder."""

import logging

import pytest
import torch

import causalvdm.text  # noqa: F401  (registers the text encoders)
from causalvdm.registry import TEXT_ENCODERS, VAES, ConfigError, build


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, sample_size=16)
    path = tmp_path_factory.mktemp("sd-vae")
    vae.save_pretrained(path)
    return path


def build_vae(path, **kwargs):
    return build(VAES, dict(type="SDVAE", from_pretrained=str(path), **kwargs), "vae")


def build_t5(path, **kwargs):
    return build(TEXT_ENCODERS, dict(type="T5Encoder", from_pretrained=str(path), **kwargs), "text_encoder")


@pytest.mark.numerics
def test_sdvae_framewise_and_micro_batches(vae_dir):
    vae = build_vae(vae_dir, micro_batch_size=3)
    assert vae.out_channels == 4 and vae.downsample == 2
    assert next(vae.parameters()).dtype == torch.float32 and not any(p.requires_grad for p in vae.parameters())
    x = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 4, 5, 8, 8)
    # Each frame on its own through diffusers is the reference (CPU convolutions round differently with the
    # batch size, a few 1e-6, hence the tolerance).
    frame = x[1, :, 3][None]
    ref = vae.vae.encode(frame).latent_dist.mode() * 0.18215
    assert torch.allclose(z[1, :, 3], ref[0], atol=1e-5)
    whole = build_vae(vae_dir, micro_batch_size=100)
    assert torch.allclose(whole.encode(x), z, atol=1e-5)
    out = vae.decode(z)
    assert out.shape == x.shape
    ref = vae.vae.decode(z[0, :, 4][None] / 0.18215).sample
    assert torch.allclose(out[0, :, 4], ref[0], atol=1e-5)
    assert torch.allclose(whole.decode(z), out, atol=1e-5)


def test_sdvae_posterior_sample(vae_dir):
    vae = build_vae(vae_dir, sample_posterior=True, scaling_factor=1.0)
    x = torch.zeros(1, 3, 2, 16, 16)
    a = vae.encode(x, generator=torch.Generator().manual_seed(1))
    b = vae.encode(x, generator=torch.Generator().manual_seed(1))
    mean = build_vae(vae_dir, scaling_factor=1.0).encode(x)
    assert torch.equal(a, b) and (a - mean).abs().max() > 1e-3


def test_t5_shapes_mask_and_reference(t5_dir):
    enc = build_t5(t5_dir, model_max_length=12)
    assert enc.output_dim == 16 and enc.model_max_length == 12
    prompts = ["hi", "a cat runs"]
    y, mask = enc.encode(prompts)
    assert y.shape == (2, 12, 16) and y.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [3, 11]  # bytes + EOS
    ids = torch.zeros(2, 12, dtype=torch.long)  # pad id 0
    for i, p in enumerate(prompts):
        ids[i, : len(p) + 1] = torch.tensor([b + 3 for b in p.encode()] + [1])  # EOS id 1
    with torch.no_grad():
        ref = enc.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert torch.equal(y, ref)


def test_t5_cache_runs_each_prompt_once(t5_dir):
    enc = build_t5(t5_dir, model_max_length=8, cache_size=2)
    calls = []
    enc.model.register_forward_hook(lambda module, args, output: calls.append(len(args[0]) if args else None))
    y_ab, m_ab = enc.encode(["a", "b", "a"])
    assert len(calls) == 1
    y_ba, m_ba = enc.encode(["b", "a"])
    assert len(calls) == 1, "cached prompts must not run the encoder"
    assert torch.equal(y_ba, y_ab[[1, 0]]) and torch.equal(m_ba, m_ab[[1, 0]])
    y_ba[0] += 1.0  # the caller owns its tensors: the cache must be unchanged
    assert torch.equal(enc.encode(["b"])[0][0], y_ab[1])
    enc.encode(["c"])  # cache_size 2: evicts 'a', the least recently used
    assert len(calls) == 2
    enc.encode(["b"])
    assert len(calls) == 2
    y_a, _ = enc.encode(["a"])
    assert len(calls) == 3 and torch.equal(y_a[0], y_ab[0])


def test_t5_truncation_warns_once(t5_dir, caplog):
    enc = build_t5(t5_dir, model_max_length=8, cache_size=0)
    with caplog.at_level(logging.WARNING, logger="causalvdm.text.t5"):
        y, mask = enc.encode(["0123456789", "short", "abcdefghijkl"])  # 11 and 13 tokens with EOS
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 prompt(s)" in warnings[0] and "8 token(s) cut" in warnings[0]
    assert y.shape == (3, 8, 16) and mask.sum(1).tolist() == [8, 6, 8]
    caplog.clear()
    enc.encode(["short"])
    assert not caplog.records


def test_null_text_encoder():
    enc = build(TEXT_ENCODERS, dict(type="NullTextEncoder"), "text_encoder")
    assert enc.output_dim == 0 and enc.encode(["anything"]) == (None, None)


@pytest.mark.parametrize("kind", ["vae", "text_encoder"])
def test_missing_directories_fail_in_one_line(tmp_path, kind):
    make = build_vae if kind == "vae" else build_t5
    for path, reason in ((tmp_path / "absent", "directory not found"), (tmp_path, "no config.json")):
        with pytest.raises(ConfigError) as info:
            make(path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and reason in message, message
        assert f"{kind}.from_pretrained" in message
