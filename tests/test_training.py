import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from causalvdm.registry import ConfigError
from causalvdm.training.checkpoint import list_checkpoints, resolve_resume, save_checkpoint
from causalvdm.training.settings import TrainSettings
from conftest import ROOT

CONFIG = """
model = dict(type="CausalSTDiT", in_channels=12, hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0,
             caption_channels=16, model_max_length=8, tpe_mode="cyclic", max_tpe_len=9)
vae = dict(type="PixelVAE", factor=2)
text_encoder = dict(type="T5Encoder", from_pretrained="{t5}", model_max_length=8)
diffusion = dict(type="IDDPM", prediction_type="epsilon")
dataset = dict(type="VideoManifestDataset", root="{root}", manifest="manifest.jsonl", num_frames=9, image_size=(8, 8))
autoregressive = dict(chunk_size=4, max_cond_frames=5, prefix_perturb_t=20)
train = dict(outputs_dir="{out}", max_steps={steps}, batch_size=4, num_workers=0, lr=1e-3, warmup_steps=2,
             log_every=1, ckpt_every={ckpt_every}, keep_last=2, ema_decay=0.9, txt_dropout_prob=0.5)
"""


def _config(tmp_path, video_root, t5_dir, steps=6, ckpt_every=2) -> Path:
    path = tmp_path / "train_cfg.py"
    path.write_text(CONFIG.format(root=video_root, out=tmp_path / "outputs", t5=t5_dir, steps=steps,
                                  ckpt_every=ckpt_every))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def test_settings_reject_unknown_and_bad_values():
    assert TrainSettings.from_cfg(dict(lr=1e-4)).lr == 1e-4
    with pytest.raises(ConfigError, match=r"^train: unknown field\(s\) lrr"):
        TrainSettings.from_cfg(dict(lrr=1e-4))
    with pytest.raises(ConfigError, match="train.parallel must be 'ddp' or 'fsdp'"):
        TrainSettings.from_cfg(dict(parallel="zero3"))
    assert TrainSettings.from_cfg({}).tpe_offsets == "always"
    assert TrainSettings.from_cfg(dict(tpe_offsets="full_window")).tpe_offsets == "full_window"
    with pytest.raises(ConfigError, match=r"^train\.tpe_offsets must be one of always, full_window, got 'never'$"):
        TrainSettings.from_cfg(dict(tpe_offsets="never"))


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    state = {"w": torch.ones(2)}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, state, state, {"step": step}, "x = 1\n", keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    (tmp_path / "step_00000009").mkdir()  # a half-written directory is never picked
    assert resolve_resume("auto", tmp_path).name == "step_00000003"
    assert resolve_resume("auto", tmp_path / "nothing") is None


