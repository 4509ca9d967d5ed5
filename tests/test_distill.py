"""Few-step distillation (causalvdm/distill): the training rollout and targets against the inference generator, the
gradient path, the student's schedule when sampling, a tiny distillation that beats the few-step teacher, and the run
through the real entrypoints (resume bit-exact, FSDP2 over two processes)."""

import json
import socket
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from causalvdm.config import load_config
from causalvdm.diffusion import IDDPM, make_sampler
from causalvdm.distill import DistillSettings, FewStepDistillation, context_spans, matched_steps
from causalvdm.pipeline import CausalVDMPipeline, SampleSettings
from causalvdm.registry import ConfigError
from causalvdm.sampling import AutoregressiveGenerator
from causalvdm.eval.metrics import psnr_pixels as psnr
from conftest import run_entrypoint


def _objective(diffusion, k=4, max_cond=5, sink=0, steps=2, teacher_steps=6):
    return FewStepDistillation(diffusion, k, max_cond, sink, 0, steps, teacher_steps)


def _text(model, batch, seed=7):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, model.model_max_length, model.caption_channels, generator=gen)
    mask = torch.ones(batch, model.model_max_length, dtype=torch.bool)
    mask[1, 2:] = False
    return y, mask


def _draws(objective, shape, prefix_len, rollout, batch, seed=0):
    return [objective.draw(shape, prefix_len, rollout, torch.Generator().manual_seed(seed + i)) for i in range(batch)]


def test_settings_and_schedules():
    with pytest.raises(ConfigError, match="distill.teacher: give the teacher's checkpoint"):
        DistillSettings.from_cfg(dict(num_steps=4))
    with pytest.raises(ConfigError, match="distill.rollout_prob must be in"):
        DistillSettings.from_cfg(dict(teacher="t", rollout_prob=2.0))
    with pytest.raises(ConfigError, match="distill: unknown field"):
        DistillSettings.from_cfg(dict(teacher="t", steps=4))
    diffusion = IDDPM()
    student, teacher = make_sampler("ddim", diffusion, 4), make_sampler("ddim", diffusion, 24)
    assert student.timesteps.tolist() == [999, 749, 499, 249]
    assert [teacher.timesteps[i] for i in matched_steps(student, teacher)] == student.timesteps.tolist()
    for s, t in ((3, 24), (1, 5), (4, 28)):
        matched_steps(make_sampler("ddim", diffusion, s), make_sampler("ddim", diffusion, t))
        spaced = IDDPM(spacing_power=1.25)  # a multiple still holds every student step, however the steps are spaced
        matched_steps(make_sampler("ddim", spaced, s), make_sampler("ddim", spaced, t))
    with pytest.raises(ConfigError, match="make teacher_steps a multiple of distill.num_steps"):
        matched_steps(student, make_sampler("ddim", diffusion, 25))
    assert context_spans(1, 1, 4) == [(0, 1)]
    assert context_spans(13, 1, 4) == [(0, 1), (1, 5), (5, 9), (9, 13)]


@pytest.mark.numerics
@pytest.mark.parametrize("tpe_mode,sink,spatial_prefix", [("cyclic", 0, None), ("cyclic", 1, "first_frame"),
                                                          ("rope", 2, "prev_frames_2"), ("absolute", 0, None)])
