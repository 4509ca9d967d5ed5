"""CausalVDMPipeline as a notebook would use it: from_pretrained + pipe(...) give the frames the sampling CLI writes,
save_pretrained round-trips, iter_chunks streams what __call__ returns."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_sampling import sample_setup  # noqa: F401  (a fixture: tiny config, checkpoints, image, video)

import causalvdm
from causalvdm import CausalVDMPipeline
from causalvdm.config import load_config
from causalvdm.data.transforms import video_transform
from causalvdm.data.video_io import iter_video_frames, read_image
from causalvdm.models.utils import randomize_weights
from causalvdm.sampling.writer import StreamingVideoWriter, to_uint8


@pytest.fixture(scope="module")
def run_dir(sample_setup, tmp_path_factory):
    """A training run's layout, outputs/exp/{config.py, checkpoints/step_00000010/}, with different random model
    and EMA weights, so that an equality shows which were loaded."""
    run = tmp_path_factory.mktemp("outputs") / "exp"
    ckpt = run / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    shutil.copy(sample_setup / "cfg2.py", run / "config.py")  # the run's resolved config, two levels up
    for name, seed in (("model", 5), ("ema", 6)):
        model = randomize_weights(causalvdm.build_model(load_config(run / "config.py").model), seed=seed)
        save_file(model.state_dict(), str(ckpt / f"{name}.safetensors"))
    return run


def _record_writes(monkeypatch) -> list:
    """Frames passed to every StreamingVideoWriter from now on (the mp4 itself is lossy)."""
    written = []
    write = StreamingVideoWriter.write
    monkeypatch.setattr(StreamingVideoWriter, "write", lambda writer, frames: (written.append(frames),
                                                                               write(writer, frames)))
    return written


def test_from_pretrained_gives_the_cli_frames(run_dir, sample_setup, tmp_path, monkeypatch):
    from causalvdm.cli.sample import main

    ckpt = run_dir / "checkpoints" / "step_00000010"
    pipe = CausalVDMPipeline.from_pretrained(ckpt)
    frames = pipe(first_image=sample_setup / "first.png", seed=3)
    assert frames.dtype == np.uint8 and frames.shape == (14, 16, 16, 3)  # num_frames and image_size of cfg.sample
    assert not np.array_equal(frames, CausalVDMPipeline.from_pretrained(ckpt, weights="model")(
        first_image=sample_setup / "first.png", seed=3))  # EMA weights by default

    written = _record_writes(monkeypatch)
    monkeypatch.chdir(tmp_path)  # only --ckpt: the run's saved config, outputs into outputs/exp/samples
    assert main(["--ckpt", str(ckpt), "--first-image", str(sample_setup / "first.png"), "--seed", "3"]) == 0
    np.testing.assert_array_equal(np.concatenate(written), frames)
    sidecar = json.loads((tmp_path / "outputs" / "exp" / "samples" / "first.json").read_text())
    assert sidecar["config"] == str(run_dir / "config.py") and sidecar["seed"] == 3 and sidecar["frames"] == 14

    written.clear()  # with the config given, as scripts/sample.sh CONFIG --ckpt CKPT
    assert main([str(run_dir / "config.py"), "--ckpt", str(ckpt), "--first-image", str(sample_setup / "first.png"),
                 "--seed", "3", "--out", str(tmp_path / "with_config")]) == 0
    np.testing.assert_array_equal(np.concatenate(written), frames)


def test_save_pretrained_round_trip(run_dir, sample_setup, tmp_path):
    pipe = CausalVDMPipeline.from_pretrained(run_dir / "checkpoints" / "step_00000010")
    frames = pipe(first_image=sample_setup / "first.png", seed=1, num_frames=10)
    pipe.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.safetensors"]
    loaded = CausalVDMPipeline.from_pretrained(tmp_path / "saved")
    assert loaded.image_size == (16, 16) and loaded.defaults.sampler == "ddim" and loaded.defaults.num_steps == 2
    np.testing.assert_array_equal(loaded(first_image=sample_setup / "first.png", seed=1, num_frames=10), frames)


def test_save_pretrained_never_replaces_what_it_did_not_write(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "step_00000010"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    pipe = CausalVDMPipeline.from_pretrained(ckpt)
    with pytest.raises(ValueError, match=r"step_00000010: holds other files .*save into a new or empty folder"):
        pipe.save_pretrained(ckpt)  # the training checkpoint it came from: its raw weights stay raw
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before

    pipe.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"saved: holds an earlier save_pretrained; pass overwrite=True"):
        pipe.save_pretrained(tmp_path / "saved")
    pipe.save_pretrained(tmp_path / "saved", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no staging or old copy left beside it
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.safetensors"]


def test_iter_chunks_streams_the_call(run_dir, sample_setup):
    pipe = CausalVDMPipeline.from_pretrained(run_dir / "checkpoints" / "step_00000010")
    video = sample_setup / "real.mp4"
    args = dict(first_video=video, first_frames=2, num_frames=11, seed=4)
    chunks = list(pipe.iter_chunks(**args))
    assert [len(c) for c in chunks] == [2, 4, 4, 1]  # the given frames, then chunks of 4, the last one cut
    info = pipe.info
    assert info["frames"] == 11 and len(info["chunk_seconds"]) == 3 and info["metrics"]["frames"] == list(range(2, 11))

    frames = pipe(**args)
    np.testing.assert_array_equal(np.concatenate(chunks), frames)
    pixels = pipe(**args, output_type="pt")  # (3, T, H, W) in [-1, 1]
    assert pixels.shape == (3, 11, 16, 16)
    np.testing.assert_array_equal(to_uint8(pixels), frames)

    # frames already in memory (a dataset item, as the trainer's validation has them) give the same video and PSNR
    clip = video_transform(torch.from_numpy(np.stack(list(iter_video_frames(video)))), pipe.image_size)
    np.testing.assert_array_equal(pipe(**{**args, "first_video": clip}), frames)
    assert pipe.info["metrics"]["psnr"] == info["metrics"]["psnr"]

    with pytest.raises(ValueError, match="at most one of"):
        pipe.iter_chunks(first_image=sample_setup / "first.png", first_video=video)
    with pytest.raises(ValueError, match="fewer than the 2 given frames"):
        pipe.iter_chunks(first_video=video, first_frames=2, num_frames=1)


def test_built_from_parts_matches_the_generator(sample_setup):
    """The trainer's validation: a pipeline around its own model, VAE and diffusion, from latents it already has."""
    from causalvdm.config import AutoregressiveSettings
    from causalvdm.pipeline import SampleSettings
    from causalvdm.registry import SCHEDULERS, VAES, build
    from causalvdm.sampling import AutoregressiveGenerator

    cfg = load_config(sample_setup / "cfg2.py")
    model = randomize_weights(causalvdm.build_model(cfg.model), seed=7).eval()
    vae, diffusion = build(VAES, cfg.vae, "vae"), build(SCHEDULERS, cfg.diffusion, "diffusion")
    ar = AutoregressiveSettings.from_cfg(cfg.autoregressive)
    first = vae.encode(torch.rand(1, 3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    reference = AutoregressiveGenerator(model, diffusion, "ddim", 3, ar.chunk_size, ar.max_cond_frames,
                                        prefix_perturb_t=ar.prefix_perturb_t).generate(first, 13, seed=7)
    pipe = CausalVDMPipeline(model, vae, diffusion, autoregressive=ar, sample=SampleSettings(sampler="ddim", num_steps=3))
    np.testing.assert_array_equal(pipe(first_latents=first, num_frames=13, seed=7), to_uint8(vae.decode(reference)[0]))


def test_stream_engine_of_a_pipeline_gives_its_frames(run_dir, sample_setup):
    """pipe.stream_engine(): a stream opened from the first image's latents, beside another stream, decodes to the
    frames pipe() makes from that image with the same seed."""
    pipe = CausalVDMPipeline.from_pretrained(run_dir / "checkpoints" / "step_00000010")
    expected = pipe(first_image=sample_setup / "first.png", seed=3, output_type="pt")  # (3, T, H, W)
    video = _engine_video(pipe.stream_engine(max_rows=4), pipe, sample_setup / "first.png", 3, expected.shape[1] - 1,
                          neighbour=True)
    assert (video - expected[:, 1:]).abs().max() <= 1e-5 * expected.abs().max()  # random weights: values in hundreds


def _engine_video(engine, pipe, image, seed: int, frames: int, neighbour: bool = False) -> torch.Tensor:
    """The first `frames` generated frames (3, frames, H, W) of a stream opened from `image`'s latents (beside another
    stream when `neighbour`), stepped until they are all made."""
    pixels = video_transform(torch.from_numpy(read_image(image))[None], pipe.image_size)
    sid = engine.open(pipe.vae.encode(pixels[None].to(pipe.device)), seed=seed)
    if neighbour:
        engine.open(seed=seed + 1)
    chunks = []
    while sum(c.shape[2] for c in chunks) < frames:
        chunks += [chunk.frames for chunk in engine.step() if chunk.stream == sid]
    return torch.cat(chunks, dim=2)[0, :, :frames]


def test_deblocking_filters_the_generated_frames_only(run_dir, sample_setup):
    """deblock: the given frame as it is, the generated ones as `deblock_frames` of those made without it (the
    latents, so every later chunk, unchanged); a stream engine's frames the same."""
    from causalvdm.sampling.deblock import deblock_frames

    pipe = CausalVDMPipeline.from_pretrained(run_dir / "checkpoints" / "step_00000010")
    args = dict(first_image=sample_setup / "first.png", num_frames=9, seed=3, output_type="pt")
    raw = pipe(**args)  # (3, T, H, W)
    strength = 3000.0  # random weights make values in the hundreds: a strength that filters some borders of those
    expected = torch.cat([raw[:, :1], deblock_frames(raw[:, 1:], pipe.token_pixels, strength)], dim=1)
    assert 0 < (expected != raw).float().mean() < 0.5
    assert torch.equal(pipe(**args, deblock=strength), expected)
    assert pipe.info["settings"]["deblock"] == strength

    video = _engine_video(pipe.stream_engine(max_rows=2, deblock=strength), pipe, sample_setup / "first.png", 3,
                          expected.shape[1] - 1)
    assert (video - expected[:, 1:]).abs().max() <= 1e-5 * expected.abs().max()
