"""Registries of buildable components and the one builder that turns a config dict into an object."""

import inspect
import math
import types
import typing

from mmengine.registry import Registry

MODELS = Registry("model")
VAES = Registry("vae")
TEXT_ENCODERS = Registry("text_encoder")
SCHEDULERS = Registry("scheduler")
DATASETS = Registry("dataset")


class ConfigError(ValueError):
    """A config names an unknown type, lacks a field or has a bad one; the message is one line."""


def validate(registry: Registry, cfg, key: str, **extra):
    """Check `cfg` (a dict with `type`) against its builder's signature -> (builder, kwargs).

    A typo or a missing field fails here with one line naming the field, instead of a TypeError
    from deep inside a constructor. `key` names the config field in errors.
    """
    if cfg is None or "type" not in cfg:
        raise ConfigError(f"{key}: missing field 'type'")
    kwargs = {k: v for k, v in dict(cfg).items() if k != "type"}
    kwargs.update(extra)
    name = cfg["type"]
    builder = registry.get(name) if isinstance(name, str) else name
    if builder is None:
        known = ", ".join(sorted(registry.module_dict))
        raise ConfigError(f"{key}.type: unknown {registry.name} type {name!r} (known: {known})")
    params = inspect.signature(builder).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ConfigError(f"{key}: unknown field(s) {', '.join(unknown)} for {name}")
    missing = [
        n for n, p in params.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs
    ]
    if missing:
        raise ConfigError(f"{key}: missing field(s) {', '.join(missing)} for {name}")
    for field, value in cfg.items():
        if field != "type" and field in params:
            check_type(f"{key}.{field}", value, params[field].annotation)
    return builder, kwargs


def check_type(where: str, value, annotation) -> None:
    """Fail with one line naming `where` unless `value` fits `annotation`.

    Understood: int, float (finite; an int is fine), bool, str, dict, tuple/list[...], unions with None; any other
    annotation (Any, a class, none at all) is left to the builder.
    """
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    options = typing.get_args(annotation) if union else (annotation,)
    if not any(_fits(value, option) for option in options):
        expected = " or ".join(_TYPE_NAMES.get(option, str(option)) for option in options)
        raise ConfigError(f"{where} must be {expected}, got {value!r}")


_TYPE_NAMES = {int: "an integer", float: "a finite number", bool: "True or False", str: "a string", dict: "a dict",
               tuple: "a tuple", type(None): "None"}


def _fits(value, annotation) -> bool:
    origin = typing.get_origin(annotation) or annotation
    if annotation is type(None):
        return value is None
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if origin is str:
        return isinstance(value, str)
    if origin is dict:
        return isinstance(value, dict)
    if origin in (tuple, list):  # configs and --cfg-options give tuples; JSON and some merges give lists
        args = typing.get_args(annotation)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return not args or (len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args)))
    return True


def build(registry: Registry, cfg, key: str, **extra):
    """Build `cfg` (a dict with `type`) from `registry`; `key` names the config field in errors."""
    builder, kwargs = validate(registry, cfg, key, **extra)
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key} ({cfg['type']}): {err}") from err
