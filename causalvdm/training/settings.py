"""The trainer's settings (`train = dict(...)` in a config), with every default declared once here."""

from dataclasses import dataclass, fields

from causalvdm.registry import ConfigError


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
    adam_betas: tuple = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    txt_dropout_prob: float = 0.1
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
        given = dict(train_cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ConfigError(f"train: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        settings = cls(**given)
        if settings.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel must be 'ddp' or 'fsdp', got {settings.parallel!r}")
        if settings.mixed_precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.mixed_precision must be 'auto', 'bf16' or 'fp32', got {settings.mixed_precision!r}")
        if settings.num_workers is not None and settings.num_workers < 0:
            raise ConfigError(f"train.num_workers must be >= 0, got {settings.num_workers}")
        for name in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "ckpt_every", "keep_last"):
            if getattr(settings, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(settings, name)}")
        return settings


def check_clip_shape(model, latent_shape, ar_size: int) -> None:
    """Fail before training if one clip's latents (C, T, h, w) cannot go through `model` with chunks of `ar_size`."""
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
    if frames < 1 + ar_size:
        raise ConfigError(f"dataset.num_frames={frames} must hold one clean frame plus a chunk of "
                          f"autoregressive.chunk_size={ar_size}")
