import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so tests can import tools/ as a package

torch.set_num_threads(2)


@pytest.fixture
def tiny_cfg():
    """The tiny debug config, loaded fresh for each test (tests may edit it)."""
    from causalvdm.config import load_config

    return load_config(ROOT / "configs" / "debug" / "tiny.py")


@pytest.fixture
def make_model(tiny_cfg):
    """Build the tiny model with every parameter randomised (a fresh model outputs exactly zero)."""
    import causalvdm
    from causalvdm.models.utils import randomize_weights

    def make(seed=0, **overrides):
        cfg = dict(tiny_cfg.model)
        cfg.update(overrides)
        return randomize_weights(causalvdm.build_model(cfg), seed=seed).eval()

    return make
