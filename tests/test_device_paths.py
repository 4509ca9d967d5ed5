"""The GPU user's paths with the model, its buffers and every input on the meta device.

Like CUDA, the meta device refuses an op that mixes its tensors with CPU tensors (0-dim CPU scalars aside) and
any read of a value on the host (`.item()`, `int(t)`, `bool(t)`, `.tolist()`, `.cpu()`): each test below fails
on the first such line of a training step, a distillation step, sampling (every TPE mode, the sink, the spatial
prefixes, guidance, prompt switches with re-encode, resume from a saved cache state), the stream engine and the
benchmark presets, where the CPU suite, whose tensors all live on the CPU, cannot see it. Nothing is computed, so
XL/2 runs here too.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import causalvdm
from causalvdm.config import AutoregressiveSettings, load_config
from causalvdm.diffusion import IDDPM
from causalvdm.distill import DistillTrainer
from causalvdm.distill import trainer as distill_trainer
from causalvdm.models.pretrained import split_init_fields
from causalvdm.models.utils import randomize_weights
from causalvdm.pipeline import CausalVDMPipeline, SampleSettings
from causalvdm.registry import TEXT_ENCODERS, VAES, build
from causalvdm.sampling import AutoregressiveGenerator
from causalvdm.serving import StreamEngine
from causalvdm.training import Trainer
from causalvdm.training.distributed import DistInfo
from causalvdm.training.settings import TrainSettings
from conftest import ROOT

META = torch.device("meta")

CONFIG = """
model = dict(type="CausalSTDiT", in_channels=12, hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0,
             caption_channels=16, model_max_length=8, tpe_mode="{tpe_mode}", max_tpe_len=9,
             spatial_prefix={spatial_prefix!r})
vae = dict(type="PixelVAE", factor=2)
text_encoder = dict(type="T5Encoder", from_pretrained="{t5}", model_max_length=8)
diffusion = dict(type="IDDPM", prediction_type="epsilon")
dataset = dict(type="VideoManifestDataset", root="{root}", manifest="manifest.jsonl", num_frames=9, image_size=(8, 8))
autoregressive = dict(chunk_size=4, max_cond_frames=4, prefix_perturb_t=20, sink_frames={sink})
train = dict(max_steps=4, batch_size=2, num_workers=0, lr=1e-3, warmup_steps=1, grad_accum_steps=2, log_every=2,
             ema_decay=0.9, txt_dropout_prob=0.5, grad_checkpointing={grad_checkpointing})
distill = dict(teacher="{teacher}", num_steps=1, teacher_steps=2, rollout_prob=1.0)
"""


def _config(tmp_path: Path, video_root, t5_dir, tpe_mode="cyclic", sink=0, spatial_prefix=None,
            grad_checkpointing=False):
    """The run's config; the distillation teacher is the same architecture's random weights, as a weights file."""
    teacher = tmp_path / "teacher.safetensors"
    path = tmp_path / "cfg.py"
    path.write_text(CONFIG.format(t5=t5_dir, root=video_root, teacher=teacher, tpe_mode=tpe_mode, sink=sink,
                                  spatial_prefix=spatial_prefix, grad_checkpointing=grad_checkpointing))
    cfg = load_config(path)
    save_file(randomize_weights(causalvdm.build_model(dict(cfg.model)), seed=1).state_dict(), str(teacher))
    return cfg


class OnDevice:
    """T5 kept on the CPU, its outputs moved to the device, as a CUDA T5's would be there: transformers' own mask
    check reads the host, which is a sync on CUDA, not an error, and not this project's code."""

    def __init__(self, text_encoder):
        self.text_encoder, self.output_dim = text_encoder, text_encoder.output_dim

    def encode(self, prompts):
        return tuple(t.to(META) for t in self.text_encoder.encode(prompts))


