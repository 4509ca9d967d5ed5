"""Initialisation from Open-Sora v1 / PixArt-alpha checkpoints: synthetic state dicts with the published key names
and shapes (at a small width and depth, random values) must land exactly where they belong."""

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import causalvdm
from causalvdm.cli import convert_checkpoint
from causalvdm.models.pretrained import build_model_from_config, load_pretrained
from causalvdm.registry import ConfigError
from causalvdm.utils.weights import CheckpointError, load_weights
from conftest import ROOT

TINY = ROOT / "configs" / "debug" / "tiny.py"


def published_shapes(hidden=32, depth=2, in_ch=4, text=16, tokens=6, mlp=64, patch=(2, 2), out_ch=8,
                     temporal=True, conv2d=False, frames=16, grid=16):
    """Key -> shape of an Open-Sora v1 STDiT (temporal=True) or a PixArt-alpha model (temporal=False, conv2d=True).

    From hpcaitech/Open-Sora opensora/models/stdit/stdit.py + layers/blocks.py (v1) and PixArt-alpha
    diffusion/model/nets/PixArt.py + PixArt_blocks.py. XL/2: hidden 1152, depth 28, text 4096 x 120 tokens,
    mlp 4608, out 8 (learned sigma) -> final_layer.linear (32, 1152).
    """
    d, (ph, pw) = hidden, patch
    shapes = {
        "pos_embed": (1, grid, d),  # fixed 2D sin-cos buffer, saved in both checkpoints
        "x_embedder.proj.weight": (d, in_ch, ph, pw) if conv2d else (d, in_ch, 1, ph, pw),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "t_block.1.weight": (6 * d, d), "t_block.1.bias": (6 * d,),
        "y_embedder.y_embedding": (tokens, text),  # a buffer in both, so it is in the state dict
        "y_embedder.y_proj.fc1.weight": (d, text), "y_embedder.y_proj.fc1.bias": (d,),
        "y_embedder.y_proj.fc2.weight": (d, d), "y_embedder.y_proj.fc2.bias": (d,),
        "final_layer.linear.weight": (ph * pw * out_ch, d), "final_layer.linear.bias": (ph * pw * out_ch,),
        "final_layer.scale_shift_table": (2, d),
    }
    if temporal:
        shapes["pos_embed_temporal"] = (1, frames, d)
    attn = ["attn"] + (["attn_temp"] if temporal else [])
    for i in range(depth):
        b = f"blocks.{i}."
        shapes[b + "scale_shift_table"] = (6, d)
        for name in attn:
            shapes.update({f"{b}{name}.qkv.weight": (3 * d, d), f"{b}{name}.qkv.bias": (3 * d,),
                           f"{b}{name}.proj.weight": (d, d), f"{b}{name}.proj.bias": (d,)})
        shapes.update({
            b + "cross_attn.q_linear.weight": (d, d), b + "cross_attn.q_linear.bias": (d,),
            b + "cross_attn.kv_linear.weight": (2 * d, d), b + "cross_attn.kv_linear.bias": (2 * d,),
            b + "cross_attn.proj.weight": (d, d), b + "cross_attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (mlp, d), b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (d, mlp), b + "mlp.fc2.bias": (d,),
        })
    return shapes


def random_state(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def tiny_model(tiny_cfg, **overrides):
    return causalvdm.build_model(dict(tiny_cfg.model, **overrides))


def test_published_xl2_layouts_match_our_xl2():
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in causalvdm.build_model(dict(type="CausalSTDiT-XL/2")).state_dict().items()}
    xl = dict(hidden=1152, depth=28, text=4096, tokens=120, mlp=4608, grid=256)
    opensora = published_shapes(**xl)
    assert {k: v for k, v in opensora.items() if not k.startswith("pos_embed")} == ours
    pixart = published_shapes(**xl, temporal=False, conv2d=True)
    assert set(ours) - set(pixart) == {k for k in ours if ".attn_temp." in k}
    assert pixart["x_embedder.proj.weight"] == (1152, 4, 2, 2) and ours["x_embedder.proj.weight"] == (1152, 4, 1, 2, 2)


