"""The package as a user installs it: declared dependencies match the imports, a wheel and an sdist build, and an
installed (non-editable) wheel runs its console scripts and finds its configs."""

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Declared but reached only through another package, so never imported by name.
INDIRECT = {
    "sentencepiece": "the T5 v1.1 tokenizer, loaded by transformers",
    "tensorboard": "imported as torch.utils.tensorboard",
}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_distributions() -> set[str]:
    """Distributions of every third-party module the package imports, at any depth of the code."""
    modules = set()
    for file in (ROOT / "causalvdm").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"causalvdm"}
    owners = packages_distributions()  # an optional extra that is not installed (wandb) goes by its module name
    return {_name(dist) for m in modules for dist in owners.get(m, [m])}


def test_every_import_is_declared_and_every_declaration_used():
    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    optional = {_name(r) for extra in PYPROJECT["project"]["optional-dependencies"].values() for r in extra}
    imported = _imported_distributions()
    assert imported - declared - optional == set()
    assert declared - imported - set(INDIRECT) == set()
    torch_requirement = next(r for r in PYPROJECT["project"]["dependencies"] if _name(r) == "torch")
    assert ">=" in torch_requirement and "==" not in torch_requirement  # a GPU machine's own torch must satisfy it


def test_wheel_and_sdist_build_and_the_installed_wheel_runs(tmp_path):
    # Build from a copy of the tracked files, so the checkout gets no build/ or egg-info litter.
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    source = tmp_path / "src"
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    for hook in ("build_wheel", "build_sdist"):  # one process each: setuptools keeps state between the two
        build = f"from setuptools import build_meta; import sys; build_meta.{hook}(sys.argv[1])"
        subprocess.run([sys.executable, "-c", build, str(dist)], cwd=source, check=True, capture_output=True)
    wheel = next(dist.glob("causalvdm-*.whl"))
    assert next(dist.glob("causalvdm-*.tar.gz")).stat().st_size > 0
    names = zipfile.ZipFile(wheel).namelist()
    assert "causalvdm/cli/train.py" in names and "causalvdm/pipeline.py" in names
    assert any(n.endswith("data/share/causalvdm/configs/demo/overfit.py") for n in names)

    # Install it (its dependencies are those of this environment) and run it from a folder without configs/.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import causalvdm; print(causalvdm.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target))  # the installed copy, not this checkout
    for script in ("causalvdm-sample", "causalvdm-train"):
        result = subprocess.run([str(target / "bin" / script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                                text=True)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
    shared = target / "share" / "causalvdm"  # --target keeps the data files under the target folder
    load = ("import sys; import causalvdm.config as c; from pathlib import Path; c.INSTALLED_CONFIGS = Path(sys.argv[1]);"
            "print(c.load_config('configs/demo/overfit.py').model.type)")
    out = subprocess.run([sys.executable, "-c", load, str(shared)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "CausalSTDiT"