class HostReads:
    """Stands in for `Trainer.to_host`, the loop's one named host read: counts its calls and the values read, and
    answers for the meta tensors it is given (finite, and 0.5 for every logged mean)."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, values: dict) -> dict:
        self.calls.append(sorted(values))
        for value in values.values():
            assert not torch.is_tensor(value) or value.device == META, "a logged value left the device early"
        return {key: (1.0 if key == "finite" else 0.5) if torch.is_tensor(v) else v for key, v in values.items()}


def _run_steps(trainer_cls, cfg, tmp_path, monkeypatch, steps: int = 2) -> HostReads:
    """Build a trainer on the meta device and run `steps` optimizer steps and one log line, counting host reads."""
    trainer = trainer_cls(cfg, TrainSettings.from_cfg(cfg.train), tmp_path / "run", DistInfo(0, 1, 0, META))
    reads = HostReads()
    monkeypatch.setattr(trainer, "to_host", reads)
    trainer.build()
    trainer.text_encoder = OnDevice(trainer.text_encoder)
    trainer.data = trainer.batches()
    trainer.model.train()
    assert all(p.device == META for p in trainer.model.parameters())
    window = {}
    for _ in range(steps):
        means, grad_norm = trainer.train_step()
        for key, value in means.items():
            window[key] = window.get(key, 0.0) + value
    assert means["loss"].device == META and grad_norm.device == META
    assert trainer.step == steps and trainer.nonfinite_total == 0
    assert all(t.device == META for t in trainer.ema.shadow.values())
    assert all(s["exp_avg"].device == META for s in trainer.optimizer.state.values())  # the optimizer stepped

    trainer.run_logger, trainer.bar = _Sink(), _Sink()
    trainer.log_window(window, steps, 1.0, grad_norm)
    assert trainer.run_logger.logged[0][1]["loss"] == 0.5 / steps  # the window sum the one read answered
    return reads


class _Sink:
    """Takes the log lines and progress-bar postfix of `log_window`."""

    def __init__(self):
        self.logged = []

    def log(self, step, metrics):
        self.logged.append((step, metrics))

    def set_postfix(self, **kwargs):
        pass


@pytest.mark.parametrize("tpe_mode,sink,spatial_prefix,grad_checkpointing", [
    ("cyclic", 0, None, False),
    ("cyclic", 1, "prev_frames_2", True),
    ("rope", 1, "first_frame", False),
])
def test_training_step_on_device(tmp_path, video_root, t5_dir, monkeypatch, tpe_mode, sink, spatial_prefix,
                                 grad_checkpointing):
    """Loss, backward, clipping, optimizer step, EMA and the non-finite check run on the device; the step reads the
    host once (the non-finite check) and a log line once more (the logged means), both through `Trainer.to_host`."""
    cfg = _config(tmp_path, video_root, t5_dir, tpe_mode, sink, spatial_prefix, grad_checkpointing)
    reads = _run_steps(Trainer, cfg, tmp_path, monkeypatch)
    assert reads.calls == [["finite"], ["finite"], ["grad_norm", "loss", "mse", "prefix_len", "vb"]]


def test_distillation_step_on_device(tmp_path, video_root, t5_dir, monkeypatch):
    """The student's step: the teacher's ODE targets and the student's own rollout through its cache, on the device."""
    cfg = _config(tmp_path, video_root, t5_dir, sink=1, spatial_prefix="prev_frames_2")
    # torch's set_model_state_dict takes a model on the meta device for one not yet materialised and broadcasts into
    # it from rank 0; on a real device it copies, as load_state_dict does here
    monkeypatch.setattr(distill_trainer, "set_model_state_dict", lambda model, state, options: model.load_state_dict(state))
    reads = _run_steps(DistillTrainer, cfg, tmp_path, monkeypatch)
    assert reads.calls[:2] == [["finite"], ["finite"]] and len(reads.calls) == 3
    assert "teacher_mse_to_real" in reads.calls[2]


def _cpu_state(model_cfg: dict, gen_kwargs: dict, first, y, mask, chunks: int) -> dict:
    """The cache state a CPU run of the same video holds after `chunks` chunks (a state saved on another machine)."""
    model = randomize_weights(causalvdm.build_model(model_cfg), seed=0).eval()
    gen = AutoregressiveGenerator(model, IDDPM(), **gen_kwargs)
    for _ in gen.iter_chunks(first, 1 + 4 * chunks, y, mask, seed=3):
        pass
    return gen.cache.state_dict()