@pytest.mark.parametrize("fmt", ["safetensors", "state_dict", "ema+module"])
def test_opensora_checkpoint_loads_exactly(tiny_cfg, tmp_path, fmt, caplog):
    src = random_state(published_shapes())
    if fmt == "safetensors":
        path = tmp_path / "ckpt.safetensors"
        save_file(src, path)
    else:
        path = tmp_path / "ckpt.pth"
        wrapped = {"state_dict": src} if fmt == "state_dict" else \
            {"ema": {"module." + k: v for k, v in src.items()}, "model": {}, "step": 7}
        torch.save(wrapped, path)
    model = tiny_model(tiny_cfg)
    with caplog.at_level(logging.INFO, logger="causalvdm.models.pretrained"):
        summary = load_pretrained(model, path)
    state = model.state_dict()
    assert summary["source"] == "opensora"
    assert sorted(summary["dropped"]) == ["pos_embed", "pos_embed_temporal"]
    assert summary["missing"] == summary["unexpected"] == summary["reshaped"] == summary["skipped"] == []
    assert sorted(summary["loaded"]) == sorted(state) and len(state) == len(src) - 2
    for key in state:
        assert torch.equal(state[key], src[key]), key
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0] and f"{len(state)} loaded" in lines[0]


@pytest.mark.numerics
def test_pixart_checkpoint(tiny_cfg, tmp_path):
    # PixArt-alpha without learned sigma (4 outputs per patch position), a 2D patch embedding, 120 null tokens.
    src = random_state(published_shapes(temporal=False, conv2d=True, out_ch=4, tokens=120), seed=1)
    path = tmp_path / "PixArt-XL-2-256x256.pth"
    torch.save({"state_dict": src}, path)
    fresh = tiny_model(tiny_cfg)
    model = tiny_model(tiny_cfg)
    model.load_state_dict(fresh.state_dict())
    summary = load_pretrained(model, path, source="pixart")
    state = model.state_dict()

    reshaped = ["x_embedder.proj.weight", "y_embedder.y_embedding", "final_layer.linear.weight", "final_layer.linear.bias"]
    assert sorted(summary["reshaped"]) == sorted(reshaped)
    assert summary["missing"] == [k for k in state if ".attn_temp." in k] and len(summary["missing"]) == 8
    assert summary["unexpected"] == summary["skipped"] == [] and summary["dropped"] == ["pos_embed"]
    for key in summary["loaded"]:
        assert torch.equal(state[key], src[key]), key
    assert torch.equal(state["x_embedder.proj.weight"][:, :, 0], src["x_embedder.proj.weight"])
    assert torch.equal(state["y_embedder.y_embedding"], src["y_embedder.y_embedding"][:6])
    # Output rows ((ph_i * pw + pw_i) * 8 + c): the 4 eps channels per patch position come from the checkpoint,
    # the 4 variance channels stay zero.
    for name in ("weight", "bias"):
        ours = state[f"final_layer.linear.{name}"].view(4, 8, -1)
        theirs = src[f"final_layer.linear.{name}"].view(4, 4, -1)
        assert torch.equal(ours[:, :4], theirs) and ours[:, 4:].abs().max() == 0
    # Temporal attention keeps its init: zero output projection, so the video model is the image model per frame.
    for key in summary["missing"]:
        assert torch.equal(state[key], fresh.state_dict()[key]), key
    assert all(state[k].abs().max() == 0 for k in summary["missing"] if ".proj." in k)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, 4, 4, generator=gen)
    t = torch.randint(0, 1000, (1, 3), generator=gen)
    y = torch.randn(1, 6, 16, generator=gen)
    with torch.no_grad():
        video = model(x, t, y)
        assert video.abs().max() > 1e-3
        for i in range(3):
            alone = model(x[:, :, i:i + 1], t[:, i:i + 1], y)[:, :, 0]
            assert (video[:, :, i] - alone).abs().max() <= 1e-5 * video.abs().max()  # large random weights: relative


