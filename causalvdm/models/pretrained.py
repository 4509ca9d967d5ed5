"""Initialise a CausalSTDiT from an Open-Sora v1 STDiT-XL/2 or a PixArt-alpha XL/2 checkpoint.

Our module names mirror Open-Sora v1 (which extends PixArt-alpha), so most keys map 1:1. What
differs is adapted and reported: PixArt's 2D patch embedding gains a temporal axis of size 1, a
final layer without the learned-variance channels fills the first C channels of every patch
position, the null caption is cut or extended to `model_max_length`, and the fixed sin-cos tables
(`pos_embed`, `pos_embed_temporal`) are dropped because ours are computed. Weights that have no
counterpart keep the fresh model's init; for a PixArt source this is the temporal attention, whose
zeroed output projection makes the video model start as the image model (as in Open-Sora v1).
A checkpoint tensor with no place in the model (e.g. the reference code's `attn_cf.*`, `bov_token`) is an
error unless the load is not strict, since the model would silently compute something else than the source.
"""

import logging
from pathlib import Path

import torch
from torch import nn

from causalvdm.registry import MODELS, ConfigError, build, check_type
from causalvdm.utils.weights import CheckpointError, extract_state_dict, load_weights

log = logging.getLogger(__name__)

SOURCES = ("auto", "opensora", "pixart")
# Fixed sin-cos tables saved as buffers by PixArt / Open-Sora / Latte; ours are computed on the fly.
DROPPED = ("pos_embed", "pos_embed_temporal", "temp_embed")


def detect_source(state: dict[str, torch.Tensor]) -> str:
    """'opensora' when the checkpoint has temporal attention blocks, else 'pixart' (an image model)."""
    return "opensora" if any(".attn_temp." in key for key in state) else "pixart"


def _adapt(key: str, value: torch.Tensor, want: torch.Tensor, model: nn.Module) -> torch.Tensor | None:
    """A tensor of shape `want.shape` made from a checkpoint tensor of another shape, or None if there is no rule."""
    if key == "x_embedder.proj.weight" and value.dim() == 4 and want.dim() == 5 and want.shape[2] == 1:
        # PixArt's Conv2d (D, C, ph, pw) -> our Conv3d (D, C, 1, ph, pw): the same map on every frame.
        if value.shape == want.shape[:2] + want.shape[3:]:
            return value.unsqueeze(2)
    if key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        # Output rows are ordered ((ph_i * pw + pw_i) * out_channels + c); a head with C channels per
        # patch position (no learned variance) fills channels [0, C) and the variance rows stay zero.
        patch = model.patch_size[1] * model.patch_size[2]
        c = model.in_channels
        if value.shape[1:] == want.shape[1:] and value.shape[0] % patch == 0:
            src_c, dst_c = value.shape[0] // patch, want.shape[0] // patch
            if {src_c, dst_c} <= {c, 2 * c}:
                n = min(src_c, dst_c)
                out = torch.zeros(want.shape, dtype=value.dtype)
                out.view(patch, dst_c, *want.shape[1:])[:, :n] = value.view(patch, src_c, *want.shape[1:])[:, :n]
                return out
    if key == "y_embedder.y_embedding" and value.dim() == 2 and value.shape[1] == want.shape[1]:
        # A null caption of another token count: cut it, or repeat its last (padding) token (Open-Sora v1).
        length = want.shape[0]
        if value.shape[0] >= length:
            return value[:length]
        return torch.cat([value, value[-1:].expand(length - value.shape[0], -1)])
    return None


