"""Faults injected into training: non-finite losses, a checkpoint write that fails half-way, SIGTERM and Ctrl-C."""

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

import torch
from safetensors.torch import load_file

from causalvdm.training import checkpoint as checkpoint_module
from causalvdm.training import trainer as trainer_module
from causalvdm.training.checkpoint import list_checkpoints
from causalvdm.utils import io as io_module
from conftest import ROOT
from test_training import _config, _env, _free_port


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


def _train_until_logged(command, run, steps: int, **popen):
    """Start a training command and return its process once `steps` lines are in its metrics.jsonl."""
    proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, **popen)
    deadline = time.time() + 240
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            break
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_a_checkpoint_then_exits(tmp_path, video_root, t5_dir, sig, code):
    cfg = _config(tmp_path, video_root, t5_dir, steps=500, ckpt_every=1000)
    run = tmp_path / "outputs" / "preempted"
    proc = _train_until_logged([sys.executable, "scripts/train.py", str(cfg), "--exp-name", "preempted"], run, 3)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-2000:]
    assert f"{sig.name}: checkpoint saved at step" in stderr
    assert "Traceback" not in stderr, stderr[-2000:]
    steps = _steps(run / "checkpoints")
    assert len(steps) == 1 and 3 <= steps[0] < 500


def test_ctrl_c_under_torchrun_saves_a_checkpoint(tmp_path, video_root, t5_dir):
    """Ctrl-C in a terminal reaches torchrun and its worker at once (one process group), and torchrun passes it on
    again: the worker saves once, and each process says one line."""
    cfg = _config(tmp_path, video_root, t5_dir, steps=500, ckpt_every=1000)
    run = tmp_path / "outputs" / "ctrl_c"
    proc = _train_until_logged(["bash", "scripts/train.sh", str(cfg), "ctrl_c", str(_free_port())], run, 3,
                               start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "SIGINT: checkpoint saved at step" in stderr and "Traceback" not in stderr, stderr[-2000:]
    steps = _steps(run / "checkpoints")
    assert len(steps) == 1 and 3 <= steps[0] < 500


def test_run_folder_of_an_earlier_run_is_refused_then_resumed_or_overwritten(tmp_path, video_root, t5_dir,
                                                                            train_script):
    cfg = _config(tmp_path, video_root, t5_dir, steps=2, ckpt_every=2)
    run = tmp_path / "outputs" / "again"
    assert train_script.main([str(cfg), "--exp-name", "again"]) == 0
    metrics = (run / "metrics.jsonl").read_text()
    backup = run / "checkpoints" / "step_00000002_backup"  # a user's copy, named like a checkpoint
    shutil.copytree(run / "checkpoints" / "step_00000002", backup)

    with pytest.raises(SystemExit, match=r"error: .*again: holds an earlier run \(checkpoints up to step_00000002\); "
                                         r"pass --resume auto"):
        train_script.main([str(cfg), "--exp-name", "again"])
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing of the earlier run was touched
    with pytest.raises(SystemExit, match="give one of them"):
        train_script.main([str(cfg), "--exp-name", "again", "--resume", "auto", "--overwrite"])

    # resume: the backup is neither the newest checkpoint nor pruned (keep_last=2 with steps 2 and 4); the run's
    # config.py stays as it started, the checkpoints hold the config they were written with
    config = (run / "config.py").read_text()
    assert train_script.main([str(cfg), "--exp-name", "again", "--resume", "auto",
                              "--cfg-options", "train.max_steps=6"]) == 0
    assert _steps(run / "checkpoints") == [4, 6] and backup.is_dir()
    assert (run / "config.py").read_text() == config and "max_steps=2" in config
    assert "max_steps=6" in (run / "checkpoints" / "step_00000006" / "config.py").read_text()

    assert train_script.main([str(cfg), "--exp-name", "again", "--overwrite"]) == 0
    assert _steps(run / "checkpoints") == [2] and not backup.exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # a new history, not appended to the old


def test_a_locked_run_folder_is_refused(tmp_path, video_root, t5_dir, train_script):
    cfg = _config(tmp_path, video_root, t5_dir, steps=2, ckpt_every=2)
    run = tmp_path / "outputs" / "busy"
    run.mkdir(parents=True)
    with open(run / ".lock", "w") as held:  # another run holds the folder
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SystemExit, match=r"busy: in use by another run \(pid 4242\)"):
            train_script.main([str(cfg), "--exp-name", "busy"])
    assert train_script.main([str(cfg), "--exp-name", "busy"]) == 0  # free again once released


def test_launcher_refuses_an_earlier_run_on_every_process(tmp_path, video_root, t5_dir):
    """Through train.sh under torchrun with 2 processes: one error line, a non-zero exit, no process left waiting."""
    cfg = _config(tmp_path, video_root, t5_dir, steps=1, ckpt_every=1)
    (tmp_path / "outputs" / "two" / "checkpoints").mkdir(parents=True)
    (tmp_path / "outputs" / "two" / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = subprocess.run(["bash", "scripts/train.sh", str(cfg), "two", str(_free_port())], cwd=ROOT,
                          env=dict(_env(), NPROC_PER_NODE="2"), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "two: holds an earlier run; pass --resume auto" in proc.stderr


def test_too_little_disk_for_a_checkpoint_stops_before_step_1(tmp_path, video_root, t5_dir, train_script,
                                                             monkeypatch, caplog):
    cfg = _config(tmp_path, video_root, t5_dir, steps=2, ckpt_every=2)
    monkeypatch.setattr(io_module.shutil, "disk_usage", lambda path: SimpleNamespace(free=10_000))
    assert train_script.main([str(cfg), "--exp-name", "full"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and re.search(r"full: 0\.0 MiB free, one checkpoint needs about [\d.]+ MiB", errors[0]), errors
    run = tmp_path / "outputs" / "full"
    assert not (run / "metrics.jsonl").exists() and not list_checkpoints(run / "checkpoints")


def test_overwrite_never_deletes_what_the_run_reads(tmp_path, video_root, t5_dir, train_script):
    """A student distilled with --overwrite in the folder that holds its teacher: the teacher stays, one line says
    why (it was deleted before it was read)."""
    cfg = _config(tmp_path, video_root, t5_dir, steps=2, ckpt_every=2)
    run = tmp_path / "outputs" / "teacher_here"
    assert train_script.main([str(cfg), "--exp-name", "teacher_here"]) == 0
    teacher = run / "checkpoints" / "step_00000002"
    with pytest.raises(SystemExit, match=rf"error: --overwrite would delete {re.escape(str(teacher))}, which this "
                                         r"run reads \(distill\.teacher\)"):
        train_script.main([str(cfg), "--exp-name", "teacher_here", "--overwrite", "--cfg-options",
                           f"distill.teacher={teacher}", "distill.num_steps=2", "distill.teacher_steps=4"])
    assert _steps(run / "checkpoints") == [2] and (teacher / "ema.safetensors").is_file()

