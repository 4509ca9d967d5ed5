"""The layers contract of pyproject.toml ([tool.importlinter]): imports point down, and no two packages of causalvdm
import each other."""

import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_imports_point_down_the_layers():
    """import-linter's `lint-imports` keeps every contract of pyproject.toml (it names each offending import)."""
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout
