import pytest
import torch

import causalvdm
from causalvdm.config import load_config
from causalvdm.models.utils import count_parameters
from causalvdm.registry import ConfigError
from conftest import ROOT


def _inputs(model, batch=2, frames=6, size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, frames, size, size, generator=gen)
    t = torch.randint(0, 1000, (batch, frames), generator=gen)
    y = torch.randn(batch, model.model_max_length, model.caption_channels, generator=gen)
    return x, t, y


def test_tiny_shapes_and_zero_init(tiny_cfg):
    model = causalvdm.build_model(tiny_cfg.model)
    x, t, y = _inputs(model, frames=5)
    out = model(x, t, y)
    assert out.shape == (2, 8, 5, 4, 4)
    assert out.abs().max() == 0  # DiT-style zero init of the output head


def test_xl2_on_meta_device():
    cfg = load_config(ROOT / "configs" / "debug" / "tiny.py")
    with torch.device("meta"):
        model = causalvdm.build_model(dict(type="CausalSTDiT-XL/2", caption_channels=4096))
    n = count_parameters(model)
    print(f"CausalSTDiT-XL/2 parameters: {n / 1e6:.1f}M")
    assert len(model.blocks) == 28 and model.hidden_size == 1152 and model.num_heads == 16
    assert 650e6 < n < 800e6  # Open-Sora v1 STDiT-XL/2 has about 724M
    assert cfg.model.type == "CausalSTDiT"


@pytest.mark.parametrize("name, depth, width", [("B/2", 12, 768), ("S/2", 12, 384)])
def test_presets(name, depth, width):
    with torch.device("meta"):
        model = causalvdm.build_model(dict(type=f"CausalSTDiT-{name}", caption_channels=0))
    assert len(model.blocks) == depth and model.hidden_size == width


@pytest.mark.numerics
@pytest.mark.parametrize("tpe_mode", ["absolute", "cyclic", "rope"])
def test_causal_over_frames(make_model, tpe_mode):
    model = make_model(tpe_mode=tpe_mode)
    x, t, y = _inputs(model, frames=7)
    base = model(x, t, y)
    for j in (0, 3, 6):
        x2 = x.clone()
        x2[:, :, j] += 1.0
        out = model(x2, t, y)
        assert torch.equal(out[:, :, :j], base[:, :, :j]), f"frame {j} leaked into earlier frames"
        assert (out[:, :, j] - base[:, :, j]).abs().max() > 1e-3


@pytest.mark.numerics
def test_chunk_bidirectional(make_model):
    model = make_model(chunk_bidirectional=True)
    x, t, y = _inputs(model, frames=9)
    chunk = (3, 6)
    base = model(x, t, y, chunk=chunk)
    x2 = x.clone()
    x2[:, :, 5] += 1.0  # last frame of the chunk
    out = model(x2, t, y, chunk=chunk)
    diff = (out - base).abs().amax(dim=(0, 1, 3, 4))  # per frame
    assert torch.all(diff[:3] == 0), "the past must not see the chunk"
    assert torch.all(diff[3:] > 1e-4), "chunk frames see each other; later frames see the chunk"
    # Without the chunk span the same model is plain causal.
    out_causal = model(x2, t, y)
    assert torch.equal(out_causal[:, :, :5], model(x, t, y)[:, :, :5])


@pytest.mark.numerics
@pytest.mark.parametrize("spatial_prefix, context", [("first_frame", [0]), ("prev_frames_2", [3, 4])])
def test_spatial_prefix_reads_exactly_its_frames(make_model, spatial_prefix, context):
    """With the temporal attention silenced (its output projections zeroed), frames interact only through the
    spatial prefix: the chunk (frames 5-7) moves when a frame of `context` changes and no other; clean frames
    read no prefix."""
    model = make_model(spatial_prefix=spatial_prefix)
    with torch.no_grad():
        for block in model.blocks:
            block.attn_temp.proj.weight.zero_()
            block.attn_temp.proj.bias.zero_()
    x, t, y = _inputs(model, frames=8)
    t[:, :5] = 0
    base = model(x, t, y, chunk=(5, 8))
    for j in range(5):
        x2 = x.clone()
        x2[:, :, j] += 1.0
        moved = (model(x2, t, y, chunk=(5, 8)) - base).abs().amax(dim=(0, 1, 3, 4))  # per frame
        assert torch.all(moved[:5][torch.arange(5) != j] == 0)
        assert bool(moved[5:].min() > 1e-4) == (j in context) and bool(moved[5:].max() == 0) == (j not in context)
    with pytest.raises(ValueError, match="spatial_prefix must be None, 'first_frame' or 'prev_frames_N'"):
        make_model(spatial_prefix="prev_frames_0")


