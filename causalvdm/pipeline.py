"""Weights -> frames: the model, VAE, text encoder and autoregressive generator behind one call.

    pipe = CausalVDMPipeline.from_pretrained("outputs/demo/checkpoints/step_00002000")
    frames = pipe(first_image="cat.png", num_frames=81, seed=0)     # uint8 (81, H, W, 3)
    pipe.save_pretrained("cat_model")                               # config.json + model.safetensors

The decode / timing loop lives here once; the sampling command line (causalvdm/cli/sample.py) and the trainer's
validation call it, and a VideoRecorder (sampling/recorder.py) keeps PSNR, drift and contact-sheet frames per chunk.
"""

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from causalvdm.config import AutoregressiveSettings, load_config
from causalvdm.data.transforms import to_size, video_transform
from causalvdm.data.video_io import VideoReadError, iter_video_frames, read_image
from causalvdm.models.pretrained import load_pretrained, split_init_fields
from causalvdm.models.saved_config import check_saved_config
from causalvdm.registry import MODELS, SCHEDULERS, TEXT_ENCODERS, VAES, ConfigError, build
from causalvdm.sampling import AutoregressiveGenerator
from causalvdm.sampling.deblock import deblock_frames, token_pixels
from causalvdm.sampling.drift import DriftMonitor
from causalvdm.sampling.recorder import VideoRecorder
from causalvdm.sampling.settings import SampleSettings, image_size_of
from causalvdm.sampling.writer import ContactSheetCollector, to_uint8
from causalvdm.serving import StreamEngine
from causalvdm.utils.dtypes import resolve_dtype
from causalvdm.utils.weights import PIPELINE_CONFIG, load_checkpoint_weights, pretrained_config_path

log = logging.getLogger("causalvdm.pipeline")


def _source_name(source) -> str | None:
    """A path source as the sidecar records it; in-memory frames are not recorded."""
    return str(source) if isinstance(source, (str, Path)) else None