def convert_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """Map a checkpoint's tensors onto `model`'s state dict keys.

    Returns (tensors to load, all with the model's shapes; summary of key lists: loaded, reshaped,
    skipped (no shape rule, the model keeps its init), missing, unexpected, dropped).
    """
    target = model.state_dict()
    out = {}
    summary = {name: [] for name in ("loaded", "reshaped", "skipped", "missing", "unexpected", "dropped")}
    for key, value in state.items():
        if key in DROPPED:
            summary["dropped"].append(key)
        elif key not in target:
            summary["unexpected"].append(key)
        elif value.shape == target[key].shape:
            out[key] = value
            summary["loaded"].append(key)
        else:
            adapted = _adapt(key, value, target[key], model)
            if adapted is None:
                summary["skipped"].append(f"{key} {tuple(value.shape)}->{tuple(target[key].shape)}")
            else:
                out[key] = adapted
                summary["reshaped"].append(key)
    summary["missing"] = [k for k in target if k not in state]
    return out, summary


def _names(keys: list[str], first: int = 3) -> str:
    if not keys:
        return ""
    more = f", +{len(keys) - first}" if len(keys) > first else ""
    return f" ({', '.join(keys[:first])}{more})"


def load_pretrained(model: nn.Module, path: str | Path, source: str = "auto", strict: bool = True) -> dict:
    """Load an Open-Sora v1 / PixArt-alpha checkpoint (.pth/.pt/.safetensors) into a freshly built CausalSTDiT.

    source: 'auto' (temporal blocks present -> 'opensora', else 'pixart'), 'opensora' or 'pixart'.
    strict: refuse a checkpoint with tensors the model has no place for (DROPPED tables aside); False skips them.
    Returns the summary of `convert_state_dict` plus `source`; logs it on one line.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    state = extract_state_dict(load_weights(path), path)
    detected = detect_source(state)
    if source != "auto" and source != detected:
        found = "has temporal blocks (blocks.N.attn_temp)" if detected == "opensora" else "has no temporal blocks"
        raise CheckpointError(f"{path}: source={source!r} but the checkpoint {found}; use source='auto'")
    tensors, summary = convert_state_dict(state, model)
    if not tensors:  # a wrong file (another model, a VAE, an optimizer state) would otherwise train from scratch
        keys = list(state)
        raise CheckpointError(f"{path}: no tensor of it fits the model ({len(keys)} keys{_names(keys)}); "
                              "is it a PixArt-alpha or Open-Sora v1 checkpoint?")
    unexpected = summary["unexpected"]
    if strict and unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} tensors have no place in this model{_names(unexpected)}; "
                              "to skip them, load with strict=False (model.from_pretrained_strict=False, --no-strict)")
    with torch.no_grad():
        model.load_state_dict(tensors, strict=False)
    summary["source"] = detected
    log.info("initialised from %s (%s): %d loaded, %d reshaped%s, %d skipped%s, %d missing%s, %d unexpected%s, "
             "%d dropped%s", path, detected, len(summary["loaded"]), len(summary["reshaped"]),
             _names(summary["reshaped"]), len(summary["skipped"]), _names(summary["skipped"]),
             len(summary["missing"]), _names(summary["missing"]), len(summary["unexpected"]),
             _names(summary["unexpected"]), len(summary["dropped"]), _names(summary["dropped"]))
    return summary


def split_init_fields(cfg_model) -> tuple[dict, str | None, bool]:
    """`cfg.model` -> (the fields its builder takes, `from_pretrained` path or None, `from_pretrained_strict`)."""
    cfg = dict(cfg_model)
    path = cfg.pop("from_pretrained", None)
    strict = cfg.pop("from_pretrained_strict", True)
    check_type("model.from_pretrained_strict", strict, bool)
    return cfg, path, strict


def build_model_from_config(cfg_model) -> nn.Module:
    """Build `cfg.model`; if it has `from_pretrained` (a checkpoint path), initialise from it with load_pretrained,
    strictly unless `from_pretrained_strict=False`."""
    cfg, path, strict = split_init_fields(cfg_model)
    model = build(MODELS, cfg, "model")
    if path:
        if not Path(path).is_file():
            raise ConfigError(f"model.from_pretrained: {path}: checkpoint not found")
        load_pretrained(model, path, strict=strict)
    return model