@pytest.mark.numerics
def test_spatial_prefix_trains(make_model):
    """Gradients reach the chunk through the spatial prefix under gradient checkpointing, as without it."""
    grads = []
    for ckpt in (False, True):
        model = make_model(spatial_prefix="prev_frames_2", grad_checkpointing=ckpt).train()
        x, t, y = _inputs(model, frames=6)
        x.requires_grad_(True)
        model(x, t, y, chunk=(3, 6))[:, :, 3:].square().mean().backward()
        grads.append(x.grad.clone())
    assert grads[0][:, :, 1:3].abs().amax() > 0  # the context frames 1, 2 are trained through the prefix
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.numerics
def test_per_frame_timesteps_matter(make_model):
    model = make_model()
    x, t, y = _inputs(model, frames=4)
    t2 = t.clone()
    t2[:, 2] = (t2[:, 2] + 500) % 1000
    diff = (model(x, t2, y) - model(x, t, y)).abs().amax(dim=(0, 1, 3, 4))
    assert torch.all(diff[:2] == 0) and torch.all(diff[2:] > 1e-4)


@pytest.mark.numerics
def test_text_padding_mask_and_unconditional(make_model):
    model = make_model()
    x, t, y = _inputs(model, frames=2)
    mask = torch.ones(2, model.model_max_length, dtype=torch.bool)
    mask[:, 3:] = False
    y2 = y.clone()
    y2[:, 3:] = 99.0  # padded tokens must not matter
    assert torch.allclose(model(x, t, y, mask), model(x, t, y2, mask), atol=1e-6)
    assert not torch.allclose(model(x, t, y, mask), model(x, t, y), atol=1e-4)
    uncond = make_model(caption_channels=0)
    assert uncond.y_embedder is None and uncond.blocks[0].cross_attn is None
    assert uncond(x, t).shape == (2, 8, 2, 4, 4)


@pytest.mark.numerics
def test_cfg_combines_halves(make_model):
    model = make_model()
    x, t, y = _inputs(model, frames=3)
    scale = 4.0
    guided = model.forward_with_cfg(x, t, y, None, scale)
    cond = model(x, t, y)
    uncond = model(x, t, None)  # missing text = the null caption
    c = model.in_channels
    assert torch.allclose(guided[:, :c], uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c]), atol=1e-5)
    assert torch.allclose(guided[:, c:], cond[:, c:], atol=1e-6)


@pytest.mark.numerics
def test_null_caption_modes(make_model):
    """'learned': a trained null caption attending to all its tokens; 'fixed' (PixArt / Open-Sora v1, the reference
    code): frozen, and in a guidance batch its rows keep the prompt's padding mask."""
    learned, fixed = make_model(), make_model(null_caption="fixed")
    assert learned.y_embedder.y_embedding.requires_grad and not fixed.y_embedder.y_embedding.requires_grad
    assert learned.state_dict().keys() == fixed.state_dict().keys()
    for (name, a), b in zip(learned.state_dict().items(), fixed.state_dict().values()):
        assert torch.equal(a, b), name  # same seeded weights: only the null rows' mask differs below
    x, t, y = _inputs(learned, frames=3)
    mask = torch.ones(2, learned.model_max_length, dtype=torch.bool)
    mask[1, 2:] = False
    null = learned.y_embedder.y_embedding[None].expand(2, -1, -1)
    scale, c = 3.0, learned.in_channels
    with torch.no_grad():
        for model, null_mask in ((learned, None), (fixed, mask)):
            guided = model.forward_with_cfg(x, t, y, mask, scale)
            cond, uncond = model(x, t, y, mask), model(x, t, null, null_mask)
            assert torch.allclose(guided[:, :c], uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c]), atol=1e-5)
        assert torch.equal(learned(x, t, y, mask), fixed(x, t, y, mask))
        assert torch.equal(learned(x, t, None), fixed(x, t, None))  # no prompt at all: every null token
        assert not torch.allclose(learned.forward_with_cfg(x, t, y, mask, scale),
                                  fixed.forward_with_cfg(x, t, y, mask, scale), atol=1e-4)
    with pytest.raises(ConfigError, match="null_caption must be one of learned, fixed, got 'zero'"):
        make_model(null_caption="zero")


@pytest.mark.numerics
def test_gradient_checkpointing_same_gradients(make_model):
    grads = []
    for ckpt in (False, True):
        model = make_model(grad_checkpointing=ckpt).train()
        x, t, y = _inputs(model, frames=4)
        model(x, t, y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 30
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6, rtol=1e-5), name


def test_registry_builds_from_config_file(tiny_cfg):
    model = causalvdm.build_model(tiny_cfg.model)
    assert type(model).__name__ == "CausalSTDiT" and model.hidden_size == tiny_cfg.model.hidden_size


def test_bad_config_keys_fail_in_one_line(tiny_cfg):
    bad_type = dict(tiny_cfg.model, type="NoSuchModel")
    with pytest.raises(ConfigError, match=r"^model\.type: unknown model type 'NoSuchModel' \(known: .*CausalSTDiT"):
        causalvdm.build_model(bad_type)
    bad_field = dict(tiny_cfg.model, hidden_sise=8)
    with pytest.raises(ConfigError, match=r"^model: unknown field\(s\) hidden_sise for CausalSTDiT$"):
        causalvdm.build_model(bad_field)
    with pytest.raises(ConfigError, match=r"^model: missing field 'type'$"):
        causalvdm.build_model(dict(depth=2))
    bad_value = dict(tiny_cfg.model, tpe_mode="spiral")
    with pytest.raises(ConfigError, match=r"tpe_mode must be one of absolute, cyclic, rope, got 'spiral'"):
        causalvdm.build_model(bad_value)


def test_config_overrides_and_missing_file(tmp_path):
    cfg = load_config(ROOT / "configs" / "debug" / "tiny.py", {"model.depth": 3})
    assert cfg.model.depth == 3
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.py")
    broken = tmp_path / "broken.py"
    broken.write_text("model = dict(\n")
    with pytest.raises(ConfigError, match=r"broken\.py: cannot parse config"):
        load_config(broken)


def test_output_refiner_is_a_residual_conv_per_frame(make_model):
    # Each output frame goes through the refiner on its own, after the tokens are laid back out as a grid.
    model = make_model(output_refine=8)
    x, t = torch.randn(2, 4, 5, 8, 8), torch.randint(0, 1000, (2, 5))
    out = model(x, t)
    refiner, model.refiner = model.refiner, None
    plain = model(x, t)
    model.refiner = refiner
    want = torch.stack([refiner(plain[:, :, i]) for i in range(5)], dim=2)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    fresh = causalvdm.build_model(dict(load_config(ROOT / "configs/debug/tiny.py").model, output_refine=8))
    assert fresh.refiner.conv2.weight.abs().max() == 0  # a fresh refiner passes the output through unchanged


def test_head_kernel_adds_each_tokens_neighbours(make_model):
    # Against a per-token sum: a token's output is its own linear head plus the k x k window of its neighbours'
    # normalised features (zero outside the grid).
    model = make_model(head_kernel=3)
    head = model.final_layer
    assert head.neighbours.weight.abs().min() > 0  # every tap random: a zero conv would make the check below empty
    tokens, t_emb = torch.randn(2, 3, 12, 32), torch.randn(2, 3, 32)  # (B, T, S, D) on a 3 x 4 grid
    out = head(tokens, t_emb, (3, 4))
    shift, scale = (head.scale_shift_table[None, None] + t_emb[:, :, None]).unbind(2)
    normed = torch.nn.functional.layer_norm(tokens, (32,), eps=1e-6) * (1 + scale[:, :, None]) + shift[:, :, None]
    grid = normed.view(2, 3, 3, 4, 32)
    want = head.linear(normed).view(2, 3, 3, 4, -1) + head.neighbours.bias
    for row in range(3):
        for col in range(4):
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if 0 <= row + dr < 3 and 0 <= col + dc < 4:
                        weight = head.neighbours.weight[:, :, dr + 1, dc + 1]  # (out, D)
                        want[:, :, row, col] += grid[:, :, row + dr, col + dc] @ weight.T
    torch.testing.assert_close(out, want.view(2, 3, 12, -1), rtol=1e-5, atol=1e-5)
    fresh = causalvdm.build_model(dict(load_config(ROOT / "configs/debug/tiny.py").model, head_kernel=3))
    assert fresh.final_layer.neighbours.weight.abs().max() == 0  # a fresh model still outputs exactly zero
    with pytest.raises(ValueError, match="head_kernel"):
        make_model(head_kernel=2)


def test_residual_stream_keeps_one_layout(make_model):
    """The tokens (B, T, S, D) leave the patch embedding and every block with D innermost. The embedding used to
    hand on a permuted view of its conv's (B, D, T, S) output, so each residual add mixed two layouts and ran as a
    strided element-wise kernel (those took 38% of an H200's time in the paper-size stream engine, most by count)."""
    model = make_model(tpe_mode="cyclic").train()
    x, t, y = _inputs(model)
    assert model.x_embedder(x).is_contiguous()
    layouts = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: layouts.append(out.is_contiguous()))
    model(x, t, y=y)
    assert layouts == [True] * len(model.blocks)
