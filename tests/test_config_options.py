"""`--cfg-options` values reach the config as typed: spaces, unicode and `=` inside a value are kept."""

import argparse

import pytest

from causalvdm.config import add_config_args, load_config
from causalvdm.registry import ConfigError
from conftest import ROOT


def _parse(*items):
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    return parser.parse_args(["--cfg-options", *items]).cfg_options


@pytest.mark.parametrize("text, value", [
    ("a red car at dawn", "a red car at dawn"),
    ("/data/my videos/clip 1.mp4", "/data/my videos/clip 1.mp4"),
    ("café au lait, 東京", "café au lait, 東京"),
    ("x=y", "x=y"),
    ("4", 4),
    ("1e-4", 1e-4),
    ("[1, 2]", [1, 2]),
    ("(8, 8)", (8, 8)),
    ("None", None),
    ("true", True),
    ("'quoted text'", "quoted text"),
    ("fsdp", "fsdp"),
])
def test_values_reach_the_config_as_typed(text, value):
    assert _parse(f"sample.prompt={text}") == {"sample.prompt": value}


def test_overrides_merge_into_the_config():
    options = _parse("train.lr=3e-4", "dataset.root=/my data/clips")
    cfg = load_config(ROOT / "configs" / "debug" / "tiny.py", options)
    assert cfg.train.lr == 3e-4
    assert cfg.dataset.root == "/my data/clips"


def test_an_item_without_a_key_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        _parse("=4")
    assert "'=4' is not KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    ({"trian.lr": 1e-4}, "unknown section 'trian' (did you mean 'train'?)"),
    ({"latnet_size": (2, 2)}, "unknown section 'latnet_size' (did you mean 'latent_size'?)"),
    ({"foo.bar": 1}, "unknown section 'foo' (sections: model, "),
])
def test_a_section_nothing_reads_is_named(options, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "debug" / "tiny.py", options)
    assert message in str(err.value)


def test_a_shared_variable_is_not_a_section():
    assert load_config(ROOT / "configs" / "debug" / "tiny.py", {"data_root": "data/x"}).data_root == "data/x"


def test_a_home_path_is_expanded_as_a_shell_would(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    options = _parse("dataset.root=~/my clips", "sample.prompt=~ is a tilde")
    cfg = load_config(ROOT / "configs" / "debug" / "tiny.py", options)
    assert cfg.dataset.root == "/home/someone/my clips"
    assert cfg.sample.prompt == "~ is a tilde"  # not a path: left as typed
