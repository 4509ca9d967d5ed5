"""Loading mmengine `.py` configs with `--cfg-options` overrides, and the one-line config errors."""

import argparse
import ast
import difflib
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from mmengine.config import Config

from causalvdm.registry import ConfigError, check_type


def parse_value(text: str):
    """A `--cfg-options` value as typed: a Python literal (4, 1e-4, None, True, [1, 2], 'x') when it reads as one,
    else the text itself, spaces and all (mmengine's DictAction deletes every space: 'a red car' became 'aredcar')."""
    lowered = {"true": True, "false": False, "none": None}
    if text.lower() in lowered:
        return lowered[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


class _ConfigOptions(argparse.Action):
    """KEY=VALUE items -> {key: value}, values by `parse_value`; an item without `=` is a one-line usage error."""

    def __call__(self, parser, namespace, values, option_string=None):
        options = dict(getattr(namespace, self.dest, None) or {})
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                parser.error(f"argument {option_string}: {item!r} is not KEY=VALUE")
            options[key.strip()] = parse_value(value)
        setattr(namespace, self.dest, options)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add the `--cfg-options key.sub=value ...` override flag shared by every entrypoint."""
    parser.add_argument(
        "--cfg-options", nargs="+", action=_ConfigOptions, default={}, metavar="KEY=VALUE",
        help="override config fields, e.g. model.depth=4 train.lr=1e-4 (values parsed as Python literals)",
    )


# Where a "configs/..." path missing from the working folder is looked for: an installed (non-editable) package's copy
# (pyproject's data-files), then the checkout this package runs from (an editable install, or PYTHONPATH).
INSTALLED_CONFIGS = Path(sys.prefix) / "share" / "causalvdm"
CHECKOUT = Path(__file__).resolve().parents[1]


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    """Read an mmengine `.py` config and apply dotted-key overrides; errors name the file.

    A "configs/..." path missing from the working directory is read from the installed package's copy or the
    checkout's, so `causalvdm-train configs/demo/overfit.py` works from any folder.
    """
    path = Path(path).expanduser()
    if not path.is_file() and not path.is_absolute() and path.parts[:1] == ("configs",):
        path = next((home / path for home in (INSTALLED_CONFIGS, CHECKOUT) if (home / path).is_file()), path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        cfg = Config.fromfile(str(path))
    except Exception as err:  # mmengine wraps syntax and import errors in many types
        raise ConfigError(f"{path}: cannot parse config: {err}".splitlines()[0]) from err
    if overrides:
        cfg.merge_from_dict(dict(overrides))
    check_sections(cfg)
    home_paths = {key: value for key, value in config_strings(cfg.to_dict())
                  if (value == "~" or value.startswith("~/")) and "[" not in key}  # merge_from_dict takes dict keys
    if home_paths:  # as a shell would for a path typed on its own ("data.root=~/clips" is not expanded by one)
        cfg.merge_from_dict({key: os.path.expanduser(value) for key, value in home_paths.items()})
    return cfg


def config_strings(node, key: str = ""):
    """(key, value) of every string in a config's nested dicts and lists: "section.field", "section.list[0]"."""
    if isinstance(node, dict):
        for name, value in node.items():
            yield from config_strings(value, f"{key}.{name}" if key else name)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from config_strings(value, f"{key}[{i}]")
    elif isinstance(node, str):
        yield key, node


# The top-level names the project reads; a config may define others (a data_root the sections share).
SECTIONS = ("model", "vae", "text_encoder", "diffusion", "autoregressive", "dataset", "train", "sample", "distill",
            "latent_size")


def check_sections(cfg: Config) -> None:
    """Fail with one line on a top-level name nothing reads that looks like a section: a dict (a misspelt `trian`,
    or `--cfg-options trian.lr=...`), or any name close to a section's (`latnet_size`)."""
    for name, value in cfg.items():
        if name in SECTIONS:
            continue
        nearest = difflib.get_close_matches(name, SECTIONS, n=1, cutoff=0.6 if isinstance(value, dict) else 0.8)
        if nearest or isinstance(value, dict):
            hint = f" (did you mean '{nearest[0]}'?)" if nearest else f" (sections: {', '.join(SECTIONS)})"
            raise ConfigError(f"{cfg.filename}: unknown section '{name}'{hint}")


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


def settings_from(cls, section: str, given: dict):
    """The dataclass `cls` from the config dict `section`; an unknown field or a value of the wrong type (checked
    against the field's annotation) is a one-line ConfigError naming `section.field`."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"{section}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    for name, value in given.items():
        check_type(f"{section}.{name}", value, known[name].type)
    return cls(**given)


def check_range(section: str, settings, low=None, high=None, *names: str) -> None:
    """Fail with one line unless each field in `names` (None is fine) lies in [low, high]."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
            bound = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
            raise ConfigError(f"{section}.{name} must be {bound}, got {value}")


@dataclass
class AutoregressiveSettings:
    """`cfg.autoregressive`, shared by training and sampling: chunk size k, cache queue size, prefix perturbation,
    frame sink (the first `sink_frames` frames stay in view for the whole video, besides the rolling queue)."""

    chunk_size: int = 8
    max_cond_frames: int = 25
    prefix_perturb_t: int = 0
    sink_frames: int = 0

    @classmethod
    def from_cfg(cls, ar_cfg) -> "AutoregressiveSettings":
        settings = settings_from(cls, "autoregressive", dict(ar_cfg or {}))
        check_range("autoregressive", settings, 1, None, "chunk_size", "max_cond_frames")
        check_range("autoregressive", settings, 0, None, "prefix_perturb_t", "sink_frames")
        return settings