def test_adaptations_and_mismatches(tiny_cfg, tmp_path):
    # A 3-block Open-Sora checkpoint with 4 null tokens and an extra PixArt-MS embedder, into a model with
    # 12 input channels, 8-wide text, 8 tokens and no learned sigma.
    shapes = published_shapes(depth=3, tokens=4)
    shapes["csize_embedder.mlp.0.weight"] = (32, 256)
    src = random_state(shapes, seed=2)
    path = tmp_path / "ckpt.safetensors"
    save_file(src, path)
    model = tiny_model(tiny_cfg, in_channels=12, caption_channels=8, learn_sigma=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="20 tensors have no place in this model"):
        load_pretrained(model, path, source="opensora")  # strict by default: nothing is loaded
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    summary = load_pretrained(model, path, source="opensora", strict=False)
    state = model.state_dict()
    skipped = {s.split()[0] for s in summary["skipped"]}
    assert skipped == {"x_embedder.proj.weight", "final_layer.linear.weight", "final_layer.linear.bias",
                       "y_embedder.y_proj.fc1.weight", "y_embedder.y_embedding"}
    assert "x_embedder.proj.weight (32, 4, 1, 2, 2)->(32, 12, 1, 2, 2)" in summary["skipped"]
    assert sorted(summary["unexpected"]) == sorted([k for k in src if k.startswith("blocks.2.")]
                                                    + ["csize_embedder.mlp.0.weight"])
    assert summary["missing"] == [] and summary["reshaped"] == []
    for key in skipped:
        assert torch.equal(state[key], before[key]), key
    for key in summary["loaded"]:
        assert torch.equal(state[key], src[key]), key

    # learned sigma in the checkpoint, none in the model: the first C channels of every patch position.
    model = tiny_model(tiny_cfg, learn_sigma=False, model_max_length=8)
    summary = load_pretrained(model, path, strict=False)
    assert sorted(summary["reshaped"]) == ["final_layer.linear.bias", "final_layer.linear.weight",
                                           "y_embedder.y_embedding"]
    head = model.state_dict()["final_layer.linear.weight"].view(4, 4, -1)
    assert torch.equal(head, src["final_layer.linear.weight"].view(4, 8, -1)[:, :4])
    null = model.state_dict()["y_embedder.y_embedding"]  # 4 tokens extended to 8 by repeating the last one
    assert torch.equal(null[:4], src["y_embedder.y_embedding"])
    assert torch.equal(null[4:], src["y_embedder.y_embedding"][-1:].expand(4, -1))


def reference_checkpoint(seed=5):
    """Open-Sora v1 keys plus what only the Ca2-VDM reference model has: a cross-frame attention and a linear
    before the temporal merge per block, and a <BOV> token (causal_stdit2.py)."""
    shapes = published_shapes()
    for i in range(2):
        shapes.update({f"blocks.{i}.attn_cf.q_linear.weight": (32, 32),
                       f"blocks.{i}.attn_cf.kv_linear.weight": (64, 32),
                       f"blocks.{i}.attn_temp_pre_merge.weight": (32, 32)})
    shapes["bov_token"] = (4, 4, 4)
    return random_state(shapes, seed)


