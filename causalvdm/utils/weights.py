"""Weights on disk: finding a checkpoint's files, reading them safely (safetensors, or `torch.load(weights_only=True)`,
never pickle), checking them against a model or a model folder, and loading them into a model.

Every failure is a one-line CheckpointError (or ConfigError for a model folder) naming the file.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from causalvdm.registry import ConfigError
from causalvdm.utils.io import read_text

PIPELINE_CONFIG = "config.json"  # marks a folder written by CausalVDMPipeline.save_pretrained
# Wrappers that training scripts put around a state dict, tried in this order (EMA weights first).
CONTAINERS = ("ema", "state_dict", "model", "module")
PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not a checkpoint; the message is one line naming the file."""


# ------------------------------------------------------------------------------------------- finding
def pretrained_config_path(path: str | Path) -> Path:
    """The config of a save_pretrained folder (config.json) or of a training checkpoint directory.

    A training checkpoint outputs/EXP/checkpoints/step_N keeps its config.py inside; outputs/EXP/config.py, two
    levels up, is the run's copy.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    for candidate in (path / PIPELINE_CONFIG, path / "config.py", path.parent.parent / "config.py"):
        if candidate == path / PIPELINE_CONFIG and candidate.is_file():
            check_pipeline_config(candidate)
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{path}: no {PIPELINE_CONFIG} or config.py here or two levels up (pass the config)")


def check_pipeline_config(path: Path) -> None:
    """Fail with one line unless the config.json at `path` is a save_pretrained one (it has a `model` section): a
    Hugging Face model folder has a config.json too."""
    try:
        config = json.loads(read_text(path))
    except ValueError as err:
        raise CheckpointError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        kind = f" (model_type {config['model_type']!r})" if isinstance(config, dict) and "model_type" in config else ""
        raise CheckpointError(f"{path.parent}: not a causalvdm checkpoint: its {path.name} has no 'model' section; "
                              f"a Hugging Face model folder{kind}?")


def checkpoint_file(ckpt: str | Path, weights: str = "ema") -> Path:
    """The weights file of a save_pretrained folder, of a training checkpoint directory (`weights`), or a file."""
    path = Path(ckpt)
    if path.is_dir():
        if (path / PIPELINE_CONFIG).is_file():
            check_pipeline_config(path / PIPELINE_CONFIG)
        file = path / ("model.safetensors" if (path / PIPELINE_CONFIG).is_file() else f"{weights}.safetensors")
        if not file.is_file():
            raise CheckpointError(f"{path}: no {file.name} in this directory (not a training checkpoint?)")
        return file
    if path.is_file():
        return path
    raise CheckpointError(f"{path}: checkpoint not found")


def saved_config_path(ckpt: str | Path) -> Path | None:
    """The config written with the weights of `ckpt` (a checkpoint directory, a save_pretrained folder, or a weights
    file inside one), or None for weights without one (a converted or downloaded file)."""
    path = Path(ckpt)
    folder = path if path.is_dir() else path.parent
    has_config = (folder / PIPELINE_CONFIG).is_file() or (folder / "config.py").is_file()
    return pretrained_config_path(folder) if has_config else None


# ------------------------------------------------------------------------------------------- reading
def is_safetensors(path: Path) -> bool:
    """True when the file's bytes are a safetensors file (an 8-byte header length, then the JSON header), whatever
    its name says."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def load_weights(path: str | Path) -> dict:
    """Read a safetensors file or a torch `.pt/.pth/.bin` file (weights only) onto the CPU; the format is told by the
    file's bytes, so a renamed file is still read as what it is."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        if is_safetensors(path):
            return load_file(str(path))
        with open(path, "rb") as f:  # a file object: torch.load would go by a path's suffix
            if f.read(4)[:2] not in (b"PK", b"\x80\x02"):  # a torch zip file, or a legacy pickle
                raise CheckpointError(f"{path}: not a readable checkpoint (by its first bytes neither safetensors "
                                      "nor a torch file)")
            f.seek(0)
            return torch.load(f, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # truncated zip, foreign pickle, bad header: all mean "not readable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason[:200]})") from err


def extract_state_dict(obj, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """Unwrap {"ema"|"state_dict"|"model"|"module": ...} containers and strip "module." prefixes -> tensors by name."""
    while isinstance(obj, dict):
        inner = next((k for k in CONTAINERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = obj[inner]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        found = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: no state dict of tensors found (top level: {found})")
    state = {}
    for key, value in tensors.items():
        for prefix in PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


# ------------------------------------------------------------------------------------------- checking
def check_architecture(file: str | Path, state: dict, model: torch.nn.Module) -> None:
    """Fail with one line naming `file` unless `state` has exactly the keys and shapes of `model.state_dict()`
    (a checkpoint trained with another config, instead of load_state_dict's many-line report)."""
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
                if k in state and state[k].shape != v.shape]
    if missing or unexpected or reshaped:
        first = (reshaped or missing or unexpected)[0]
        raise CheckpointError(f"{file}: not a checkpoint of this model architecture ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(reshaped)} mis-shaped keys, e.g. {first})")


def check_model_dir(path: str, field: str, what: str) -> Path:
    """Check that `path` is a local model folder with a config.json; errors name the config `field`."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"{directory}: directory not found (set {field} to a local {what} folder; nothing is downloaded)")
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{directory}: no config.json, not a {what} folder (check {field})")
    return directory


# ------------------------------------------------------------------------------------------- loading
def load_checkpoint_weights(model: torch.nn.Module, ckpt: str | Path, weights: str = "ema") -> Path:
    """Load the weights of `ckpt` (see checkpoint_file) into `model`, strictly -> the file read."""
    file = checkpoint_file(ckpt, weights)
    state = extract_state_dict(load_weights(file), file)
    check_architecture(file, state, model)
    model.load_state_dict(state)
    return file
