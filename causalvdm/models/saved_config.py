"""What a checkpoint's weights mean, read from the config saved beside them and held against the config in use.

Fields that change the meaning of the weights must agree (what the output predicts, its channels, the positions
the model was trained with, the layout of its context); fields that only change how it is sampled (sampler, steps,
guidance) may differ.
"""

import torch

from causalvdm.config import AutoregressiveSettings, load_config
from causalvdm.models.pretrained import split_init_fields
from causalvdm.registry import MODELS, SCHEDULERS, build
from causalvdm.utils.weights import CheckpointError, saved_config_path

MODEL_FIELDS = ("in_channels", "out_channels", "patch_size", "caption_channels", "null_caption", "tpe_mode",
                "max_tpe_len", "spatial_prefix", "chunk_bidirectional")
DIFFUSION_FIELDS = ("prediction_type", "learn_sigma")
AUTOREGRESSIVE_FIELDS = ("sink_frames",)


def meaning(cfg) -> dict:
    """{"section.field": value} of the fields that change what a model's weights mean, from an mmengine config
    (the model is built on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        model = build(MODELS, split_init_fields(cfg.model)[0], "model")
    fields = {f"model.{name}": getattr(model, name) for name in MODEL_FIELDS}
    if cfg.get("diffusion") is not None:
        diffusion = build(SCHEDULERS, cfg.diffusion, "diffusion")
        fields.update({f"diffusion.{name}": getattr(diffusion, name) for name in DIFFUSION_FIELDS})
    ar = AutoregressiveSettings.from_cfg(cfg.get("autoregressive"))
    fields.update({f"autoregressive.{name}": getattr(ar, name) for name in AUTOREGRESSIVE_FIELDS})
    return fields


def check_saved_config(ckpt, cfg) -> None:
    """Fail with one line naming the field and both values when the config saved with the weights of `ckpt`
    disagrees with `cfg` on what the weights mean; weights saved without a config pass."""
    path = saved_config_path(ckpt)
    if path is None:
        return
    saved, used = meaning(load_config(path)), meaning(cfg)
    for field, value in used.items():
        if field in saved and saved[field] != value:
            raise CheckpointError(f"{ckpt}: {field} is {saved[field]!r} in the checkpoint's {path.name} but "
                                  f"{value!r} in the config in use: the weights would be read as something they are "
                                  "not")
