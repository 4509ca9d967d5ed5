"""Training checkpoints: one directory per step, written under a temporary name and renamed when complete.

outputs/<exp>/checkpoints/step_00001000/
    model.safetensors   raw weights          ema.safetensors   EMA weights (what sampling loads)
    train_state.pt      optimizer, LR schedule, step, data position, RNG states (weights-only loadable)
    optimizer/          instead of the optimizer in train_state.pt when the model is sharded (FSDP2 over several
                        processes): each process writes its own shard with torch.distributed.checkpoint, so no
                        process gathers the whole optimizer state; it loads back at any world size
    config.py           the resolved config of the run
A directory is complete exactly when it carries its final name, so `--resume auto` never picks a
half-written one, and a failed write (a full disk, a kill) leaves the previous checkpoints usable. The optimizer's
shards are written and every state is read back into a (wrapped) model here; the Trainer assembles what it counts.
"""

import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from causalvdm.training.distributed import DistInfo, any_process
from causalvdm.training.ema import EMA
from causalvdm.utils.weights import CheckpointError, check_architecture, load_weights

log = logging.getLogger("causalvdm.train")

FILES = ("model.safetensors", "ema.safetensors", "train_state.pt")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SHARDED_OPTIMIZER = "optimizer"  # the torch.distributed.checkpoint folder of a sharded optimizer state


def staging_dir(ckpt_dir: Path, step: int) -> Path:
    """The temporary directory a step's checkpoint is written into before `save_checkpoint` renames it."""
    return ckpt_dir / f".step_{step:08d}.tmp"


def start_checkpoint(ckpt_dir: Path, step: int) -> Path:
    """An empty staging directory for `step` (main process), for files other processes write into too."""
    tmp = staging_dir(ckpt_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(ckpt_dir: Path, step: int, model_state: dict, ema_state: dict, train_state: dict,
                    config_text: str, keep_last: int) -> Path:
    """Write a complete checkpoint for `step` atomically, then prune all but the newest `keep_last`.

    Files already in the staging directory (a sharded optimizer state) become part of it; otherwise it is made here.
    """
    final = ckpt_dir / f"step_{step:08d}"
    tmp = staging_dir(ckpt_dir, step)
    if not tmp.is_dir():
        start_checkpoint(ckpt_dir, step)
    try:
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
        torch.save(train_state, tmp / "train_state.pt")
        (tmp / "config.py").write_text(config_text)
        for name in (*FILES, "config.py"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # re-saving a step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    # The exact name this module writes: a user's step_00000100_backup copy is neither resumed nor pruned.
    found = [p for p in ckpt_dir.glob("step_*") if re.fullmatch(r"step_\d{8}", p.name) and p.is_dir()
             and all((p / f).is_file() for f in FILES)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resolve_resume(resume: str | None, ckpt_dir: Path) -> Path | None:
    """`--resume auto` -> newest complete checkpoint (or None to start fresh); a path must exist."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not all((path / f).is_file() for f in FILES):
        raise CheckpointError(f"{path}: not a complete checkpoint directory (needs {', '.join(FILES)})")
    return path


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """Read (model state, EMA state, train state) with the safe loaders."""
    return load_weights(path / "model.safetensors"), load_weights(path / "ema.safetensors"), load_weights(
        path / "train_state.pt"
    )


def save_optimizer_shards(ckpt_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          info: DistInfo) -> str:
    """Every process writes its optimizer shard into the step's staging directory (a collective) -> '' or why not."""
    failure = ""
    if info.is_main:
        try:
            start_checkpoint(ckpt_dir, step)
        except OSError as err:
            failure = str(err) or type(err).__name__
    if any_process(bool(failure), info):  # also the barrier: the directory exists for everyone after it
        return failure or "on the main process"
    try:
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=staging_dir(ckpt_dir, step) / SHARDED_OPTIMIZER)
    except Exception as err:  # DCP reports a failed write of any process to all of them, in its own types
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ""


def restore_checkpoint(path: Path, ckpt_dir: Path, model: torch.nn.Module, core: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, ema: EMA) -> dict:
    """Load the weights, optimizer and EMA of the checkpoint `path` into a run writing to `ckpt_dir` -> its train
    state (counters, LR schedule, RNG) for the caller. model: as wrapped for training; core: the plain model."""
    model_state, ema_state, state = load_checkpoint(path)
    check_architecture(path / "model.safetensors", model_state, core)
    newer = [p for p in list_checkpoints(ckpt_dir) if int(p.name.split("_")[1]) > state["step"]]
    if newer:  # continuing would overwrite and prune them: the run's history
        raise CheckpointError(f"{ckpt_dir}: holds checkpoints after step {state['step']} (up to "
                              f"{newer[-1].name}) that continuing from {path} would overwrite; resume the newest "
                              "(--resume auto) or move them away first")
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    if "optimizer" in state:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:  # saved as shards: read into this run's layout, whatever the number of processes that wrote them
        optimizer_state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(optimizer_state, checkpoint_id=path / SHARDED_OPTIMIZER)
        set_optimizer_state_dict(model, optimizer, optimizer_state["optimizer"])
    ema.load_state_dict(ema_state)
    return state
