"""Frame-wise Stable Diffusion VAE (diffusers `AutoencoderKL`) loaded from a local folder, e.g. sd-vae-ft-ema."""

import torch
from torch import nn

from causalvdm.registry import VAES, ConfigError
from causalvdm.utils.dtypes import resolve_dtype
from causalvdm.utils.weights import check_model_dir


@VAES.register_module()
class SDVAE(nn.Module):
    """Frozen 2D AutoencoderKL applied to every frame: (B, 3, T, H, W) in [-1, 1] <-> (B, 4, T, H/8, W/8).

    Latents are scaled by `scaling_factor` (0.18215 for SD VAEs). Frames go through the VAE in
    micro-batches of `micro_batch_size` to bound activation memory on long clips.
    """

    def __init__(self, from_pretrained: str, scaling_factor: float = 0.18215, micro_batch_size: int = 16,
                 dtype: str = "auto", sample_posterior: bool = False):
        super().__init__()
        from diffusers import AutoencoderKL  # deferred: diffusers is slow to import and only needed here

        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        directory = check_model_dir(from_pretrained, "vae.from_pretrained", "diffusers AutoencoderKL (sd-vae-ft-ema)")
        try:
            # low_cpu_mem_usage=False: the VAE is small, and the fast path needs `accelerate`
            self.vae = AutoencoderKL.from_pretrained(
                directory, local_files_only=True, torch_dtype=resolve_dtype(dtype), low_cpu_mem_usage=False
            )
        except (OSError, ValueError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"{directory}: cannot load AutoencoderKL ({reason[:200]}) (check vae.from_pretrained)") from err
        self.vae.requires_grad_(False).eval()
        self.scaling_factor = scaling_factor
        self.micro_batch_size = micro_batch_size
        self.sample_posterior = sample_posterior
        self.out_channels = self.vae.config.latent_channels
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _framewise(self, fn, x: torch.Tensor) -> torch.Tensor:
        """Apply `fn` to the frames of x (B, C, T, H, W) in micro-batches -> (B, C', T, H', W') in x's dtype."""
        b, _, t = x.shape[:3]
        dtype = next(self.vae.parameters()).dtype  # read at call time, so a later .to(dtype) is honoured
        frames = x.transpose(1, 2).flatten(0, 1).to(dtype)  # (B*T, C, H, W)
        out = torch.cat([fn(part) for part in frames.split(self.micro_batch_size)])  # (B*T, C', H', W')
        return out.unflatten(0, (b, t)).transpose(1, 2).to(x.dtype)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels (B, 3, T, H, W) in [-1, 1] -> scaled latents (B, C_lat, T, H/f, W/f).

        The posterior mean by default; a sample (drawn with `generator`) when `sample_posterior`.
        """
        def encode_frames(frames):
            posterior = self.vae.encode(frames).latent_dist
            z = posterior.sample(generator) if self.sample_posterior else posterior.mode()
            return z * self.scaling_factor

        return self._framewise(encode_frames, x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C_lat, T, h, w) -> pixels (B, 3, T, h f, w f), roughly in [-1, 1]."""
        return self._framewise(lambda frames: self.vae.decode(frames / self.scaling_factor).sample, z)
