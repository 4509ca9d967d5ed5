"""Reading files safely: checkpoints through safetensors or `torch.load(weights_only=True)`, never pickle, written
atomically; JSON-lines manifests with errors that name the file and line."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from causalvdm.registry import ConfigError


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not a checkpoint; the message is one line naming the file."""


def load_weights(path: str | Path) -> dict:
    """Read a `.safetensors` file or a torch `.pt/.pth/.bin` file (weights only) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, bad header: all mean "not readable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason[:200]})") from err


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


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`.

    A crash or a full disk mid-write leaves the previous file at `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: dict) -> None:
    """Write `data` as JSON through a temporary file and a rename, so a kill mid-write leaves the previous whole
    file (benchmarks rewrite their figures as each measurement ends); the folder is made if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def iter_jsonl(path: str | Path):
    """Yield (line number, object) for each non-blank line of a JSON-lines file.

    Raises a one-line ValueError naming the file and line for a line that is not a JSON object.
    """
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {line_no}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {line_no}: expected an object, got {type(row).__name__}")
            yield line_no, row


def plain_name(name: str, what: str) -> str:
    """`name` if it is a plain file name (an output goes exactly where asked), else a one-line ValueError naming `what`.

    A name with a folder in it (`../x`, `/tmp/x`, `a/b`) would write outside the folder it is meant for.
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
        raise ValueError(f"{what} {name!r} must be a plain name: no folders, '..' or surrounding spaces")
    return name


def writable_dir(path: str | Path, what: str) -> Path:
    """Create the folder `path` if needed and check a file can be written in it -> path.

    Fails with one line naming `what` (e.g. "--out") for a file in the way, no permission or a read-only disk,
    before any work whose results would be lost.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: {what} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"{path}: {what} is not writable ({err.strerror})") from None
    return path


def check_free_space(path: str | Path, needed: int, what: str) -> None:
    """Fail with one line when the disk holding `path` has less than `needed` bytes free for `what`."""
    free = shutil.disk_usage(path).free
    if free < needed:
        raise ConfigError(f"{path}: {free / 2**20:.1f} MiB free, {what} needs about {needed / 2**20:.1f} MiB")


def check_model_dir(path: str, field: str, what: str) -> Path:
    """Check that `path` is a local model folder with a config.json; errors name the config `field`."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"{directory}: directory not found (set {field} to a local {what} folder; nothing is downloaded)")
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{directory}: no config.json, not a {what} folder (check {field})")
    return directory