def test_distributed_matches_single_process(tmp_path, video_root, t5_dir):
    """DDP and FSDP2 over 2 gloo processes follow the same loss curve as 1 process with the same global batch
    (text-conditioned, with caption dropout, which swaps in the FSDP-sharded null caption)."""
    cfg = _config(tmp_path, video_root, t5_dir)
    runs = {}
    single = subprocess.run([sys.executable, "scripts/train.py", str(cfg), "--exp-name", "single"],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    runs["single"] = tmp_path / "outputs" / "single"
    for mode in ("ddp", "fsdp"):
        cmd = ["bash", "scripts/train.sh", str(cfg), mode, str(_free_port()),
               "--cfg-options", "train.batch_size=2", f"train.parallel={mode}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(_env(), NPROC_PER_NODE="2"), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = tmp_path / "outputs" / mode
    reference = _losses(runs["single"])
    assert len(reference) == 6 and reference[0] > 0
    for mode in ("ddp", "fsdp"):
        np.testing.assert_allclose(_losses(runs[mode]), reference, rtol=1e-4, atol=1e-6, err_msg=mode)
        for file in ("model.safetensors", "ema.safetensors"):  # the EMA is gathered from FSDP shards on rank 0
            final = load_file(str(runs["single"] / "checkpoints" / "step_00000006" / file))
            weights = load_file(str(runs[mode] / "checkpoints" / "step_00000006" / file))
            assert weights.keys() == final.keys(), f"{mode}: {file}"
            for name, value in final.items():
                torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=f"{mode}: {file}: {name}")
    assert (runs["single"] / "loss.png").is_file() and (runs["single"] / "config.py").is_file()

    # FSDP2 saves the optimizer as shards (no process gathers it). Resumed from step 4 on 2 processes it reaches the
    # uninterrupted run's step 6; on 1 process it continues exactly as from DDP's full optimizer state of step 4 (not
    # as the 1-process run: rank 0's RNG state is what a resume restores).
    sharded, full = (runs[mode] / "checkpoints" / "step_00000004" for mode in ("fsdp", "ddp"))
    assert (sharded / "optimizer" / ".metadata").is_file()
    assert "optimizer" not in torch.load(sharded / "train_state.pt", weights_only=True)
    assert "optimizer" in torch.load(full / "train_state.pt", weights_only=True)
    resumes = {
        "fsdp_resumed": ["bash", "scripts/train.sh", str(cfg), "fsdp_resumed", str(_free_port()), "--resume",
                         str(sharded), "--cfg-options", "train.batch_size=2", "train.parallel=fsdp"],
        "one_from_shards": [sys.executable, "scripts/train.py", str(cfg), "--exp-name", "one_from_shards",
                            "--resume", str(sharded)],
        "one_from_full": [sys.executable, "scripts/train.py", str(cfg), "--exp-name", "one_from_full", "--resume",
                          str(full)],
    }
    for name, cmd in resumes.items():
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(_env(), NPROC_PER_NODE="2"), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = tmp_path / "outputs" / name
    for resumed, reference in (("fsdp_resumed", "fsdp"), ("one_from_shards", "one_from_full")):
        final = load_file(str(runs[reference] / "checkpoints" / "step_00000006" / "model.safetensors"))
        got = load_file(str(runs[resumed] / "checkpoints" / "step_00000006" / "model.safetensors"))
        for key, value in final.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=f"{resumed}: {key}")


def test_reference_options_fsdp_matches_single_process(tmp_path, video_root, t5_dir):
    """The reference code's settings, model.null_caption='fixed' and train.tpe_offsets='full_window': FSDP2 over 2
    processes still follows 1 process (offsets drawn per sample, for the 9-frame windows p = 5 + k = 4 only), the
    frozen null caption never changes in the weights nor in the EMA, and the EMA loads strictly into a fresh model
    (validation sampling)."""
    cfg = _config(tmp_path, video_root, t5_dir, steps=4, ckpt_every=2)
    options = ["model.null_caption=fixed", "train.tpe_offsets=full_window"]
    single = subprocess.run([sys.executable, "scripts/train.py", str(cfg), "--exp-name", "single", "--cfg-options",
                             *options, "train.validation_every=4", "train.validation_frames=9",
                             "train.validation_steps=2"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    fsdp = subprocess.run(["bash", "scripts/train.sh", str(cfg), "fsdp", str(_free_port()), "--cfg-options", *options,
                           "train.batch_size=2", "train.parallel=fsdp"], cwd=ROOT,
                          env=dict(_env(), NPROC_PER_NODE="2"), capture_output=True, text=True, timeout=300)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    runs = {name: tmp_path / "outputs" / name for name in ("single", "fsdp")}
    assert (runs["single"] / "samples" / "step_00000004.mp4").is_file()
    np.testing.assert_allclose(_losses(runs["fsdp"]), _losses(runs["single"]), rtol=1e-4, atol=1e-6)
    step2, step4 = (load_file(str(runs["single"] / "checkpoints" / f"step_0000000{n}" / "model.safetensors"))
                    for n in (2, 4))
    assert not torch.equal(step2["y_embedder.y_proj.fc1.weight"], step4["y_embedder.y_proj.fc1.weight"])  # it trains
    for run in runs.values():
        for file in ("model.safetensors", "ema.safetensors"):
            final = load_file(str(run / "checkpoints" / "step_00000004" / file))
            assert torch.equal(final["y_embedder.y_embedding"], step2["y_embedder.y_embedding"]), f"{run.name}: {file}"


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, video_root, t5_dir):
    steps = 60
    cfg = _config(tmp_path, video_root, t5_dir, steps=steps, ckpt_every=5)
    base = [sys.executable, "scripts/train.py", str(cfg)]
    full = subprocess.run(base + ["--exp-name", "full"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]

    ckpts = tmp_path / "outputs" / "killed" / "checkpoints"
    proc = subprocess.Popen(base + ["--exp-name", "killed"], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (ckpts / "step_00000010").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = [p.name for p in list_checkpoints(ckpts)]
    assert f"step_{steps:08d}" not in done, "the run finished before it was killed"

    resumed = subprocess.run(base + ["--exp-name", "killed", "--resume", "auto"], cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "outputs" / "full" / "checkpoints" / f"step_{steps:08d}" / name))
        b = load_file(str(ckpts / f"step_{steps:08d}" / name))
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"
    assert _losses(tmp_path / "outputs" / "killed") == _losses(tmp_path / "outputs" / "full")


def test_validation_sampling_writes_a_clip(tmp_path, video_root, t5_dir, train_script):
    cfg = _config(tmp_path, video_root, t5_dir, steps=2, ckpt_every=2)
    code = train_script.main([str(cfg), "--exp-name", "val", "--cfg-options", "train.validation_every=2",
                              "train.validation_frames=9", "train.validation_steps=3"])
    assert code == 0
    clip = tmp_path / "outputs" / "val" / "samples" / "step_00000002.mp4"
    with av.open(str(clip)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (8, 8, 3)


def test_a_subclass_swaps_only_the_objective(tmp_path, video_root, t5_dir):
    """A second objective (e.g. distillation) overrides compute_loss and reuses the loop, logging and checkpoints."""
    from causalvdm.config import load_config
    from causalvdm.training import Trainer
    from causalvdm.training.distributed import init_distributed

    class Frozen(Trainer):
        def compute_loss(self, batch, micro):
            out = super().compute_loss(batch, micro)
            return dict(loss=out["loss"] * 0.0 + 1.0, base=out["loss"].item())  # zero gradients: Adam leaves weights be

    cfg = load_config(_config(tmp_path, video_root, t5_dir, steps=2, ckpt_every=2))
    run = tmp_path / "frozen"
    assert Frozen(cfg, TrainSettings.from_cfg(cfg.train), run, init_distributed()).fit() == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [1.0, 1.0] and all(r["base"] > 0 for r in rows)
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    assert ckpt.name == "step_00000002"
    model, ema = load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "ema.safetensors"))
    assert all(torch.equal(model[k], ema[k]) for k in model)  # never moved, so the average did not either


def test_lr_schedules():
    """Linear warm-up, then constant or a half cosine reaching 0 at max_steps; an unknown schedule is one line."""
    from causalvdm.training.settings import lr_factor

    assert [lr_factor(i, 4, 12, "constant") for i in (0, 3, 4, 11)] == [0.25, 1.0, 1.0, 1.0]
    cosine = [lr_factor(i, 4, 12, "cosine") for i in range(12)]
    assert cosine[:4] == [0.25, 0.5, 0.75, 1.0] and cosine[4] == 1.0
    assert cosine[8] == pytest.approx(0.5) and lr_factor(12, 4, 12, "cosine") == pytest.approx(0.0)
    assert all(a > b for a, b in zip(cosine[4:], cosine[5:]))
    with pytest.raises(ConfigError, match="train.lr_schedule must be one of constant, cosine, got 'linear'"):
        TrainSettings.from_cfg(dict(lr_schedule="linear"))
