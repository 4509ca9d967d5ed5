import json
import os
import signal
import subprocess
import time

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from causalvdm.diffusion import IDDPM
from causalvdm.sampling import AutoregressiveGenerator
from causalvdm.eval.metrics import psnr_pixels as psnr
from causalvdm.sampling.writer import ContactSheetCollector, StreamingVideoWriter, to_uint8
from causalvdm.utils.memory import proc_status_mb
from conftest import ROOT


def _inputs(model, batch=2, n0=1, size=4, seed=1):
    """First latents, and text tokens with a padding mask (the second caption shorter)."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(batch, model.in_channels, n0, size, size, generator=gen)
    y = torch.randn(batch, model.model_max_length, model.caption_channels, generator=gen)
    mask = torch.ones(batch, model.model_max_length, dtype=torch.bool)
    mask[1, 3:] = False
    return first, y, mask


def _bounded(make_model, **overrides):
    """A random model and diffusion whose samples stay O(1): v-prediction, fixed variance.

    (With random weights an epsilon model's x0 estimates reach hundreds, and a random learned variance
    makes ancestral noise explode, so an absolute tolerance would say little.)
    """
    return make_model(learn_sigma=False, **overrides), IDDPM(prediction_type="v_prediction", learn_sigma=False)


@pytest.mark.numerics
@pytest.mark.parametrize("sampler", ["iddpm", "ddim", "dpm-solver++"])
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_cache_matches_recompute_until_eviction(make_model, sampler, cfg_scale):
    model, diffusion = _bounded(make_model)
    first, y, mask = _inputs(model)
    videos = {}
    for mode in ("cache", "recompute"):
        gen = AutoregressiveGenerator(model, diffusion, sampler, num_steps=4, chunk_size=4, max_cond_frames=9,
                                      cfg_scale=cfg_scale, prefix_perturb_t=30, mode=mode)
        videos[mode] = gen.generate(first, 17, y, mask, seed=3)
    cache, recompute = videos["cache"], videos["recompute"]
    assert cache.shape == (2, 4, 17, 4, 4)
    # chunks 0-2 see 1, 5, 9 <= 9 conditioning frames; chunk 3 would see 13: the queue has evicted 4
    assert cache[:, :, 1:].std() > 0.3
    torch.testing.assert_close(cache[:, :, :13], recompute[:, :, :13], atol=1e-4, rtol=0)
    assert (cache[:, :, 13:] - recompute[:, :, 13:]).abs().max() > 1e-2  # the comparison is not vacuous


@pytest.mark.numerics
@pytest.mark.parametrize("spatial_prefix", ["first_frame", "prev_frames_2"])
@pytest.mark.parametrize("n0", [0, 3])
def test_cache_matches_recompute_with_a_spatial_prefix(make_model, spatial_prefix, n0):
    """The whole generator with a spatial prefix, guided, with and without given frames, until eviction; and the
    prefix is read: the video differs from the same weights without it."""
    model, diffusion = _bounded(make_model, spatial_prefix=spatial_prefix)
    first, y, mask = _inputs(model, n0=n0)
    videos = [AutoregressiveGenerator(model, diffusion, "ddim", 3, 4, 9, cfg_scale=2.0, mode=mode)
              .generate(first, n0 + 8, y, mask) for mode in ("cache", "recompute")]
    torch.testing.assert_close(videos[0], videos[1], atol=1e-4, rtol=0)
    model.spatial_prefix = None
    plain = AutoregressiveGenerator(model, diffusion, "ddim", 3, 4, 9, cfg_scale=2.0).generate(first, n0 + 8, y, mask)
    assert (plain[:, :, n0 + 4:] - videos[0][:, :, n0 + 4:]).abs().max() > 1e-3


@pytest.mark.numerics
@pytest.mark.parametrize("tpe_mode", ["cyclic", "rope"])
@pytest.mark.parametrize("n0", [1, 3])
def test_frame_sink_cache_matches_recompute(make_model, tpe_mode, n0):
    """A sink of 2 frames beside a queue of 5: with two blocks the modes agree until the first eviction; with one
    block (a frame's keys/values depend on itself alone) on every chunk, wraps and evictions included, so the
    sink's positions (fixed cyclic rows, RoPE keys turned next to the queue) are the same in both. Without the
    sink the chunks after eviction differ: it is really read."""
    first, y, mask = _inputs(make_model(), n0=n0)
    videos = {}
    for depth in (1, 2):
        model, diffusion = _bounded(make_model, depth=depth, tpe_mode=tpe_mode, max_tpe_len=11)
        for sink in (0, 2):
            for mode in ("cache", "recompute"):
                gen = AutoregressiveGenerator(model, diffusion, "ddim", 2, 4, 5, cfg_scale=2.0, mode=mode,
                                              sink_frames=sink)
                videos[depth, sink, mode] = gen.generate(first, n0 + 24, y, mask, seed=1)
    agree = n0 + 4 * (1 + (2 + 5 - n0) // 4)  # the first chunk generated with more than 2 + 5 frames written
    torch.testing.assert_close(videos[2, 2, "cache"][:, :, :agree], videos[2, 2, "recompute"][:, :, :agree],
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(videos[1, 2, "cache"], videos[1, 2, "recompute"], atol=1e-4, rtol=0)
    assert (videos[1, 2, "cache"][:, :, agree:] - videos[1, 0, "cache"][:, :, agree:]).abs().max() > 1e-3


@pytest.mark.numerics
@pytest.mark.parametrize("n0", [0, 3])
def test_cache_matches_recompute_with_other_given_counts(make_model, n0):
    """No given frame (the first chunk from the prompt alone) and several, the last chunk cut short."""
    model, diffusion = _bounded(make_model)
    first, y, mask = _inputs(model, n0=n0)
    videos = [AutoregressiveGenerator(model, diffusion, "ddim", 3, 4, 9, cfg_scale=2.0, mode=mode)
              .generate(first, n0 + 6, y, mask) for mode in ("cache", "recompute")]
    assert videos[0].shape[2] == n0 + 6
    torch.testing.assert_close(videos[0], videos[1], atol=1e-4, rtol=0)


@pytest.mark.numerics
def test_cache_matches_recompute_chunk_bidirectional_guided(make_model):
    """Frames of a chunk see each other in both modes, guidance included (forward_with_cfg passes `chunk`)."""
    model, diffusion = _bounded(make_model, chunk_bidirectional=True)
    first, y, mask = _inputs(model)
    videos = [AutoregressiveGenerator(model, diffusion, "ddim", 3, 4, 9, cfg_scale=3.0, mode=mode)
              .generate(first, 9, y, mask) for mode in ("cache", "recompute")]
    torch.testing.assert_close(videos[0], videos[1], atol=1e-4, rtol=0)


def test_guidance_changes_the_video(make_model):
    model, diffusion = _bounded(make_model)
    first, y, mask = _inputs(model)
    runs = [AutoregressiveGenerator(model, diffusion, "ddim", 3, 4, 9, cfg_scale=s).generate(first, 9, y, mask)
            for s in (1.0, 4.0)]
    assert (runs[0] - runs[1]).abs().max() > 1e-2
    unconditional, diffusion = _bounded(make_model, caption_channels=0)
    gen = AutoregressiveGenerator(unconditional, diffusion, "ddim", 3, 4, 9, cfg_scale=4.0)
    gen.generate(first, 9, y, mask)
    assert gen.cache.batch_size == 2  # no guidance for an unconditional model: no null-text rows


def test_seed_determines_the_video(make_model):
    model, diffusion = _bounded(make_model)
    first, y, mask = _inputs(model)
    gen = AutoregressiveGenerator(model, diffusion, "iddpm", 3, 4, 9, prefix_perturb_t=20)
    a, b, c = (gen.generate(first, 13, y, mask, seed=s) for s in (5, 5, 6))
    assert torch.equal(a, b)
    assert (a - c)[:, :, 1:].abs().amax(dim=(0, 1, 3, 4)).min() > 1e-3  # every new frame differs
    assert torch.equal(a[:, :, :1], first)


def test_a_seed_makes_one_video_whatever_the_given_frames_dtype(make_model):
    """The chunks' noise and the prefix perturbation are drawn in float32 (as the stream engine draws them): given
    frames in bf16 or float64 make the video the same values in float32 make, to the bit."""
    model, diffusion = _bounded(make_model)
    first, y, mask = _inputs(model)
    first = first.to(torch.bfloat16).float()  # values every dtype below holds exactly
    gen = AutoregressiveGenerator(model, diffusion, "iddpm", 3, 4, 9, prefix_perturb_t=20)
    videos = [gen.generate(first.to(dtype), 13, y, mask, seed=5).float() for dtype in (torch.float32, torch.bfloat16,
                                                                                       torch.float64)]
    assert torch.equal(videos[0], videos[1]) and torch.equal(videos[0], videos[2])


@pytest.mark.numerics
def test_resume_from_saved_cache_after_wrap(make_model, tmp_path):
    model, diffusion = _bounded(make_model)
    first, y, mask = _inputs(model)
    args = dict(sampler="iddpm", num_steps=3, chunk_size=4, max_cond_frames=9, cfg_scale=3.0, prefix_perturb_t=20)
    full = AutoregressiveGenerator(model, diffusion, **args).generate(first, 33, y, mask, seed=7)  # 8 chunks

    first_run = AutoregressiveGenerator(model, diffusion, **args)
    for j, _ in enumerate(first_run.iter_chunks(first, 33, y, mask, seed=7)):
        if j == 4:  # 21 frames written to a 9-frame queue: it has wrapped twice
            assert first_run.cache.next_position == 21 and len(first_run.cache) == 9
            torch.save(first_run.cache.state_dict(), tmp_path / "cache.pt")
            break
    state = torch.load(tmp_path / "cache.pt", weights_only=True)
    resumed = AutoregressiveGenerator(model, diffusion, **args)
    rest = torch.cat(list(resumed.iter_chunks(first, 33, y, mask, seed=7, cache_state=state)), dim=2)
    assert len(resumed.chunk_times) == 3
    torch.testing.assert_close(rest, full[:, :, 21:], atol=1e-6, rtol=0)


def test_generator_rejects_bad_settings(make_model):
    model, diffusion = _bounded(make_model)
    first, _, _ = _inputs(model)
    with pytest.raises(ValueError, match="chunk_size >= 1"):
        AutoregressiveGenerator(model, diffusion, chunk_size=0)
    with pytest.raises(ValueError, match="exceed max_tpe_len=33"):
        AutoregressiveGenerator(model, diffusion, chunk_size=8, max_cond_frames=26)
    with pytest.raises(ValueError, match="unknown sampler"):
        AutoregressiveGenerator(model, diffusion, sampler="euler")
    with pytest.raises(ValueError, match="max_cond_frames=4"):
        AutoregressiveGenerator(model, diffusion, chunk_size=4, max_cond_frames=4).generate(first.repeat(1, 1, 5, 1, 1), 9)
    absolute, _ = _bounded(make_model, tpe_mode="absolute")
    with pytest.raises(ValueError, match="absolute TPE"):
        AutoregressiveGenerator(absolute, diffusion, chunk_size=8, max_cond_frames=8).generate(first, 34)
    with pytest.raises(ValueError, match="mode='cache'"):
        AutoregressiveGenerator(model, diffusion, mode="recompute").iter_chunks(first, 9, cache_state={})
    with pytest.raises(ValueError, match="recompute_positions must be one of absolute, window, got 'zero'"):
        AutoregressiveGenerator(model, diffusion, mode="recompute", recompute_positions="zero")


def test_recompute_positions_from_the_sample_settings(make_model):
    """`sample.recompute_positions` reaches the pipeline's generator (its effect: tests/test_exactness.py)."""
    from causalvdm.autoencoders.pixel import PixelVAE
    from causalvdm.pipeline import CausalVDMPipeline, SampleSettings
    from causalvdm.registry import ConfigError

    model, diffusion = _bounded(make_model, in_channels=12, caption_channels=0)
    assert SampleSettings.from_cfg({}).recompute_positions == "absolute"
    sample = SampleSettings.from_cfg(dict(mode="recompute", recompute_positions="window"))
    pipe = CausalVDMPipeline(model, PixelVAE(factor=2), diffusion, sample=sample)
    assert pipe.generator.mode == "recompute" and pipe.generator.recompute_positions == "window"
    with pytest.raises(ConfigError, match=r"^sample\.recompute_positions must be one of absolute, window, got 'zero'$"):
        SampleSettings.from_cfg(dict(recompute_positions="zero"))


def _read_mp4(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.average_rate


def test_writer_mp4_and_contact_sheet(tmp_path):
    rng = np.random.default_rng(0)
    collector = ContactSheetCollector(num_frames=13, count=4)
    with StreamingVideoWriter(tmp_path / "v.mp4", fps=12, width=32, height=24) as writer:
        for start in range(0, 13, 5):
            frames = np.repeat(rng.integers(0, 256, (min(5, 13 - start), 1, 1, 3), dtype=np.uint8), 24, 1).repeat(32, 2)
            writer.write(frames)
            collector.add(frames)
    frames, fps = _read_mp4(tmp_path / "v.mp4")
    assert len(frames) == 13 and frames[0].shape == (24, 32, 3) and fps == 12
    assert sorted(collector.frames) == [0, 4, 8, 12]
    collector.save(tmp_path / "sheet.png")
    # 24x32 frames upscaled 6x (short side >= 128), 4 px apart, a 14 px frame-number strip under each
    assert Image.open(tmp_path / "sheet.png").size == (4 * 192 + 5 * 4, 144 + 14 + 2 * 4)
    with pytest.raises(RuntimeError), StreamingVideoWriter(tmp_path / "broken.mp4", 8, 32, 24) as writer:
        writer.write(frames[0][None])
        raise RuntimeError("generation failed")
    assert list(tmp_path.glob("*broken*")) == []  # no partial file that batch mode would take as done
    with pytest.raises(ValueError, match="even"):
        StreamingVideoWriter(tmp_path / "odd.mp4", 8, 31, 24)



def test_writer_encodes_the_same_frames_to_the_same_video(tmp_path):
    """The same frames written four times decode to the same pixels: figures read from a written mp4 (the demo's
    token grid) repeat. Left to PyAV's encode, the rgb -> yuv420p conversion gave other pixels from run to run."""
    pixels = torch.linspace(0, 255, 32)
    frames = ((pixels[None, :, None, None] + pixels[None, None, :, None] * torch.arange(1, 10)[:, None, None, None]
               + torch.tensor([0.0, 60, 120])) % 256).to(torch.uint8).numpy()  # (9, 32, 32, 3) gradients
    videos = []
    for i in range(4):
        with StreamingVideoWriter(tmp_path / f"{i}.mp4", fps=12, width=32, height=32, crf=4) as writer:
            writer.write(frames[:5])
            writer.write(frames[5:])
        videos.append(_read_mp4(tmp_path / f"{i}.mp4")[0])
    assert all(np.array_equal(np.stack(videos[0]), np.stack(video)) for video in videos[1:])

def test_psnr():
    a = torch.zeros(3, 2, 4, 4)
    b = a.clone()
    b[:, 1] = 0.2  # mse 0.04 with a data range of 2 -> 10 log10(4 / 0.04) = 20 dB
    assert psnr(b, a).tolist() == pytest.approx([100.0, 20.0])


@pytest.mark.parametrize("tpe_mode, sink_frames, max_cond", [("cyclic", 0, 25), ("rope", 2, 23)])
def test_streaming_memory_is_flat(make_model, tmp_path, tpe_mode, sink_frames, max_cond):
    """999 frames generated, decoded and written: memory after frame 992 is what it was at frame 96, with and
    without a frame sink (whose RoPE keys are turned at every chunk).

    Frames are upsampled to 128x128 for the writer, so keeping them would add ~45 MB of pixels.
    """
    from causalvdm.autoencoders import PixelVAE

    model, diffusion = _bounded(make_model, in_channels=12, caption_channels=0, tpe_mode=tpe_mode)
    vae = PixelVAE(factor=2)
    gen = AutoregressiveGenerator(model, diffusion, "ddim", 1, chunk_size=8, max_cond_frames=max_cond,
                                  sink_frames=sink_frames)
    collector = ContactSheetCollector(999)
    rss = {}
    with StreamingVideoWriter(tmp_path / "long.mp4", 8, 128, 128) as writer:
        for latents in gen.iter_chunks(torch.randn(1, 12, 1, 8, 8), 1000):
            frames = to_uint8(vae.decode(latents)[0]).repeat(8, axis=1).repeat(8, axis=2)  # (8, 128, 128, 3)
            writer.write(frames)
            collector.add(frames)
            if writer.num_frames in (96, 992):
                rss[writer.num_frames] = proc_status_mb("VmRSS")
    assert writer.num_frames == 999 and len(collector.frames) == 8 and gen.cache.next_position == 1001
    assert rss[992] - rss[96] < 10, rss


# ------------------------------------------------------------------------------------------- sample.py
CONFIG = """
model = dict(type="CausalSTDiT", in_channels=12, hidden_size=32, depth={depth}, num_heads=2, mlp_ratio=2.0,
             caption_channels=0, tpe_mode="cyclic", max_tpe_len=17)
vae = dict(type="PixelVAE", factor=2)
text_encoder = dict(type="NullTextEncoder")
diffusion = dict(type="IDDPM")
autoregressive = dict(chunk_size=4, max_cond_frames=9, prefix_perturb_t=20)
sample = dict(sampler="ddim", num_steps=2, num_frames=14, fps=6, image_size=(16, 16))
"""


@pytest.fixture(scope="module")
def sample_setup(tmp_path_factory):
    """A tiny config, a random training checkpoint directory, one of another depth, an image and a video."""
    import causalvdm
    from causalvdm.config import load_config
    from causalvdm.models.utils import randomize_weights

    root = tmp_path_factory.mktemp("sample")
    for depth in (2, 3):
        (root / f"cfg{depth}.py").write_text(CONFIG.format(depth=depth))
        model = randomize_weights(causalvdm.build_model(load_config(root / f"cfg{depth}.py").model), seed=depth)
        (root / f"ckpt{depth}").mkdir()
        for name in ("model", "ema"):
            save_file(model.state_dict(), str(root / f"ckpt{depth}" / f"{name}.safetensors"))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "first.png")
    with StreamingVideoWriter(root / "real.mp4", 6, 16, 16) as writer:
        writer.write(np.repeat(rng.integers(0, 256, (20, 16, 16, 1), dtype=np.uint8), 3, axis=3))
    return root


def test_sample_script_end_to_end(sample_setup, tmp_path, monkeypatch):
    from causalvdm.cli import sample

    root = sample_setup
    assert sample.main([str(root / "cfg2.py"), "--ckpt", str(root / "ckpt2"), "--first-image", str(root / "first.png"),
                        "--out", str(tmp_path), "--seed", "3"]) == 0
    frames, fps = _read_mp4(tmp_path / "first.mp4")
    assert len(frames) == 14 and frames[0].shape == (16, 16, 3) and fps == 6
    assert (tmp_path / "first.png").is_file()
    sidecar = json.loads((tmp_path / "first.json").read_text())
    assert sidecar["seed"] == 3 and sidecar["frames"] == 14 and len(sidecar["chunk_seconds"]) == 4
    assert sidecar["settings"]["sampler"] == "ddim" and sidecar["autoregressive"]["max_cond_frames"] == 9
    assert sidecar["timesteps"] == [999, 499]  # 2 trailing DDIM steps, evenly spaced
    # the diffusion's spacing_power, changed for this run on the command line, moves the steps (and so the frames)
    assert sample.main([str(root / "cfg2.py"), "--ckpt", str(root / "ckpt2"), "--first-image", str(root / "first.png"),
                        "--out", str(tmp_path), "--seed", "3", "--name", "spaced",
                        "--cfg-options", "diffusion.spacing_power=2"]) == 0
    assert json.loads((tmp_path / "spaced.json").read_text())["timesteps"] == [999, 249]  # 1000 (1 / 2) ** 2 - 1
    assert not np.array_equal(_read_mp4(tmp_path / "spaced.mp4")[0], frames)
    # the same frames at a lower crf: the flag reaches the encoder, which spends more bits on them
    assert sample.main([str(root / "cfg2.py"), "--ckpt", str(root / "ckpt2"), "--first-image", str(root / "first.png"),
                        "--out", str(tmp_path), "--seed", "3", "--crf", "1", "--name", "fine"]) == 0
    assert sidecar["settings"]["crf"] == 18 and json.loads((tmp_path / "fine.json").read_text())["settings"]["crf"] == 1
    assert (tmp_path / "fine.mp4").stat().st_size > (tmp_path / "first.mp4").stat().st_size
    fine, _ = _read_mp4(tmp_path / "fine.mp4")
    assert len(fine) == 14

    # first frames from a video: PSNR against the real frames and the repeat-the-last-frame baseline
    assert sample.main([str(root / "cfg2.py"), "--ckpt", str(root / "ckpt2" / "model.safetensors"),
                        "--first-video", str(root / "real.mp4"), "--first-frames", "2", "--num-frames", "24",
                        "--out", str(tmp_path), "--name", "vid"]) == 0
    metrics = json.loads((tmp_path / "vid.json").read_text())["metrics"]
    assert metrics["frames"] == list(range(2, 20)) and len(metrics["psnr"]) == 18  # the real video has 20 frames
    assert metrics["eval_len"] == 17 and 0 < metrics["psnr_repeat_last_mean_eval"] < 100

    # batch mode: rank 1 of 2 takes the second row; a second run skips what exists
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(json.dumps({"first_image": str(root / "first.png"), "name": "a"}) + "\n"
                        + json.dumps({"first_video": os.path.relpath(root / "real.mp4", tmp_path), "name": "b"}) + "\n")
    batch = tmp_path / "batch"
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert sample.main([str(root / "cfg2.py"), "--ckpt", str(root / "ckpt2"), "--manifest", str(manifest),
                            "--out", str(batch)]) == 0
        assert (batch / "b.mp4").is_file() and (batch / "a.mp4").is_file() == (rank == "0")
    stamp = (batch / "b.mp4").stat().st_mtime_ns
    monkeypatch.setenv("RANK", "1")
    assert sample.main([str(root / "cfg2.py"), "--ckpt", str(root / "ckpt2"), "--manifest", str(manifest),
                        "--out", str(batch)]) == 0
    assert (batch / "b.mp4").stat().st_mtime_ns == stamp


def test_outputs_are_never_replaced_by_name_alone(sample_setup, tmp_path):
    from causalvdm.cli import sample

    root = sample_setup
    argv = [str(root / "cfg2.py"), "--ckpt", str(root / "ckpt2"), "--first-image", str(root / "first.png"),
            "--out", str(tmp_path), "--num-frames", "6"]
    assert sample.main(argv + ["--seed", "1"]) == 0
    first = (tmp_path / "first.mp4").read_bytes()
    with pytest.raises(SystemExit, match=r"first.mp4: exists \(an earlier sample\); pass --overwrite"):
        sample.main(argv + ["--seed", "2"])
    assert (tmp_path / "first.mp4").read_bytes() == first
    assert sample.main(argv + ["--seed", "2", "--overwrite"]) == 0
    assert json.loads((tmp_path / "first.json").read_text())["seed"] == 2


def test_batch_rerun_trusts_only_complete_sets(sample_setup, tmp_path):
    """A row whose mp4 was written but not its sidecar (the run stopped in between) is generated again; a finished
    one is skipped."""
    from causalvdm.cli import sample

    root = sample_setup
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps({"first_image": str(root / "first.png"), "name": n, "seed": i}) + "\n"
                                for i, n in enumerate(("a", "b"))))
    argv = [str(root / "cfg2.py"), "--ckpt", str(root / "ckpt2"), "--manifest", str(manifest), "--out", str(tmp_path),
            "--num-frames", "6"]
    assert sample.main(argv) == 0
    (tmp_path / "b.json").unlink()
    stamps = {n: (tmp_path / f"{n}.mp4").stat().st_mtime_ns for n in ("a", "b")}
    assert sample.main(argv) == 0
    assert (tmp_path / "a.mp4").stat().st_mtime_ns == stamps["a"]
    assert (tmp_path / "b.mp4").stat().st_mtime_ns != stamps["b"] and (tmp_path / "b.json").is_file()


def test_ctrl_c_in_batch_sampling_then_a_rerun_finishes_the_rest(sample_setup, tmp_path):
    root = sample_setup
    manifest = tmp_path / "rows.jsonl"
    names = [f"v{i:02d}" for i in range(40)]
    manifest.write_text("".join(json.dumps({"first_image": str(root / "first.png"), "name": n, "seed": i}) + "\n"
                                for i, n in enumerate(names)))
    out = tmp_path / "out"
    argv = ["scripts/sample.sh", str(root / "cfg2.py"), "--ckpt", str(root / "ckpt2"), "--manifest", str(manifest),
            "--out", str(out), "--num-frames", "10"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(["bash", *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "v01.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "interrupted: a rerun" in stderr, stderr[-2000:]
    done = {p.stem for p in out.glob("*.json")}
    assert 2 <= len(done) < len(names)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial mp4 left behind
    result = subprocess.run(["bash", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("done in an earlier run, skipped") == len(done)
    assert {p.stem for p in out.glob("*.json")} == set(names)