# ------------------------------------------------------------------------------------------ the pipeline
class CausalVDMPipeline:
    """Model + VAE + text encoder + diffusion, sampling videos chunk by chunk through the shared KV cache.

    model: CausalSTDiT (moved to `device`, cast in place to `dtype`: 'auto' = bf16 on CUDA, fp32 on CPU);
    vae: encode (B, 3, T, H, W) <-> decode (B, C, T, h, w); text_encoder: None or `encode([prompt]) -> (y, mask)`;
    sample: the call defaults (SampleSettings); image_size: (H, W) first images/videos are resized to (default:
    sample.image_size). After a video, `self.info` holds its record: settings, timings, PSNR, per-chunk drift
    statistics (the CLI's sidecar); `self.recorder` (a VideoRecorder: `drift`, `contact_sheet`) is filled as chunks
    are made.
    """

    def __init__(self, model, vae, diffusion, text_encoder=None, autoregressive: AutoregressiveSettings | None = None,
                 sample: SampleSettings | None = None, image_size=None, device=None, progress: bool = False,
                 config: dict | None = None):
        self.defaults = sample or SampleSettings()
        self.autoregressive = autoregressive or AutoregressiveSettings()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.vae = vae.to(self.device).eval()
        if vae.out_channels != model.in_channels:
            raise ConfigError(f"vae has {vae.out_channels} latent channels, model.in_channels is {model.in_channels}")
        self.text_encoder = text_encoder if model.caption_channels else None  # unconditional: prompts are ignored
        if self.text_encoder is not None:
            if text_encoder.output_dim != model.caption_channels:
                raise ConfigError(f"text_encoder.output_dim={text_encoder.output_dim} but model.caption_channels="
                                  f"{model.caption_channels}")
            if isinstance(text_encoder, torch.nn.Module):
                text_encoder.to(self.device)
        self.diffusion = diffusion
        size = image_size or self.defaults.image_size
        self.image_size = to_size(size) if size is not None else None
        self.dtype = resolve_dtype(self.defaults.dtype, self.device)
        self.progress = progress
        self.config = config  # the model/vae/text_encoder/diffusion dicts save_pretrained writes
        self.info: dict = {}
        self.recorder = VideoRecorder()  # of the last video
        # Built now so bad settings (chunk and queue beyond the TPE) fail here; rebuilt only when a call changes
        # them, so a compiled step is compiled once.
        self._generator_key = None
        self.generator = self._generator(self.defaults.sampler, self.defaults.num_steps, self.defaults.cfg_scale,
                                         self.defaults.mode)

    @property
    def drift(self) -> DriftMonitor | None:
        """The last video's per-chunk drift statistics, filled as chunks are made (`self.recorder.drift`)."""
        return self.recorder.drift

    @property
    def token_pixels(self) -> tuple[int, int]:
        """(height, width) in pixels of one model token: the VAE's downsampling times the patch size."""
        return token_pixels(self.vae, self.model)

    @property
    def contact_sheet(self) -> ContactSheetCollector | None:
        """The last video's contact-sheet frames; `.save(path)` writes the PNG (`self.recorder.contact_sheet`)."""
        return self.recorder.contact_sheet

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, cfg, sample: SampleSettings | None = None, device=None,
                    progress: bool = False) -> "CausalVDMPipeline":
        """Build from an mmengine config; weights from `sample.ckpt` (else model.from_pretrained, else untrained).

        sample: the settings (default: cfg.sample); device: default CUDA if available, else the CPU.
        Raises ConfigError / CheckpointError with one-line messages.
        """
        sample = sample or SampleSettings.from_cfg(cfg.get("sample"))
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model_cfg, pretrained, strict = split_init_fields(cfg.model)
        model = build(MODELS, model_cfg, "model")
        if sample.ckpt:
            check_saved_config(sample.ckpt, cfg)
            log.info("weights: %s", load_checkpoint_weights(model, sample.ckpt, sample.weights))
        elif pretrained:
            load_pretrained(model, pretrained, strict=strict)
        else:
            log.warning("no checkpoint: sampling from untrained weights")
        vae = build(VAES, cfg.get("vae"), "vae")
        text_encoder = build(TEXT_ENCODERS, cfg.get("text_encoder"), "text_encoder") if model.caption_channels else None
        diffusion = build(SCHEDULERS, cfg.get("diffusion"), "diffusion")
        ar = AutoregressiveSettings.from_cfg(cfg.get("autoregressive"))
        components = {k: cfg.get(k) for k in ("vae", "text_encoder", "diffusion", "distill")}
        config = dict(model=model_cfg, **{k: v for k, v in components.items() if v is not None})
        try:
            return cls(model, vae, diffusion, text_encoder, ar, sample, image_size_of(cfg, sample, vae), device,
                       progress, config)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype: str | None = None, weights: str = "ema",
                        compile: bool | str = False, cache_dtype: str | None = None) -> "CausalVDMPipeline":
        """Load a training checkpoint directory (outputs/EXP/checkpoints/step_N) or a save_pretrained folder.

        The config saved beside the weights is used; offline, safetensors only. weights: 'ema' | 'model' of a
        training checkpoint; dtype: None = the config's sample.dtype (default auto); compile: True or a
        torch.compile mode (False: the config's sample.compile, eager by default); cache_dtype: 'int8' or
        'float8_e4m3fn' stores the KV cache in 8 bits (None: the config's sample.cache_dtype).
        """
        cfg = load_config(pretrained_config_path(path))
        compile = "default" if compile is True else compile or None
        sample = SampleSettings.from_cfg(cfg.get("sample"), dict(ckpt=str(path), weights=weights, dtype=dtype,
                                                                 compile=compile, cache_dtype=cache_dtype))
        return cls.from_config(cfg, sample, device)

    def save_pretrained(self, path: str | Path, overwrite: bool = False) -> None:
        """Write config.json (model, vae, text_encoder, diffusion, autoregressive, sample) + model.safetensors into a
        new or empty folder, both at once (written beside it, then renamed in); overwrite: replace an earlier
        save_pretrained folder. A folder holding anything else (a training checkpoint) is refused.

        The weights are saved as held (bf16 when the pipeline runs in bf16); the VAE and text encoder entries keep
        pointing at their own local folders.
        """
        if self.config is None:
            raise ValueError("save_pretrained needs a pipeline built by from_config / from_pretrained (its config)")
        path = Path(path).expanduser()
        held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path}: is a file, not a folder")
        if held and held != sorted((PIPELINE_CONFIG, "model.safetensors")):
            raise ValueError(f"{path}: holds other files ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); "
                             "save into a new or empty folder")
        if held and not overwrite:
            raise ValueError(f"{path}: holds an earlier save_pretrained; pass overwrite=True to replace it")
        sample = asdict(replace(self.defaults, ckpt=None, image_size=self.image_size))
        config = dict(self.config, autoregressive=asdict(self.autoregressive), sample=sample)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
                      str(staging / "model.safetensors"))
            (staging / PIPELINE_CONFIG).write_text(json.dumps(config, indent=2))
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            if held:  # moved aside first, so a crash here leaves one whole folder or the other
                os.replace(path, old)
            elif path.is_dir():
                path.rmdir()
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _generator(self, sampler: str, num_steps: int, cfg_scale: float, mode: str) -> AutoregressiveGenerator:
        """The generator of these settings (the last one again when they have not changed)."""
        key = (sampler, num_steps, cfg_scale, mode)
        if key != self._generator_key:
            ar = self.autoregressive
            self.generator = AutoregressiveGenerator(
                self.model, self.diffusion, sampler, num_steps, ar.chunk_size, ar.max_cond_frames, cfg_scale,
                ar.prefix_perturb_t, mode=mode, progress=self.progress, dtype=self.dtype,
                compile=self.defaults.compile or False, recompute_positions=self.defaults.recompute_positions,
                sink_frames=ar.sink_frames, cache_dtype=self.defaults.cache_dtype)
            self._generator_key = key
        return self.generator

    def stream_engine(self, max_rows: int = 8, sampler: str | None = None, num_steps: int | None = None,
                      cfg_scale: float | None = None, cache_dtype: str | None = None,
                      compile: bool = False, deblock: float | None = None) -> StreamEngine:
        """A StreamEngine over this pipeline's model, diffusion and VAE, with its chunking, queue, sink and sampling
        defaults (each overridable here), for streams of its image size."""
        ar, s = self.autoregressive, self.defaults
        h, w = self._size()
        factor = self.vae.downsample  # the model is in self.dtype already: the generator cast it
        return StreamEngine(self.model, self.diffusion, self.vae, latent_size=(h // factor, w // factor),
                            max_rows=max_rows, sampler=sampler or s.sampler, num_steps=num_steps or s.num_steps,
                            chunk_size=ar.chunk_size, max_cond_frames=ar.max_cond_frames,
                            cfg_scale=s.cfg_scale if cfg_scale is None else cfg_scale,
                            prefix_perturb_t=ar.prefix_perturb_t, sink_frames=ar.sink_frames,
                            cache_dtype=cache_dtype or s.cache_dtype, fps=s.fps, compile=compile,
                            deblock=s.deblock if deblock is None else deblock)

    # ------------------------------------------------------------------------------ sampling
    def __call__(self, first_image=None, first_video=None, first_frames: int | None = None, first_latents=None,
                 prompt: str | None = None, num_frames: int | None = None, seed: int | None = None,
                 sampler: str | None = None, num_steps: int | None = None, cfg_scale: float | None = None,
                 mode: str | None = None, writer=None, output_type: str | None = "np", prompts=None,
                 recache_on_switch: bool | None = None, recorder: VideoRecorder | None = None,
                 deblock: float | None = None):
        """Sample one video -> uint8 (T, H, W, 3) ('np'), float (3, T, H, W) in [-1, 1] ('pt') or None.

        Arguments as for `iter_chunks`; writer: anything with `write(frames (t, H, W, 3) uint8)`, e.g. a
        StreamingVideoWriter, fed each chunk as it is decoded. output_type=None keeps nothing in memory.
        """
        if output_type not in ("np", "pt", None):
            raise ValueError(f"output_type must be 'np', 'pt' or None, got {output_type!r}")
        chunks = []
        for pixels in self.iter_chunks(first_image, first_video, first_frames, first_latents, prompt, num_frames,
                                       seed, sampler, num_steps, cfg_scale, mode, output_type="pt", prompts=prompts,
                                       recache_on_switch=recache_on_switch, recorder=recorder, deblock=deblock):
            frames = to_uint8(pixels) if writer is not None or output_type == "np" else None
            if writer is not None:
                writer.write(frames)
            if output_type is not None:
                chunks.append(frames if output_type == "np" else pixels)
        if output_type is None:
            return None
        return np.concatenate(chunks) if output_type == "np" else torch.cat(chunks, dim=1)

    def iter_chunks(self, first_image=None, first_video=None, first_frames: int | None = None, first_latents=None,
                    prompt: str | None = None, num_frames: int | None = None, seed: int | None = None,
                    sampler: str | None = None, num_steps: int | None = None, cfg_scale: float | None = None,
                    mode: str | None = None, output_type: str = "np", prompts=None,
                    recache_on_switch: bool | None = None, recorder: VideoRecorder | None = None,
                    deblock: float | None = None):
        """Yield the decoded video, given frames first, then chunk by chunk: uint8 (t, H, W, 3) or float (3, t, H, W).

        Given frames, at most one of: first_image (a path or uint8 (H, W, 3)); first_video (a path or float
        (3, T, H, W) in [-1, 1]: its first `first_frames` frames are given, the later ones are the PSNR reference);
        first_latents (1, C, n0, h, w), already encoded. Paths are resized and centre-cropped to `image_size`.
        prompts: prompt switches [{"frame": j, "prompt": "..."}], each j a chunk boundary (n0 + i * chunk_size);
        recache_on_switch: re-encode the cached frames in view under the new prompt (else they keep the old one).
        recorder: a VideoRecorder fed each decoded chunk (default: a new one); it becomes `self.recorder`.
        deblock: strength of the filter on the generated frames' token borders (`sampling.deblock`; 0 off).
        The other arguments default to `self.defaults`. Checks run at call time; `self.info` is set when done.
        """
        if output_type not in ("np", "pt"):
            raise ValueError(f"output_type must be 'np' or 'pt', got {output_type!r}")
        start = time.perf_counter()
        self.info = {}
        if sum(s is not None for s in (first_image, first_video, first_latents)) > 1:
            raise ValueError("give at most one of first_image, first_video and first_latents")
        settings = SampleSettings.from_cfg(asdict(self.defaults), dict(  # the call's values, checked like the config's
            first_frames=first_frames, prompt=prompt, num_frames=num_frames, seed=seed, sampler=sampler,
            num_steps=num_steps, cfg_scale=cfg_scale, mode=mode, prompts=prompts, recache_on_switch=recache_on_switch,
            deblock=deblock))
        settings = replace(settings, num_frames=settings.num_frames or self.model.max_tpe_len,
                           first_image=_source_name(first_image), first_video=_source_name(first_video))
        generator = self._generator(settings.sampler, settings.num_steps, settings.cfg_scale, settings.mode)
        pixels, reference = self._given_pixels(first_image, first_video, settings.first_frames)
        with torch.inference_mode():
            if first_latents is not None:
                first = first_latents.to(self.device)
            elif pixels is not None:
                first = self.vae.encode(pixels[None].to(self.device))  # (1, C, n0, h, w)
            else:
                log.warning("no first frames: the first chunk is generated from the prompt alone "
                            "(the model is trained with at least one given frame)")
                h, w = self._size()
                f = self.vae.downsample
                first = torch.zeros(1, self.model.in_channels, 0, h // f, w // f, device=self.device)
            generator.check_switches(first.shape[2], settings.num_frames, [e["frame"] for e in settings.prompts])
            y, mask = self.encode_prompt(settings.prompt)
            switches = [(e["frame"], *self.encode_prompt(e["prompt"])) for e in settings.prompts]
            if switches and self.text_encoder is None:  # no text to change; a re-encode would only drop old context
                log.warning("an unconditional model ignores the prompt switches")
                switches = []
        chunks = generator.iter_chunks(first, settings.num_frames, y, mask, seed=settings.seed,  # checks the lengths
                                       switches=switches, recache_on_switch=settings.recache_on_switch)
        self.recorder = recorder or VideoRecorder()
        stream = self._decode(first, chunks, pixels, reference, settings, generator, start, self.recorder)
        return stream if output_type == "pt" else (to_uint8(video) for video in stream)

    def encode_prompt(self, prompt: str):
        """A prompt -> text tokens y (1, L, C_text), mask (1, L); (None, None), the null caption, for an empty prompt
        or an unconditional model."""
        if self.text_encoder is None or not prompt:
            return None, None
        return self.text_encoder.encode([prompt])

    def _size(self) -> tuple[int, int]:
        if self.image_size is None:
            raise ValueError("this pipeline has no image_size: give first frames as a tensor or set sample.image_size")
        return self.image_size

    def _given_pixels(self, first_image, first_video, n0: int):
        """The given frames (3, n0, H, W) in [-1, 1] (None without any) and an iterator of the later real frames
        (3, H, W) of first_video (None without one)."""
        if first_image is not None:
            frame = read_image(first_image) if isinstance(first_image, (str, Path)) else np.asarray(first_image)
            if frame.shape[:2] != self._size():
                log.info("%s: %dx%d resized and centre-cropped to %dx%d", _source_name(first_image) or "first image",
                         frame.shape[1], frame.shape[0], self.image_size[1], self.image_size[0])
            return video_transform(torch.from_numpy(frame.copy())[None], self.image_size), None
        if isinstance(first_video, torch.Tensor):  # already at its size, e.g. a dataset item
            if first_video.shape[1] < n0:
                raise ValueError(f"first_video has {first_video.shape[1]} frames, first_frames asks for {n0}")
            return first_video[:, :n0], iter(first_video[:, n0:].unbind(1))
        if first_video is not None:
            frames = iter_video_frames(first_video)
            given = [f for _, f in zip(range(n0), frames)]
            if len(given) < n0:
                raise VideoReadError(f"{first_video}: has {len(given)} frames, --first-frames asks for {n0}")
            if given[0].shape[:2] != self._size():
                log.info("%s: %dx%d frames resized and centre-cropped to %dx%d", first_video, given[0].shape[1],
                         given[0].shape[0], self.image_size[1], self.image_size[0])
            later = (video_transform(torch.from_numpy(f)[None], self.image_size)[:, 0] for f in frames)
            return video_transform(torch.from_numpy(np.stack(given)), self.image_size), later
        return None, None

    def _decode(self, first, chunks, pixels, reference, settings: SampleSettings, generator, start: float,
                recorder: VideoRecorder):
        """Decode the given frames, then each chunk as it is generated (its token borders deblocked by
        `settings.deblock`) -> pixels (3, t, H, W), each recorded by `recorder`; `self.info` (settings, timings and
        the recorder's summary) when done."""
        n0 = first.shape[2]
        written = 0
        recorder.begin(settings.num_frames, settings.eval_len or self.model.max_tpe_len, pixels, reference,
                       self.token_pixels)
        if n0:
            with torch.inference_mode():
                video = self.vae.decode(first)[0]  # (3, n0, H, W)
            recorder.add(video, given=True)
            written += n0
            yield video
        total = generator.num_chunks(n0, settings.num_frames)
        for latents in tqdm(chunks, total=total, desc="chunks", disable=not self.progress):
            with torch.inference_mode():
                video = deblock_frames(self.vae.decode(latents)[0], self.token_pixels, settings.deblock)  # (3, k, H, W)
            recorder.add(video)
            written += video.shape[1]
            yield video
        h, w = (s * self.vae.downsample for s in first.shape[-2:])
        self.info = dict(
            prompt=settings.prompt, seed=settings.seed, first_image=settings.first_image,
            first_video=settings.first_video, given_frames=n0, frames=written, fps=settings.fps, size=[h, w],
            settings=asdict(settings), timesteps=generator.sampler.timesteps.tolist(),
            autoregressive=dict(chunk_size=generator.chunk_size, max_cond_frames=generator.max_cond_frames,
                                prefix_perturb_t=generator.prefix_perturb_t),
            device=str(self.device), prefill_seconds=generator.prefill_time, chunk_seconds=generator.chunk_times,
            total_seconds=time.perf_counter() - start, **recorder.summary(),
        )