@pytest.mark.parametrize("tpe_mode,sink,spatial_prefix,cfg_scale,mode", [
    ("cyclic", 1, "prev_frames_2", 2.0, "cache"),
    ("rope", 1, "first_frame", 1.0, "cache"),
    ("absolute", 0, "prev_frames_1", 2.0, "cache"),
    ("cyclic", 1, "first_frame", 2.0, "recompute"),
])
def test_sampling_on_device(tpe_mode, sink, spatial_prefix, cfg_scale, mode):
    """Prefill, denoise_chunk, commit and a prompt switch with re-encode, then a resume from a CPU-held cache state,
    all with the model and cache on the device."""
    num_frames = 13  # the queue of 4 evicts from the third chunk on; a cyclic table of 9 rows wraps
    model_cfg = dict(load_config(ROOT / "configs" / "debug" / "tiny.py").model, tpe_mode=tpe_mode,
                     max_tpe_len=num_frames if tpe_mode == "absolute" else 9, spatial_prefix=spatial_prefix)
    model = causalvdm.build_model(model_cfg).to(META).eval()
    gen_kwargs = dict(sampler="ddim", num_steps=1, chunk_size=4, max_cond_frames=4, cfg_scale=cfg_scale,
                      prefix_perturb_t=20, sink_frames=sink, mode=mode)
    gen = AutoregressiveGenerator(model, IDDPM(), **gen_kwargs)
    first = torch.randn(1, 4, 1, 4, 4)  # given on the CPU, as a user's image latents may be
    y, mask = torch.randn(1, 6, 16), torch.ones(1, 6, dtype=torch.bool)
    y_new = torch.randn(1, 6, 16)
    switches = [(5, y_new, mask)]
    video = gen.generate(first, num_frames, y, mask, seed=3, switches=switches, recache_on_switch=True)
    assert video.device == META and video.shape == (1, 4, num_frames, 4, 4)
    if mode == "cache":
        assert all(t.device == META for t in _cache_tensors(gen.cache))
        state = _cpu_state(model_cfg, gen_kwargs, first, y, mask, chunks=1)
        resumed = AutoregressiveGenerator(model, IDDPM(), **gen_kwargs)
        chunks = list(resumed.iter_chunks(first, num_frames, y, mask, seed=3, cache_state=state, switches=switches))
        assert all(c.device == META for c in chunks) and len(chunks) == resumed.num_chunks(1, num_frames) - 1
        assert all(t.device == META for t in _cache_tensors(resumed.cache))


@pytest.mark.parametrize("tpe_mode,sink,spatial_prefix,cache_dtype", [
    ("cyclic", 1, "prev_frames_2", None),
    ("rope", 0, "first_frame", "int8"),
])
def test_stream_engine_on_device(tpe_mode, sink, spatial_prefix, cache_dtype):
    """The stream engine with its pool on the device: guided and plain streams with and without given frames, a
    switch with re-encode, a branch from a saved state, a close and a reopened row, decoded by the VAE there."""
    model_cfg = dict(load_config(ROOT / "configs" / "debug" / "tiny.py").model, tpe_mode=tpe_mode, max_tpe_len=9,
                     spatial_prefix=spatial_prefix, in_channels=12)
    model = causalvdm.build_model(model_cfg).to(META).eval()
    vae = build(VAES, dict(type="PixelVAE", factor=2), "vae").to(META)
    engine = StreamEngine(model, IDDPM(), vae, latent_size=(4, 4), max_rows=6, sampler="ddim", num_steps=2,
                          chunk_size=2, max_cond_frames=4, cfg_scale=2.0, prefix_perturb_t=20, sink_frames=sink,
                          cache_dtype=cache_dtype)
    y = torch.randn(1, 6, 16)  # captions and given frames on the CPU, as a user's may be
    a = engine.open(torch.randn(1, 12, 3, 4, 4), y=y, seed=0)
    b = engine.open(seed=1)
    chunks = []
    for tick in range(12):
        if tick == 3:
            engine.switch(a, torch.randn(1, 6, 16), recache=True)
        if tick == 5:
            engine.open(state=engine.save(a), seed=2)
            engine.close(b)
            engine.open(torch.randn(1, 12, 1, 4, 4), seed=3)
        chunks += engine.step()
    assert {chunk.stream for chunk in chunks} == {0, 1, 2, 3}
    assert all(c.latents.device == META and c.frames.device == META and c.frames.shape == (1, 3, 2, 8, 8)
               for c in chunks)
    assert all(t.device == META for t in _cache_tensors(engine.pool))


def test_pooled_call_sends_rows_not_tokens():
    """A pooled call's tables go to the device per row and are repeated per token there: its scatter index (R*S, H,
    T, Dh) is a view of an (R*S, T) table made on the device. Copied to the device once expanded it was a full
    tensor: 151 MB from the host on every call for the paper's model at 8 streams (where host-to-device copies took
    6% of an H200's time)."""
    model = causalvdm.build_model(load_config(ROOT / "configs" / "debug" / "tiny.py").model).to(META).eval()
    engine = StreamEngine(model, IDDPM(), latent_size=(4, 4), max_rows=3, sampler="ddim", num_steps=2, chunk_size=2,
                          max_cond_frames=4)
    for seed in range(2):
        engine.open(torch.randn(1, model.in_channels, 1, 4, 4), seed=seed)
    while engine._denoise_context is None:  # the first tick writes the given frames
        engine.step()
    index = engine._denoise_context.call.cache._index
    rows_tokens, _, frames, _ = index.shape
    assert index.device == META and index.untyped_storage().nbytes() == rows_tokens * frames * index.element_size()


