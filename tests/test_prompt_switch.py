"""Prompt switching: the caption changes at a chunk boundary; the cached frames keep the old caption's keys/values or
are re-encoded under the new one (recache_on_switch)."""

import json
import logging

import pytest
import torch
from test_kv_cache import _fill
from test_sampling import _bounded, _inputs, sample_setup  # noqa: F401  (sample_setup is a fixture)

from causalvdm.autoencoders import PixelVAE
from causalvdm.config import AutoregressiveSettings
from causalvdm.models import KVCache
from causalvdm.pipeline import CausalVDMPipeline, SampleSettings
from causalvdm.registry import ConfigError
from causalvdm.sampling import AutoregressiveGenerator
from causalvdm.text.t5 import T5Encoder


def _caption(model, seed=2):
    """Another caption for the two rows of `_inputs` -> y (2, L, C_text), mask (2, L)."""
    _, y, mask = _inputs(model, seed=seed)
    return y, mask


@pytest.mark.parametrize("mode, sink_frames", [("cache", 0), ("cache", 2), ("recompute", 0)])
def test_a_switch_changes_only_the_frames_after_it(make_model, mode, sink_frames):
    """Guided, perturbed, after eviction (a queue of 5, switch at frame 13): frames before the switch are bit-identical
    to the video without it, and both the kept and the re-encoded cache change the rest, differently."""
    model, diffusion = _bounded(make_model)
    first, y, mask = _inputs(model)
    y2, mask2 = _caption(model)
    gen = AutoregressiveGenerator(model, diffusion, "ddim", 3, chunk_size=4, max_cond_frames=5, cfg_scale=3.0,
                                  prefix_perturb_t=20, mode=mode, sink_frames=sink_frames)
    plain = gen.generate(first, 21, y, mask, seed=1)
    videos = [gen.generate(first, 21, y, mask, seed=1, switches=[(13, y2, mask2)], recache_on_switch=recache)
              for recache in (False, True)]
    for video in videos:
        assert torch.equal(video[:, :, :13], plain[:, :, :13])
        assert (video[:, :, 13:] - plain[:, :, 13:]).abs().max() > 1e-2
    if mode == "cache":
        assert (videos[0][:, :, 13:] - videos[1][:, :, 13:]).abs().max() > 1e-2
    else:  # the window is run under the current caption at every step: always re-encoded
        assert torch.equal(videos[0], videos[1])


def test_seek_leaves_out_frames():
    """The re-encode's one new cache operation: the rolling frames written so far leave the queue, the sink stays, the
    next call is written at the position sought."""
    cache = KVCache(num_layers=1, batch_size=1, max_cond_frames=4, chunk_size=2, sink_frames=1)
    with pytest.raises(ValueError, match="only once the 1 sink frames are written"):
        cache.seek(3)
    _fill(cache, [2])  # frame 0 (the sink) and frame 1
    cache.seek(6)
    assert cache.slot_pos.tolist() == [0, -1, -1, -1, -1, -1, -1]  # frame 1 has left
    _fill(cache, [2, 2])  # frames 6-9 (keys equal to their positions)
    assert cache.positions.tolist() == [0, 6, 7, 8, 9]
    assert cache.state_dict()["k"][0, 0, 0, :, 0].tolist() == [0.0, 6.0, 7.0, 8.0, 9.0]
    with pytest.raises(ValueError, match="cannot seek from frame 10 to frame 9: only forward"):
        cache.seek(9)


