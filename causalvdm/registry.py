"""Registries of buildable components and the one builder that turns a config dict into an object."""

import inspect

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
    return builder, kwargs


def build(registry: Registry, cfg, key: str, **extra):
    """Build `cfg` (a dict with `type`) from `registry`; `key` names the config field in errors."""
    builder, kwargs = validate(registry, cfg, key, **extra)
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key} ({cfg['type']}): {err}") from err