def _cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor a KVCache holds that its calls read on the device."""
    tensors = []
    for value in vars(cache).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if torch.is_tensor(item) and item.dim() >= 3:  # buffers; the small position tables stay on the host
                tensors.append(item)
    return tensors


def test_pipeline_on_device(tmp_path, t5_dir):
    """An image through the VAE, the prompt through T5, then chunks through the generator, all on the device; the
    decode (frames to the host for the writer) is where the device path ends."""
    vae = build(VAES, dict(type="PixelVAE", factor=2), "vae")
    text_encoder = build(TEXT_ENCODERS, dict(type="T5Encoder", from_pretrained=str(t5_dir), model_max_length=6),
                         "text_encoder")
    model_cfg = dict(load_config(ROOT / "configs" / "debug" / "tiny.py").model, in_channels=12, max_tpe_len=17)
    model = causalvdm.build_model(model_cfg)
    ar = AutoregressiveSettings(chunk_size=4, max_cond_frames=4, sink_frames=1)
    sample = SampleSettings(sampler="ddim", num_steps=2, cfg_scale=2.0, dtype="float32")
    pipe = CausalVDMPipeline(model, vae, IDDPM(), OnDevice(text_encoder), ar, sample, image_size=(8, 8),
                             device=META)
    latents = []
    pipe._decode = lambda first, chunks, *rest: (latents.append(first), latents.extend(chunks))
    pipe.iter_chunks(first_image=np.zeros((8, 8, 3), np.uint8), prompt="red", num_frames=9,
                     prompts=[{"frame": 5, "prompt": "blue"}], recache_on_switch=True)
    assert [tuple(z.shape) for z in latents] == [(1, 12, 1, 4, 4), (1, 12, 4, 4, 4), (1, 12, 4, 4, 4)]
    assert all(z.device == META for z in latents)


@pytest.mark.parametrize("preset", ["paper"])
def test_benchmark_preset_on_device(preset):
    """The benchmark preset's model (XL/2's width and heads on 32x32 latents, 120 text tokens, bf16, guidance, its
    chunk and queue) through a prefill, two cached chunks and their commits, and the recompute baseline, and four
    streams through the stream engine with an int8 cache, on the device. Two of its 28 blocks: every block runs the
    same code, and meta ops cost milliseconds each."""
    from causalvdm.benchmarks.ar import PRESETS

    cfg = load_config(ROOT / PRESETS[preset]["config"])
    ar = AutoregressiveSettings.from_cfg(cfg.get("autoregressive"))
    with META:
        model = causalvdm.build_model(dict(split_init_fields(cfg.model)[0], depth=2)).to(torch.bfloat16).eval()
    h, w = (n // 8 for n in cfg.sample.image_size)  # the SD VAE's factor 8: 32x32 latents
    y = torch.randn(1, model.model_max_length, model.caption_channels)
    for mode in ("cache", "recompute"):
        gen = AutoregressiveGenerator(model, IDDPM(), "ddim", 1, ar.chunk_size, ar.max_cond_frames, cfg_scale=4.0,
                                      prefix_perturb_t=ar.prefix_perturb_t, sink_frames=ar.sink_frames, mode=mode)
        video = gen.generate(torch.randn(1, model.in_channels, 1, h, w), 1 + 2 * ar.chunk_size, y, seed=0)
        assert video.device == META and video.shape == (1, model.in_channels, 1 + 2 * ar.chunk_size, h, w)
    # The streams benchmark's engine at the same preset: four guided streams, the cache in int8, a chunk each.
    engine = StreamEngine(model, IDDPM(), latent_size=(h, w), max_rows=8, sampler="ddim", num_steps=1,
                          chunk_size=ar.chunk_size, max_cond_frames=ar.max_cond_frames, cfg_scale=4.0,
                          prefix_perturb_t=ar.prefix_perturb_t, sink_frames=ar.sink_frames, cache_dtype="int8")
    for seed in range(4):
        engine.open(torch.randn(1, model.in_channels, 1, h, w), y=y, seed=seed)
    chunks = engine.step() + engine.step()
    assert len(chunks) == 4 and all(c.latents.device == META for c in chunks)
