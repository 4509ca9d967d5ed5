"""Faults injected into training: non-finite losses, a checkpoint write that fails half-way, SIGTERM."""

import errno
import json
import logging
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from causalvdm.training import checkpoint as checkpoint_module
from causalvdm.training import trainer as trainer_module
from causalvdm.training.checkpoint import list_checkpoints
from conftest import ROOT
from test_training import _config, _env, video_root  # noqa: F401  (video_root is a fixture)


def _steps(ckpt_dir):
    return [int(p.name.split("_")[1]) for p in list_checkpoints(ckpt_dir)]


def test_nonfinite_losses_are_skipped_then_stop(tmp_path, video_root, t5_dir, train_script, monkeypatch, caplog):
    cfg = _config(tmp_path, video_root, t5_dir, steps=20, ckpt_every=2)
    real_loss = trainer_module.clean_prefix_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        if calls["n"] == 3 or calls["n"] > 6:  # one isolated bad step, then a run of them
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(trainer_module, "clean_prefix_loss", poisoned)
    code = train_script.main([str(cfg), "--exp-name", "nan", "--cfg-options", "train.max_nonfinite_steps=3"])
    assert code == 3
    assert "3 non-finite steps in a row" in caplog.text and "step skipped" in caplog.text
    run = tmp_path / "outputs" / "nan"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["nonfinite_steps"] == 4  # step 3, then steps 7, 8, 9
    last = list_checkpoints(run / "checkpoints")[-1]
    weights = load_file(str(last / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    # The weights skipped the bad steps: the last checkpoint still loads and training can go on.
    resumed = train_script.main([str(cfg), "--exp-name", "nan", "--resume", "auto",
                                 "--cfg-options", "train.max_steps=10"])
    assert resumed == 0


def test_failed_checkpoint_write_keeps_previous(tmp_path, video_root, t5_dir, train_script, monkeypatch, caplog):
    cfg = _config(tmp_path, video_root, t5_dir, steps=6, ckpt_every=2)
    real_save = checkpoint_module.save_file
    calls = {"n": 0}

    def disk_fills(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint's model file: half written, then the disk is full
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", disk_fills)
    code = train_script.main([str(cfg), "--exp-name", "full_disk"])
    assert code == 2
    assert "writing the step-4 checkpoint failed ([Errno 28] No space left on device)" in caplog.text
    ckpts = tmp_path / "outputs" / "full_disk" / "checkpoints"
    assert _steps(ckpts) == [2]
    assert not list(ckpts.glob(".*tmp"))  # the partial directory was removed

    monkeypatch.setattr(checkpoint_module, "save_file", real_save)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="causalvdm.train")
    assert train_script.main([str(cfg), "--exp-name", "full_disk", "--resume", "auto"]) == 0
    assert "(step 2," in caplog.text
    assert _steps(ckpts) == [4, 6]


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path, video_root, t5_dir):
    cfg = _config(tmp_path, video_root, t5_dir, steps=500, ckpt_every=1000)
    run = tmp_path / "outputs" / "preempted"
    proc = subprocess.Popen([sys.executable, "scripts/train.py", str(cfg), "--exp-name", "preempted"], cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "SIGTERM: checkpoint saved at step" in stderr
    steps = _steps(run / "checkpoints")
    assert len(steps) == 1 and 3 <= steps[0] < 500
