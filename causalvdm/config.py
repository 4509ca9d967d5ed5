"""Loading mmengine `.py` configs with `--cfg-options` overrides, and the one-line config errors."""

import argparse
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from mmengine.config import Config, DictAction

from causalvdm.registry import ConfigError


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add the `--cfg-options key.sub=value ...` override flag shared by every entrypoint."""
    parser.add_argument(
        "--cfg-options", nargs="+", action=DictAction, default={}, metavar="KEY=VALUE",
        help="override config fields, e.g. model.depth=4 train.lr=1e-4 (values parsed as Python literals)",
    )


# Where an installed (non-editable) package keeps the repository's configs/ folder (pyproject's data-files).
INSTALLED_CONFIGS = Path(sys.prefix) / "share" / "causalvdm"


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    """Read an mmengine `.py` config and apply dotted-key overrides; errors name the file.

    A "configs/..." path missing from the working directory is read from the installed package's copy, so
    `causalvdm-train configs/demo/overfit.py` works from any folder after `pip install causalvdm`.
    """
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and path.parts[:1] == ("configs",):
        installed = INSTALLED_CONFIGS / path
        path = installed if installed.is_file() else path
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        cfg = Config.fromfile(str(path))
    except Exception as err:  # mmengine wraps syntax and import errors in many types
        raise ConfigError(f"{path}: cannot parse config: {err}".splitlines()[0]) from err
    if overrides:
        cfg.merge_from_dict(dict(overrides))
    return cfg


def require(cfg: Config, *keys: str):
    """Return `cfg.<key>` for a dotted key, or fail with one line naming the key and the file."""
    values = []
    for key in keys:
        node = cfg
        for part in key.split("."):
            if part not in node:
                raise ConfigError(f"{cfg.filename}: missing field '{key}'")
            node = node[part]
        values.append(node)
    return values[0] if len(values) == 1 else tuple(values)


@dataclass
class AutoregressiveSettings:
    """`cfg.autoregressive`, shared by training and sampling: chunk size k, cache queue size, prefix perturbation."""

    chunk_size: int = 8
    max_cond_frames: int = 25
    prefix_perturb_t: int = 0

    @classmethod
    def from_cfg(cls, ar_cfg) -> "AutoregressiveSettings":
        given = dict(ar_cfg or {})
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"autoregressive: unknown field(s) {', '.join(unknown)}")
        settings = cls(**given)
        if settings.chunk_size < 1 or settings.max_cond_frames < 1:
            raise ConfigError("autoregressive.chunk_size and max_cond_frames must be >= 1")
        return settings
