"""What a sampling run reads from `cfg.sample`: `SampleSettings`, every default declared and every value checked in one
line before a model is built; the prompt-switch schedule, a few-step student's own sampler and steps, and the frame
size."""

import logging
from dataclasses import dataclass
from pathlib import Path

from causalvdm.config import check_range, load_config, settings_from
from causalvdm.data.transforms import to_size
from causalvdm.diffusion.samplers import SAMPLERS
from causalvdm.models.kv_quant import CACHE_DTYPES
from causalvdm.registry import ConfigError, check_type
from causalvdm.sampling.generator import COMPILE_MODES, RECOMPUTE_POSITIONS
from causalvdm.utils.dtypes import DTYPES
from causalvdm.utils.weights import CheckpointError, pretrained_config_path

log = logging.getLogger("causalvdm.pipeline")  # the pipeline's log: these settings are resolved for it


@dataclass
class SampleSettings:
    """What sampling reads from `cfg.sample`, every default declared here; call arguments and flags override them."""

    sampler: str = "iddpm"  # iddpm | ddim | dpm-solver++
    num_steps: int = 100
    cfg_scale: float = 1.0
    num_frames: int | None = None  # frames of each video, given ones included (default: model.max_tpe_len)
    fps: int = 8
    # x264 CRF of the mp4, 1-51, lower is closer to the frames (0, lossless, makes a file browsers do not play). At
    # 32x32 the codec's 4x4 / 8x8 blocks are token-sized, and 18 adds block edges of its own on top of the model's.
    crf: int = 18
    # Deblocking of the generated frames' token borders (`sampling.deblock`), as a codec's filter at its block borders:
    # 0 off, 1 the strength the demo uses; the latents, and so the cache and every later chunk, are never changed.
    deblock: float = 0.0
    image_size: int | tuple[int, int] | None = None  # (H, W) of the frames (default: dataset.image_size)
    seed: int = 0
    mode: str = "cache"  # cache | recompute (the baseline without a cache)
    recompute_positions: str = "absolute"  # recompute window after eviction: absolute (as the cache) | window (from 0)
    prompt: str = ""
    prompts: tuple[dict, ...] = ()  # prompt switches [{"frame": j, "prompt": "..."}]: from chunk boundary j on
    recache_on_switch: bool = False  # at a switch, re-encode the cached frames in view under the new prompt
    first_image: str | None = None
    first_video: str | None = None
    first_frames: int = 1  # frames taken from first_video
    eval_len: int | None = None  # PSNR summary over frames [n0, eval_len) (default: model.max_tpe_len)
    ckpt: str | None = None
    weights: str = "ema"  # ema | model: which weights of a training checkpoint directory
    dtype: str = "auto"  # weights and KV cache: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    compile: str | None = None  # torch.compile mode of the per-step model call (None: eager)
    cache_dtype: str | None = None  # KV cache storage: None (the weights' dtype) | int8 | float8_e4m3fn

    @classmethod
    def from_cfg(cls, sample_cfg, overrides: dict | None = None) -> "SampleSettings":
        """Validate `cfg.sample` against the declared fields, then apply the non-None overrides."""
        given = dict(sample_cfg or {})
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        if "first_image" in overrides or "first_video" in overrides:  # a source given here replaces the config's
            given.pop("first_image", None)
            given.pop("first_video", None)
        given.update(student_schedule(overrides.get("ckpt") or given.get("ckpt")))
        settings = settings_from(cls, "sample", {**given, **overrides})
        settings.prompts = check_prompts(settings.prompts, "sample.prompts")
        check_range("sample", settings, 1, None, "num_steps", "num_frames", "fps", "first_frames", "eval_len")
        check_range("sample", settings, 0, None, "seed", "cfg_scale", "deblock")
        check_range("sample", settings, 1, 51, "crf")
        if settings.mode not in ("cache", "recompute"):
            raise ConfigError(f"sample.mode must be 'cache' or 'recompute', got {settings.mode!r}")
        if settings.recompute_positions not in RECOMPUTE_POSITIONS:
            raise ConfigError(f"sample.recompute_positions must be one of {', '.join(RECOMPUTE_POSITIONS)}, "
                              f"got {settings.recompute_positions!r}")
        if settings.weights not in ("ema", "model"):
            raise ConfigError(f"sample.weights must be 'ema' or 'model', got {settings.weights!r}")
        if settings.first_image and settings.first_video:
            raise ConfigError("give a first image or a first video, not both")
        if settings.sampler not in SAMPLERS:  # checked before the (slow) model is built
            raise ConfigError(f"unknown sampler {settings.sampler!r} (known: {', '.join(SAMPLERS)})")
        if settings.dtype != "auto" and settings.dtype not in DTYPES:
            raise ConfigError(f"sample.dtype must be auto or one of {', '.join(DTYPES)}, got {settings.dtype!r}")
        if settings.compile is not None and settings.compile not in COMPILE_MODES:
            raise ConfigError(f"sample.compile must be one of {', '.join(COMPILE_MODES)}, got {settings.compile!r}")
        if settings.cache_dtype is not None and settings.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"sample.cache_dtype must be None or one of {', '.join(CACHE_DTYPES)}, "
                              f"got {settings.cache_dtype!r}")
        return settings


def check_prompts(entries, where: str) -> tuple[dict, ...]:
    """A prompt-switch schedule [{"frame": int, "prompt": str}, ...] -> its entries as plain dicts; a bad entry is a
    one-line ConfigError naming `where` and its index (whether the frames fit the video is checked when sampling)."""
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"frame", "prompt"}:
            raise ConfigError(f"{where}[{i}] must be {{\"frame\": FRAME, \"prompt\": TEXT}}, got {entry!r}")
        check_type(f"{where}[{i}].frame", entry["frame"], int)
        check_type(f"{where}[{i}].prompt", entry["prompt"], str)
    return tuple(dict(frame=entry["frame"], prompt=entry["prompt"]) for entry in entries)


def student_schedule(ckpt) -> dict:
    """{sampler, num_steps} of a few-step student (its config has a `distill` section, and the distiller wrote its
    schedule in `sample`) for a checkpoint directory or save_pretrained folder; {} for anything else (a weights file,
    a teacher)."""
    if ckpt is None or not Path(ckpt).is_dir():
        return {}
    try:
        cfg = load_config(pretrained_config_path(ckpt))
    except CheckpointError:
        return {}
    if not cfg.get("distill"):
        return {}
    schedule = dict(sampler=cfg.sample.sampler, num_steps=cfg.sample.num_steps)
    log.info("%s: a few-step student: %s in %d steps per chunk (--sampler / --num-steps override)", ckpt,
             schedule["sampler"], schedule["num_steps"])
    return schedule


def image_size_of(cfg, settings: SampleSettings, vae) -> tuple[int, int]:
    """(H, W) of the frames: sample.image_size, else dataset.image_size, else latent_size x VAE factor."""
    if settings.image_size is not None:
        size = to_size(settings.image_size)
    elif cfg.get("dataset") is not None and cfg.dataset.get("image_size") is not None:
        size = to_size(cfg.dataset.image_size)
    elif cfg.get("latent_size") is not None:
        size = tuple(int(s) * vae.downsample for s in cfg.latent_size)
    else:
        raise ConfigError(f"{cfg.filename}: set sample.image_size (no dataset.image_size or latent_size to derive it)")
    multiple = vae.downsample * 2  # latents must split into 2x2 patches
    if size[0] % multiple or size[1] % multiple:
        raise ConfigError(f"image size {size} must be a multiple of {multiple} (VAE factor x patch size)")
    return size