def test_foreign_modules_fail_unless_not_strict(tiny_cfg, tmp_path, capsys):
    src = reference_checkpoint()
    path = tmp_path / "ca2vdm.safetensors"
    save_file(src, path)
    model = tiny_model(tiny_cfg)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(model, path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "7 tensors have no place in this model" in message
    assert "(blocks.0.attn_cf.kv_linear.weight, blocks.0.attn_cf.q_linear.weight, " \
           "blocks.0.attn_temp_pre_merge.weight, +4)" in message and "strict=False" in message  # safetensors: sorted

    summary = load_pretrained(model, path, strict=False)
    foreign = [k for k in src if "attn_cf" in k or "pre_merge" in k] + ["bov_token"]
    assert sorted(summary["unexpected"]) == sorted(foreign)
    assert sorted(summary["dropped"]) == ["pos_embed", "pos_embed_temporal"]  # dropped silently, strict or not
    assert torch.equal(model.blocks[1].attn_temp.qkv.weight, src["blocks.1.attn_temp.qkv.weight"])

    cfg = dict(tiny_cfg.model, from_pretrained=str(path))
    with pytest.raises(CheckpointError, match="7 tensors have no place"):
        build_model_from_config(cfg)
    model = build_model_from_config(dict(cfg, from_pretrained_strict=False))
    assert torch.equal(model.blocks[0].mlp.fc1.weight, src["blocks.0.mlp.fc1.weight"])
    with pytest.raises(ConfigError, match=r"^model\.from_pretrained_strict must be True or False, got 'no'$"):
        build_model_from_config(dict(cfg, from_pretrained_strict="no"))

    out = tmp_path / "init.safetensors"
    argv = ["--src", str(path), "--config", str(TINY), "--out", str(out)]
    with pytest.raises(SystemExit, match="^error: .*7 tensors have no place in this model .*--no-strict\\)$"):
        convert_checkpoint.main(argv)
    assert not out.exists()
    assert convert_checkpoint.main(argv + ["--no-strict"]) == 0
    assert "7 unexpected, 2 dropped" in capsys.readouterr().out
    assert torch.equal(load_file(out)["blocks.0.attn.qkv.weight"], src["blocks.0.attn.qkv.weight"])


def test_fixed_null_caption_loads_under_the_same_key(tiny_cfg, tmp_path):
    src = random_state(published_shapes(), seed=6)
    path = tmp_path / "ckpt.safetensors"
    save_file(src, path)
    model = build_model_from_config(dict(tiny_cfg.model, null_caption="fixed", from_pretrained=str(path)))
    null = model.y_embedder.y_embedding
    assert torch.equal(null, src["y_embedder.y_embedding"]) and not null.requires_grad
    assert sorted(model.state_dict()) == sorted(k for k in src if not k.startswith("pos_embed"))


class Foreign:
    """A Python object that is not a checkpoint."""


def test_bad_checkpoints_fail_in_one_line(tiny_cfg, tmp_path):
    src = random_state(published_shapes())
    good_pth, good_st = tmp_path / "good.pth", tmp_path / "good.safetensors"
    torch.save(src, good_pth)
    save_file(src, good_st)
    cases = {}
    for good in (good_pth, good_st):
        cut = tmp_path / f"truncated{good.suffix}"
        cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        cases[cut] = "not a readable checkpoint"
    torch.save(Foreign(), tmp_path / "object.pth")
    cases[tmp_path / "object.pth"] = "not a readable checkpoint"
    (tmp_path / "random.pth").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    cases[tmp_path / "random.pth"] = "not a readable checkpoint"
    torch.save({"epoch": 3, "config": "x"}, tmp_path / "nothing.pth")
    cases[tmp_path / "nothing.pth"] = "no state dict of tensors found"
    cases[tmp_path / "absent.pth"] = "checkpoint not found"
    model = tiny_model(tiny_cfg)
    for path, reason in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_pretrained(model, path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and reason in message, message
    with pytest.raises(CheckpointError, match="source='pixart' but the checkpoint has temporal blocks"):
        load_pretrained(model, good_st, source="pixart")


def test_weights_are_read_as_what_their_bytes_say(tmp_path):
    """A safetensors file named .pt and a torch file named .safetensors load the same tensors."""
    state = {"w": torch.arange(6.0).view(2, 3)}
    save_file(state, tmp_path / "weights.pt")
    torch.save(state, tmp_path / "weights.safetensors")
    for name in ("weights.pt", "weights.safetensors"):
        assert torch.equal(load_weights(tmp_path / name)["w"], state["w"])


def test_build_model_from_config(tiny_cfg, tmp_path):
    src = random_state(published_shapes(), seed=3)
    path = tmp_path / "ckpt.safetensors"
    save_file(src, path)
    model = build_model_from_config(dict(tiny_cfg.model, from_pretrained=str(path)))
    assert torch.equal(model.blocks[1].attn_temp.qkv.weight, src["blocks.1.attn_temp.qkv.weight"])
    plain = build_model_from_config(dict(tiny_cfg.model, from_pretrained=None))
    assert plain.final_layer.linear.weight.abs().max() == 0
    with pytest.raises(ConfigError, match=r"^model\.from_pretrained: .*nowhere\.pth: checkpoint not found$"):
        build_model_from_config(dict(tiny_cfg.model, from_pretrained=str(tmp_path / "nowhere.pth")))


def test_convert_tool_round_trip(tiny_cfg, tmp_path, capsys):
    src = random_state(published_shapes(temporal=False, conv2d=True), seed=4)
    torch.save({"state_dict": src}, tmp_path / "pixart.pth")
    out = tmp_path / "out" / "init.safetensors"
    argv = ["--src", str(tmp_path / "pixart.pth"), "--config", str(TINY), "--out", str(out)]
    assert convert_checkpoint.main(argv) == 0
    assert "(pixart)" in capsys.readouterr().out
    model = tiny_model(tiny_cfg)
    model.load_state_dict(load_file(out), strict=True)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, src["blocks.0.mlp.fc1.weight"])
    assert torch.equal(model.x_embedder.proj.weight[:, :, 0], src["x_embedder.proj.weight"])
    with pytest.raises(SystemExit, match="^error: .*missing.pth: checkpoint not found$"):
        convert_checkpoint.main(["--src", str(tmp_path / "missing.pth"), "--config", str(TINY), "--out", str(out)])
