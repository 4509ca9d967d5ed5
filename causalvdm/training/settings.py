"""The trainer's settings (`train = dict(...)` in a config), with every default declared once here."""

import math
from dataclasses import dataclass

from causalvdm.config import AutoregressiveSettings, check_range, settings_from
from causalvdm.diffusion.clean_prefix import TPE_OFFSETS
from causalvdm.diffusion.samplers import SAMPLERS
from causalvdm.models.layout import check_layout
from causalvdm.registry import ConfigError


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """The learning rate at optimizer step `step` (0-based) as a fraction of train.lr: linear warm-up, then
    constant or a half cosine that reaches 0 at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))))


@dataclass
class TrainSettings:
    """Everything the training loop reads from `cfg.train`; unknown keys are config errors."""

    seed: int = 0
    outputs_dir: str = "outputs"
    max_steps: int = 1000
    batch_size: int = 1  # per process
    grad_accum_steps: int = 1
    num_workers: int | None = None  # DataLoader workers per process; None: default_num_workers() for this machine
    lr: float = 2e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # after warm-up: "constant" | "cosine" (to 0 at max_steps)
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    txt_dropout_prob: float = 0.1
    timestep_power: float = 1.0  # > 1: the chunk's training timesteps lean to low noise (clean_prefix_loss)
    tpe_offsets: str = "always"  # random cyclic-TPE offsets: "always" | "full_window" (p + k = max_tpe_len only)
    parallel: str = "ddp"  # "ddp" | "fsdp" (FSDP2 fully_shard per block)
    mixed_precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp32"
    grad_checkpointing: bool = False
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    max_nonfinite_steps: int = 10  # stop after this many non-finite losses in a row
    validation_every: int = 0  # sample a clip every N steps into samples/ (0: never)
    validation_frames: int = 0  # frames of that clip (0: twice model.max_tpe_len)
    validation_sampler: str = "ddim"
    validation_steps: int = 25
    wandb: bool = False  # log to wandb in offline mode as well (pip install -e ".[wandb]")

    @classmethod
    def from_cfg(cls, train_cfg) -> "TrainSettings":
        """Validate `cfg.train` against the declared fields -> TrainSettings."""
        settings = settings_from(cls, "train", dict(train_cfg or {}))
        if settings.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel must be 'ddp' or 'fsdp', got {settings.parallel!r}")
        if settings.mixed_precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.mixed_precision must be 'auto', 'bf16' or 'fp32', got {settings.mixed_precision!r}")
        if settings.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                              f"got {settings.lr_schedule!r}")
        if settings.tpe_offsets not in TPE_OFFSETS:
            raise ConfigError(f"train.tpe_offsets must be one of {', '.join(TPE_OFFSETS)}, "
                              f"got {settings.tpe_offsets!r}")
        if settings.validation_sampler not in SAMPLERS:  # read at the first validation: checked before step 1
            raise ConfigError(f"train.validation_sampler must be one of {', '.join(SAMPLERS)}, "
                              f"got {settings.validation_sampler!r}")
        check_range("train", settings, 1, None, "max_steps", "batch_size", "grad_accum_steps", "log_every",
                    "ckpt_every", "keep_last", "max_nonfinite_steps", "validation_steps")
        check_range("train", settings, 0, None, "seed", "num_workers", "lr", "weight_decay", "warmup_steps",
                    "validation_every", "validation_frames")
        check_range("train", settings, 0, 1, "ema_decay", "txt_dropout_prob")
        if settings.grad_clip <= 0:  # clipping to a norm of 0 would zero every gradient
            raise ConfigError(f"train.grad_clip must be > 0, got {settings.grad_clip}")
        if settings.timestep_power <= 0:  # a power of 0 would draw only the noisiest timestep
            raise ConfigError(f"train.timestep_power must be > 0, got {settings.timestep_power}")
        if not all(0 <= b < 1 for b in settings.adam_betas):
            raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {settings.adam_betas}")
        return settings


def check_clip_shape(model, latent_shape, ar: AutoregressiveSettings) -> None:
    """Fail before training if one clip's latents (C, T, h, w) cannot go through `model` in the layout of `ar`, or
    if no sampler could use that layout (found now, not after the run)."""
    chunk_size = ar.chunk_size
    channels, frames, height, width = latent_shape
    ph, pw = model.patch_size[1:]
    if channels != model.in_channels:
        raise ConfigError(f"model.in_channels={model.in_channels}, but the VAE gives {channels} latent channels")
    if height % ph or width % pw:
        raise ConfigError(f"dataset.image_size gives {height}x{width} latents, not a multiple of the {ph}x{pw} patch: "
                          "the image size must be a multiple of the VAE factor times the patch size")
    if model.tpe_mode != "rope" and frames > model.max_tpe_len:
        raise ConfigError(f"dataset.num_frames={frames} exceeds model.max_tpe_len={model.max_tpe_len} "
                          f"({model.tpe_mode} TPE); use at most {model.max_tpe_len} frames or a longer table")
    if frames < 1 + chunk_size:
        raise ConfigError(f"dataset.num_frames={frames} must hold one clean frame plus a chunk of "
                          f"autoregressive.chunk_size={chunk_size}")
    try:
        check_layout(model, chunk_size, ar.max_cond_frames, ar.sink_frames)
    except ValueError as err:
        raise ConfigError(f"autoregressive: {err}") from None
