"""Validation clips while training: a clip sampled from the first frame of the first training clip with the EMA
weights, through the same pipeline (decode, recorder) as causalvdm-sample, into samples/step_N.mp4."""

import logging
from pathlib import Path

import torch

from causalvdm.config import AutoregressiveSettings
from causalvdm.pipeline import CausalVDMPipeline
from causalvdm.registry import MODELS, ConfigError, build
from causalvdm.sampling import AutoregressiveGenerator
from causalvdm.sampling.settings import SampleSettings
from causalvdm.sampling.writer import StreamingVideoWriter

log = logging.getLogger("causalvdm.train")


class Validator:
    """Samples validation clips of `frames` frames with `schedule` (sampler, steps) from a fresh `model_cfg` model.

    Built before step 1 from the training model `core`: a length the cache and the TPE cannot sample fails then, in
    one line naming train.validation_every (every N steps) and train.validation_frames.
    """

    def __init__(self, model_cfg: dict, core: torch.nn.Module, vae, diffusion, text_encoder,
                 ar: AutoregressiveSettings, schedule: tuple[str, int], frames: int, every: int, device):
        self.model_cfg, self.vae, self.diffusion, self.text_encoder = model_cfg, vae, diffusion, text_encoder
        self.ar = ar
        self.sampler, self.num_steps = schedule
        self.frames, self.device = frames, device
        try:
            AutoregressiveGenerator(core, diffusion, self.sampler, self.num_steps, ar.chunk_size, ar.max_cond_frames,
                                    prefix_perturb_t=ar.prefix_perturb_t,
                                    sink_frames=ar.sink_frames).check_length(1, frames)
        except ValueError as err:
            raise ConfigError(f"train.validation_every={every} samples {frames} frames "
                              f"(train.validation_frames), but {err}") from None
        log.info("validation every %d steps: %d frames, %s %d steps, decoded by %s", every, frames, self.sampler,
                 self.num_steps, type(vae).__name__)

    def sample(self, ema_state: dict, first_latents: torch.Tensor, caption: str, seed: int, path: Path) -> None:
        """Write the clip that follows `first_latents` (1, C, 1, h, w) under `caption` to the mp4 `path`."""
        model = build(MODELS, self.model_cfg, "model")
        model.load_state_dict(ema_state)
        sample = SampleSettings(sampler=self.sampler, num_steps=self.num_steps, dtype="float32")
        pipe = CausalVDMPipeline(model, self.vae, self.diffusion, self.text_encoder, self.ar, sample,
                                 device=self.device)
        height, width = (n * self.vae.downsample for n in first_latents.shape[-2:])
        with StreamingVideoWriter(path, 8, width, height) as writer:
            pipe(first_latents=first_latents, prompt=caption, seed=seed, num_frames=self.frames, writer=writer,
                 output_type=None)
        log.info("validation clip: %s", path)
