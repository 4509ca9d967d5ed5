import getpass
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)

# Inductor's on-disk cache keys leave out ATEN_CPU_CAPABILITY, which decides the kernels it generates: a run under the
# AVX2 kernels after a native one would load the native run's compiled wrappers and fail ("tuple args required").
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "native")
    cache = Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}_{capability}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)


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


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory):
    """A tiny T5 encoder and a ByT5 tokenizer saved like a t5-v1_1-xxl folder."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, vocab_size=384)
    path = tmp_path_factory.mktemp("t5")
    T5EncoderModel(config).save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)  # one token per UTF-8 byte (id = byte + 3), needs no vocabulary file
    return path


@pytest.fixture(scope="session")
def video_root(tmp_path_factory):
    """Eight 12-frame 12x12 clips of a colour drifting over time, with captions, in a manifest.jsonl."""
    import json

    import numpy as np

    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        base = rng.integers(0, 255, (1, 12, 12, 3))
        drift = np.arange(12)[:, None, None, None] * rng.integers(-8, 8, (1, 1, 1, 3))
        frames = np.clip(base + drift, 0, 255).astype(np.uint8)
        write_video(root / f"clip{i}.mp4", frames)
        rows.append(json.dumps({"path": f"clip{i}.mp4", "caption": f"clip {i}"}))
    (root / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def train_script():
    """The training command line that scripts/train.py runs (causalvdm.cli.train), so tests can call main(argv)."""
    from causalvdm.cli import train

    return train


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `cuda` where torch sees no CUDA device (`pytest -m cuda` then reports them skipped)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def run_entrypoint(*args, cwd=ROOT, env=None, timeout=300):
    """Run a command (`scripts/x.sh`, `tools/x.py`, `-m module`) as a user would, in a subprocess -> CompletedProcess.

    Scripts ending in .sh run with bash, the rest with this Python; stdout and stderr are captured as text.
    """
    import os
    import subprocess

    args = [str(a) for a in args]
    if (ROOT / args[0]).is_file():  # scripts/x.sh, tools/x.py: the repository's, whatever the working folder
        args[0] = str(ROOT / args[0])
    command = ["bash", *args] if args[0].endswith(".sh") else [sys.executable, *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    full_env.pop("CAUSALVDM_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)



def selected_params(request, name: str) -> list:
    """The values of parameter `name` in the tests of the requesting module that this session will run, so a
    module fixture that runs them ahead (see run_in_parallel) does only the selected ones."""
    return [item.callspec.params[name] for item in request.session.items
            if item.module is request.module and hasattr(item, "callspec") and name in item.callspec.params]


def run_in_parallel(fn, items: list, workers: int = 3) -> list:
    """[fn(item) for item in items], `workers` at a time: for subprocess cases, which mostly wait on their imports,
    three in flight on two cores take about half the time of one after another."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def write_video(path, frames, fps: int = 8) -> None:
    """Write uint8 frames (T, H, W, 3) as an H.264 mp4 at `path`, as a camera or an editor would."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