def test_rollout_context_is_the_generators_video_and_cache(make_model, tpe_mode, sink, spatial_prefix):
    """The student's training rollout (3 chunks, past the queue's first eviction) writes the frames and cache the
    inference generator writes from the same noise, with every parameter random."""
    model = make_model(seed=3, learn_sigma=False, tpe_mode=tpe_mode, spatial_prefix=spatial_prefix)
    diffusion = IDDPM(prediction_type="v_prediction", learn_sigma=False)
    objective = _objective(diffusion, sink=sink)
    b, p = 2, 13
    first = torch.randn(b, 4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y, mask = _text(model, b)
    draws = _draws(objective, (4, 4, 4), p, True, b)
    cache, frames = objective.context(model, first, None, p, draws, y, mask)

    gen = AutoregressiveGenerator(model, diffusion, "ddim", 2, chunk_size=4, max_cond_frames=5, sink_frames=sink)
    gen.prefill(first, y, mask)
    video = [first]
    for j in range(3):
        chunk = gen.denoise_chunk(torch.stack([d["rollout_noise"][j] for d in draws]))
        gen.commit(chunk)
        video.append(chunk)
    assert frames.shape == (b, 4, p, 4, 4) and frames[:, :, 1:].std() > 0.1
    torch.testing.assert_close(frames, torch.cat(video, dim=2), rtol=0, atol=0)
    ours, theirs = cache.state_dict(), gen.cache.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
        else:
            assert ours[key] == value, key


@pytest.mark.numerics
def test_targets_are_the_teachers_ode_given_the_real_context(make_model):
    """The regression target is the teacher's DDIM end point from z given the real frames written as at inference,
    and each student input is the teacher's state at the student's timestep."""
    teacher = make_model(seed=5, learn_sigma=False)
    diffusion = IDDPM(prediction_type="v_prediction", learn_sigma=False)
    objective = _objective(diffusion, steps=2, teacher_steps=6)
    b, p = 4, 9
    x0 = torch.randn(b, 4, 13, 4, 4, generator=torch.Generator().manual_seed(2))
    y, mask = _text(teacher, b)
    draws = _draws(objective, (4, 4, 4), p, False, b, seed=10)
    x_in, t_in, end = objective.targets(teacher, x0, p, draws, y, mask)

    gen = AutoregressiveGenerator(teacher, diffusion, "ddim", 6, chunk_size=4, max_cond_frames=5)
    gen.prefill(x0[:, :, :1], y, mask)
    for start, stop in context_spans(p, 1, 4)[1:]:
        gen.commit(x0[:, :, start:stop])
    z = torch.stack([d["z"] for d in draws])
    torch.testing.assert_close(end, gen.denoise_chunk(z), rtol=0, atol=0)
    steps = [d["step"] for d in draws]
    assert sorted(set(steps)) == [0, 1]  # both student steps are drawn in this batch
    assert t_in.tolist() == [[999, 499][i] for i in steps]
    # the teacher's state after 3 of its 6 steps, run here by hand on the generator's cache: the input at 499
    sampler, state = gen.sampler, z
    sampler.reset()
    with torch.inference_mode():  # the generator's cache was made there
        teacher.begin_call(gen.cache, 4, 4, 4)
        ctx = teacher.prepare(4, 4, 4, gen.cache, teacher.encode_text(y, mask, b, per_block_kv=True))
        for i, t in enumerate(sampler.timesteps[:3]):
            state = sampler.step(teacher.step(state, t.expand(b, 4), ctx), i, state)
    for n, i in enumerate(steps):
        torch.testing.assert_close(x_in[n], (z if i == 0 else state)[n], rtol=1e-6, atol=1e-6)


def test_loss_trains_the_student_through_its_cache_only(make_model):
    """The gradient reaches the student's weights; the cache (rolled out without history) carries none, and the
    teacher gets none."""
    student, teacher = make_model(seed=1), make_model(seed=2)
    teacher.requires_grad_(False)
    diffusion = IDDPM(prediction_type="v_prediction")
    objective = _objective(diffusion)
    b, p = 2, 5
    x0 = torch.randn(b, 4, 9, 4, 4, generator=torch.Generator().manual_seed(4))
    y, mask = _text(student, b)
    draws = _draws(objective, (4, 4, 4), p, True, b)
    x_in, t_in, target = objective.targets(teacher, x0, p, draws, y, mask)
    cache, _ = objective.context(student, x0[:, :, :1], None, p, draws, y, mask)
    assert not any(t.requires_grad for t in cache.k + cache.v)
    loss = objective.loss(student, x_in, t_in, target, cache, y, mask)
    assert loss.shape == (b,) and bool((loss > 0).all())
    loss.mean().backward()
    assert student.blocks[0].attn_temp.qkv.weight.grad.abs().sum() > 0
    assert student.y_embedder.y_proj.fc1.weight.grad.abs().sum() > 0
    # The null caption is in the graph (a zero gradient, no caption is dropped), so DDP finds every parameter used.
    assert student.y_embedder.y_embedding.grad is not None and student.y_embedder.y_embedding.grad.abs().max() == 0
    assert all(p.grad is None for p in teacher.parameters())


# ------------------------------------------------------------------------------------------ end to end
CONFIG = """
model = dict(type="CausalSTDiT", in_channels=12, hidden_size=64, depth=2, num_heads=2, mlp_ratio=2.0,
             caption_channels=0, tpe_mode="cyclic", max_tpe_len=9)
vae = dict(type="PixelVAE", factor=2)
text_encoder = dict(type="NullTextEncoder")
diffusion = dict(type="IDDPM", prediction_type="v_prediction")
dataset = dict(type="RepeatDataset", times=64, dataset=dict(type="VideoManifestDataset", root="{root}",
               manifest="manifest.jsonl", num_frames=9, image_size=(8, 8)))
autoregressive = dict(chunk_size=4, max_cond_frames=5)
train = dict(outputs_dir="{out}", max_steps={steps}, batch_size=4, num_workers=0, lr={lr}, warmup_steps=10,
             log_every=5, ckpt_every={ckpt_every}, keep_last=3, ema_decay=0.9, txt_dropout_prob=0.0)
sample = dict(sampler="ddim", num_steps=25, image_size=(8, 8))
"""
DISTILL = """
distill = dict(teacher="{teacher}", num_steps=2, teacher_steps=8, rollout_prob=0.5)
"""


def _run(*args, env=None):
    proc = run_entrypoint(*args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clip"))


def write_clip(root: Path) -> Path:
    """One 9-frame 8x8 clip (lossless H.264) and its manifest: a smooth pattern sliding over the frame."""
    yy, xx = np.mgrid[0:8, 0:24]
    frames = []
    for f in range(9):
        r = 128 + 100 * np.sin(xx / 3.0)
        g = 128 + 100 * np.cos(yy / 2.5)
        frames.append(np.stack([r, g, 255 - r], -1)[:, f:f + 8].astype(np.uint8))
    with av.open(str(root / "clip.mp4"), "w") as container:
        stream = container.add_stream("libx264rgb", rate=8, options={"crf": "0"})
        stream.width, stream.height, stream.pix_fmt = 8, 8, "rgb24"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    (root / "manifest.jsonl").write_text(json.dumps({"path": "clip.mp4", "caption": ""}) + "\n")
    return root


def _write_config(path: Path, root, out, steps, lr, ckpt_every, teacher=None) -> Path:
    text = CONFIG.format(root=root, out=out, steps=steps, lr=lr, ckpt_every=ckpt_every)
    if teacher is not None:
        text += DISTILL.format(teacher=teacher)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def teacher(clip, tmp_path_factory):
    """A tiny teacher that has memorised the clip (clean-prefix training through scripts/train.py)."""
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = _write_config(tmp / "teacher.py", clip, tmp / "outputs", 300, 2e-3, 300)
    _run("scripts/train.py", str(cfg), "--exp-name", "teacher")
    return tmp / "outputs" / "teacher" / "checkpoints" / "step_00000300"


def _next_chunks(pipe, clip, **kwargs) -> torch.Tensor:
    """The chunk after 1 and after 5 real frames (3, 8, H, W) in [-1, 1], each sampled given the real frames."""
    chunks = [pipe(first_video=str(clip / "clip.mp4"), first_frames=n0, num_frames=n0 + 4, output_type="pt",
                   **kwargs)[:, n0:] for n0 in (1, 5)]
    return torch.cat(chunks, dim=1)


def test_student_beats_the_teacher_at_its_steps_and_samples_with_them(clip, teacher, tmp_path):
    """Distilled for 150 steps, the 2-step student reproduces the teacher's 25-step samples (given the real frames
    before a chunk) at least 2 dB closer than the teacher sampled with 2 DDIM steps; its checkpoint samples with 2
    steps unless told otherwise, also after save_pretrained."""
    cfg = _write_config(tmp_path / "distill.py", clip, tmp_path / "outputs", 150, 1e-3, 150, teacher)
    _run("scripts/train.py", str(cfg), "--exp-name", "student")
    student_dir = tmp_path / "outputs" / "student" / "checkpoints" / "step_00000150"
    assert {"loss", "rollout", "teacher_mse_to_real"} <= _metrics(tmp_path / "outputs" / "student")[-1].keys()

    student = CausalVDMPipeline.from_pretrained(student_dir)
    assert (student.defaults.sampler, student.defaults.num_steps) == ("ddim", 2)
    teacher_pipe = CausalVDMPipeline.from_pretrained(teacher)
    assert (teacher_pipe.defaults.sampler, teacher_pipe.defaults.num_steps) == ("ddim", 25)
    full = _next_chunks(teacher_pipe, clip)
    few, distilled = (float(psnr(_next_chunks(p, clip, **kw), full).mean())
                      for p, kw in ((teacher_pipe, dict(num_steps=2)), (student, {})))
    assert distilled > few + 2, (distilled, few)

    _run("scripts/sample.py", "--ckpt", student_dir, "--first-video", clip / "clip.mp4", "--num-frames", 9, "--out",
         tmp_path / "samples", "--name", "s")  # the command line too, with the run's saved config
    settings = json.loads((tmp_path / "samples" / "s.json").read_text())["settings"]
    assert (settings["sampler"], settings["num_steps"]) == ("ddim", 2)
    overridden = SampleSettings.from_cfg(load_config(cfg).sample, dict(ckpt=str(student_dir), num_steps=7))
    assert (overridden.sampler, overridden.num_steps) == ("ddim", 7)  # a flag still wins
    student.save_pretrained(tmp_path / "folder")
    again = CausalVDMPipeline.from_pretrained(tmp_path / "folder")
    assert again.defaults.num_steps == 2
    torch.testing.assert_close(_next_chunks(again, clip), _next_chunks(student, clip))


def test_compare_student_measures_the_chunks_of_the_training_length(clip, teacher, tmp_path):
    """tools/compare_student.py (the teacher standing in for its student): by default the exposure-bias chunks are
    those of the teacher's training length (9 frames: after 1 and 5 given frames), each chunk's given-context PSNR
    the pipeline's own for that call; a training length whose chunks need more given frames than the cache holds is
    one error line before anything is sampled."""
    video = clip / "clip.mp4"
    _run("tools/compare_student.py", "--teacher", teacher, "--student", teacher, "--video", video, "--num-frames", 9,
         "--out", tmp_path / "cmp")
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["variants"]
    assert list(rows) == ["teacher ddim-25", "student ddim-25"]  # the teacher at the student's steps: the same name
    chunks = rows["teacher ddim-25"]["chunks"]
    assert [c["frames"] for c in chunks] == [[1, 4], [5, 8]] and (tmp_path / "cmp" / "compare.png").is_file()
    pipe = CausalVDMPipeline.from_pretrained(teacher)
    pipe(first_video=str(video), first_frames=5, num_frames=9, seed=0, output_type=None)
    assert chunks[1]["given_db"] == pytest.approx(float(np.mean(pipe.info["metrics"]["psnr"])), abs=1e-9)

    proc = run_entrypoint("tools/compare_student.py", "--teacher", teacher, "--student", teacher, "--video", video,
                          "--train-frames", 17, "--out", tmp_path / "cmp17")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: train_frames=17: the chunk after 9 given frames needs them all in view, and the model's cache holds 5 "
        "(autoregressive.max_cond_frames); use the training clip length, model.max_tpe_len"]


def test_distillation_resumes_bit_exact_and_runs_under_fsdp(clip, teacher, tmp_path):
    """scripts/train.sh: 4 steps in one go == 2 steps, then --resume auto for 2 more (weights bit for bit); FSDP2 and
    DDP over two processes follow the single process; validation clips sample with the student's steps."""
    runs = {}
    options = ("train.log_every=1", "train.seed=7")  # seed 7: steps 1-4 draw (p, rollout) = (5, no), (1, -), (5, yes), (1, -)
    two = dict(NPROC_PER_NODE="2")
    for name, steps, extra, env in (("straight", 4, ("train.validation_every=4",), None), ("resumed", 2, (), None),
                                    ("fsdp", 4, ("train.batch_size=2", "train.parallel=fsdp"), two),
                                    ("ddp", 4, ("train.batch_size=2",), two)):
        cfg = _write_config(tmp_path / f"{name}.py", clip, tmp_path / "outputs", steps, 1e-3, 2, teacher)
        _run("scripts/train.sh", cfg, name, _free_port(), "--cfg-options", *options, *extra, env=env)
        if name == "resumed":
            cfg = _write_config(cfg, clip, tmp_path / "outputs", 4, 1e-3, 2, teacher)
            _run("scripts/train.sh", cfg, name, _free_port(), "--resume", "auto", "--cfg-options", *options)
        runs[name] = tmp_path / "outputs" / name
    assert [(row["prefix_len"], row["rollout"]) for row in _metrics(runs["straight"])] == [(5, 0), (1, 0), (5, 1),
                                                                                          (1, 0)]
    assert (runs["straight"] / "samples" / "step_00000004.mp4").is_file()  # a validation clip with the student's steps
    final = {n: load_file(str(runs[n] / "checkpoints" / "step_00000004" / "model.safetensors")) for n in runs}
    losses = {n: [row["loss"] for row in _metrics(runs[n])] for n in runs}
    assert losses["resumed"] == losses["straight"]
    for key, value in final["straight"].items():
        torch.testing.assert_close(final["resumed"][key], value, rtol=0, atol=0, msg=key)
    for name in ("fsdp", "ddp"):
        np.testing.assert_allclose(losses[name], losses["straight"], rtol=1e-4, err_msg=name)
        for key, value in final["straight"].items():  # Adam turns float differences of near-zero gradients into lr
            torch.testing.assert_close(final[name][key], value, rtol=1e-4, atol=1e-4, msg=f"{name}: {key}")
