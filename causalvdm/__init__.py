"""causalvdm: autoregressive video diffusion with causal generation and a shared KV-cache queue."""

from causalvdm import autoencoders, data, diffusion, models, text  # noqa: F401  (registers the builders)
from causalvdm.pipeline import CausalVDMPipeline
from causalvdm.registry import MODELS, ConfigError, build

__version__ = "0.1.0"


def build_model(cfg):
    """Build a model from its config dict (`cfg.model` of an mmengine config)."""
    return build(MODELS, cfg, "model")


__all__ = ["CausalVDMPipeline", "ConfigError", "build", "build_model"]