def _same_state(state: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert torch.equal(state[key], value) if isinstance(value, torch.Tensor) else state[key] == value, key


@pytest.mark.parametrize("tpe_mode, sink_frames, spatial_prefix, cfg_scale", [
    ("cyclic", 0, None, 1.0), ("cyclic", 2, None, 3.0), ("rope", 0, None, 3.0), ("rope", 2, None, 1.0),
    ("cyclic", 0, "first_frame", 1.0), ("rope", 0, "prev_frames_2", 3.0)])
def test_recache_equals_a_cache_written_afresh(make_model, tpe_mode, sink_frames, spatial_prefix, cfg_scale):
    """After 4 chunks (1 given frame, chunks of 4, a queue of 5: frames 12-16 in view, and the sink 0-1), a re-encode
    holds what a fresh cache holds once those latents are written to it under the new caption, at their positions, in
    the calls that first wrote them: [0] [1] | [12] [13-16]. With 'first_frame', frame 0 is written too (its spatial
    keys are read for ever), then leaves the temporal queue."""
    model, diffusion = _bounded(make_model, tpe_mode=tpe_mode, spatial_prefix=spatial_prefix)
    first, y, mask = _inputs(model)
    y2, mask2 = _caption(model)
    gen = AutoregressiveGenerator(model, diffusion, "ddim", 2, chunk_size=4, max_cond_frames=5, cfg_scale=cfg_scale,
                                  sink_frames=sink_frames)
    gen.prefill(first, y, mask)
    video = [first]
    noise = torch.Generator().manual_seed(0)
    for _ in range(4):
        video.append(gen.denoise_chunk(torch.randn(2, 4, 4, 4, 4, generator=noise)))
        gen.commit(video[-1])
    video = torch.cat(video, dim=2)  # (2, 4, 17, 4, 4): what was written (no perturbation)
    kept = gen.cache.state_dict()
    gen.switch_prompt(y2, mask2, recache=True)

    guided = cfg_scale != 1
    text = model.guided_text(y2, mask2, per_block_kv=True) if guided else model.encode_text(y2, mask2, 2,
                                                                                            per_block_kv=True)
    fresh = model.new_cache(4 if guided else 2, 5, 4, sink_frames)

    def write(start, end):
        model.write_cache(torch.cat([video[:, :, start:end]] * (2 if guided else 1)), fresh, text=text)

    if sink_frames or spatial_prefix == "first_frame":
        write(0, 1)  # the given frame
    if sink_frames:
        write(1, 2)  # the rest of the sink, the start of chunk 0 (frames 1-4)
    fresh.seek(12)
    write(12, 13)  # the end of chunk 2 (frames 9-12)
    write(13, 17)  # chunk 3
    state = gen.cache.state_dict()
    _same_state(state, fresh.state_dict())
    assert state["next_position"] == 17 and len(gen.cache) == sink_frames + 5
    assert (state["v"] - kept["v"]).abs().max() > 1e-3  # the new caption reached the cached values


def test_recache_under_the_same_caption_before_eviction_changes_nothing(make_model):
    """Before eviction each frame in view sees what it saw when first written, so a re-encode under the same caption
    rewrites the cache bit for bit: the latents kept are the perturbed ones, as first written."""
    model, diffusion = _bounded(make_model)
    first, y, mask = _inputs(model, n0=3)
    gen = AutoregressiveGenerator(model, diffusion, "ddim", 2, chunk_size=4, max_cond_frames=12, cfg_scale=2.0,
                                  prefix_perturb_t=100)
    gen.prefill(first, y, mask, torch.Generator().manual_seed(0))
    for j in range(2):
        gen.commit(gen.denoise_chunk(torch.randn(2, 4, 4, 4, 4)), torch.Generator().manual_seed(j + 1))
    before = gen.cache.state_dict()
    gen.switch_prompt(y, mask, recache=True)
    _same_state(gen.cache.state_dict(), before)


@pytest.mark.numerics
@pytest.mark.parametrize("recache", [False, True])
def test_cache_matches_recompute_with_a_switch(make_model, recache):
    """Before eviction, recompute mode (the window run under the current caption at every step) is the re-encoding
    cache; a kept cache differs from it after the switch."""
    model, diffusion = _bounded(make_model)
    first, y, mask = _inputs(model)
    y2, mask2 = _caption(model)
    cache, recompute = (AutoregressiveGenerator(model, diffusion, "ddim", 3, 4, 9, cfg_scale=2.0, prefix_perturb_t=30,
                                                mode=mode)
                        .generate(first, 13, y, mask, seed=3, switches=[(5, y2, mask2)], recache_on_switch=recache)
                        for mode in ("cache", "recompute"))
    if recache:
        torch.testing.assert_close(cache, recompute, atol=1e-4, rtol=0)
    else:
        torch.testing.assert_close(cache[:, :, :5], recompute[:, :, :5], atol=1e-4, rtol=0)
        assert (cache[:, :, 5:] - recompute[:, :, 5:]).abs().max() > 1e-2


@pytest.mark.numerics
def test_a_first_caption_at_a_switch_turns_guidance_on(make_model):
    """A video without a caption that switches to one is guided from the start, its conditional rows holding the null
    caption until the switch: the frames before it are the unguided video's, up to rounding."""
    model, diffusion = _bounded(make_model)
    first, _, _ = _inputs(model)
    y2, mask2 = _caption(model)
    gen = AutoregressiveGenerator(model, diffusion, "ddim", 3, 4, 9, cfg_scale=3.0)
    plain = gen.generate(first, 13, seed=2)
    switched = gen.generate(first, 13, seed=2, switches=[(9, y2, mask2)])
    assert gen.cache.batch_size == 4  # the null-caption rows
    torch.testing.assert_close(switched[:, :, :9], plain[:, :, :9], atol=1e-5, rtol=0)
    assert (switched[:, :, 9:] - plain[:, :, 9:]).abs().max() > 1e-2
    gen.prefill(first)  # by hand: no caption, so no guidance rows
    with pytest.raises(ValueError, match="pass guided=True to prefill"):
        gen.switch_prompt(y2, mask2)


def test_bad_switches_fail_in_one_line(make_model, tmp_path):
    model, diffusion = _bounded(make_model)
    first, y, mask = _inputs(model)
    gen = AutoregressiveGenerator(model, diffusion, "ddim", 2, 4, 9)
    for frames, message in (
            ([6], r"^prompt switch at frame 6 is not a chunk boundary \(chunks of 4 from frame 1\): the nearest are 5 "
                  r"and 9$"),
            ([0], r"at frame 0 is not a chunk boundary .*: the nearest is 1$"),
            ([15], r"at frame 15 is not a chunk boundary .*: the nearest is 13$"),
            ([17], r"^prompt switch at frame 17 is beyond the video's 17 frames$"),
            ([5, 9, 5], r"^two prompt switches at frame 5$")):
        with pytest.raises(ValueError, match=message):
            gen.iter_chunks(first, 17, y, mask, switches=[(frame, y, mask) for frame in frames])

    # resuming: the caption is the schedule's at the resume point; a cache state holds no latents to re-encode
    switch = [(1, *_caption(model))]
    full = gen.generate(first, 17, y, mask, switches=switch)
    for _ in gen.iter_chunks(first, 17, y, mask, switches=switch):
        state = gen.cache.state_dict()  # after frames 1-4, under the second caption
        break
    rest = torch.cat(list(gen.iter_chunks(first, 17, y, mask, cache_state=state, switches=switch)), dim=2)
    torch.testing.assert_close(rest, full[:, :, 5:], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="recache_on_switch needs the latents of the frames in view"):
        gen.iter_chunks(first, 17, y, mask, cache_state=state, switches=[(9, y, mask)], recache_on_switch=True)

    for entries, message in (([{"frame": "5", "prompt": "x"}], r"^sample\.prompts\[0\]\.frame must be an integer"),
                             ([{"frame": 5}], r'^sample\.prompts\[0\] must be \{"frame": FRAME, "prompt": TEXT\}'),
                             ([{"frame": 5, "prompt": None}], r"^sample\.prompts\[0\]\.prompt must be a string"),
                             ("x", r"^sample\.prompts must be tuple\[dict, \.\.\.\]")):
        with pytest.raises(ConfigError, match=message):
            SampleSettings.from_cfg(dict(prompts=entries))


def test_pipeline_encodes_the_schedule(make_model, t5_dir):
    """pipe(prompts=[{frame, prompt}]) is the generator's video with the encoded captions; an empty prompt switches to
    the null caption; the settings record the schedule; a frame off a boundary fails at call time."""
    model, diffusion = _bounded(make_model, in_channels=12)
    encoder = T5Encoder(str(t5_dir), model_max_length=model.model_max_length)
    pipe = CausalVDMPipeline(model, PixelVAE(factor=2), diffusion, encoder, AutoregressiveSettings(4, 5),
                             SampleSettings(sampler="ddim", num_steps=2, cfg_scale=2.0))
    first = torch.randn(1, 12, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    prompts = [{"frame": 5, "prompt": "a dog"}, {"frame": 13, "prompt": ""}]
    pixels = pipe(first_latents=first, prompt="a cat", num_frames=17, seed=1, prompts=prompts, recache_on_switch=True,
                  output_type="pt")
    assert pipe.info["settings"]["prompts"] == tuple(prompts) and pipe.info["settings"]["recache_on_switch"]
    switches = [(5, *encoder.encode(["a dog"])), (13, None, None)]
    latents = pipe.generator.generate(first, 17, *encoder.encode(["a cat"]), seed=1, switches=switches,
                                      recache_on_switch=True)
    torch.testing.assert_close(pixels, pipe.vae.decode(latents)[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="frame 6 is not a chunk boundary"):
        pipe.iter_chunks(first_latents=first, num_frames=17, prompts=[{"frame": 6, "prompt": "x"}])


def test_unconditional_model_ignores_switches(make_model, caplog):
    model, diffusion = _bounded(make_model, in_channels=12, caption_channels=0)
    pipe = CausalVDMPipeline(model, PixelVAE(factor=2), diffusion, autoregressive=AutoregressiveSettings(4, 5),
                             sample=SampleSettings(sampler="ddim", num_steps=2))
    first = torch.randn(1, 12, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    plain = pipe(first_latents=first, num_frames=17)
    with caplog.at_level(logging.WARNING, logger="causalvdm.pipeline"):
        switched = pipe(first_latents=first, num_frames=17, prompts=[{"frame": 13, "prompt": "x"}],
                        recache_on_switch=True)
    assert (switched == plain).all() and "unconditional model ignores the prompt switches" in caplog.text
    with pytest.raises(ValueError, match="frame 6 is not a chunk boundary"):  # checked all the same
        pipe(first_latents=first, num_frames=17, prompts=[{"frame": 6, "prompt": "x"}])


def test_sample_script_records_the_schedule(sample_setup, tmp_path):
    """--prompt-at and a manifest row's prompts reach the sidecar (an unconditional model: ignored, with a warning)."""
    from causalvdm.cli import sample

    root = sample_setup
    args = [str(root / "cfg2.py"), "--ckpt", str(root / "ckpt2"), "--first-image", str(root / "first.png"),
            "--out", str(tmp_path), "--num-frames", "9"]
    assert sample.main(args + ["--prompt-at", "5", "a dog", "--prompt-at", "1", "", "--recache-on-switch"]) == 0
    settings = json.loads((tmp_path / "first.json").read_text())["settings"]
    assert settings["prompts"] == [{"frame": 5, "prompt": "a dog"}, {"frame": 1, "prompt": ""}]
    assert settings["recache_on_switch"] is True

    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(json.dumps({"first_image": str(root / "first.png"), "name": "row",
                                    "prompts": [{"frame": 5, "prompt": "a cat"}]}) + "\n")
    assert sample.main(args[:3] + ["--manifest", str(manifest), "--out", str(tmp_path), "--num-frames", "9"]) == 0
    assert json.loads((tmp_path / "row.json").read_text())["settings"]["prompts"] == [{"frame": 5, "prompt": "a cat"}]
    with pytest.raises(SystemExit, match="2"):
        sample.main(args + ["--prompt-at", "-1", "x"])
