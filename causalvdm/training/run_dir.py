"""A run folder belongs to one run: it is locked while the run lives, and an earlier run in it is never overwritten
unless asked (`--resume` continues it, `--overwrite` starts over and deletes its files)."""

import fcntl
import os
import shutil
from pathlib import Path

from causalvdm.config import config_strings
from causalvdm.registry import ConfigError
from causalvdm.training.checkpoint import list_checkpoints

LOCK = ".lock"
# What a run writes into its folder: --overwrite deletes these and nothing else.
RUN_FILES = ("checkpoints", "tensorboard", "samples", "metrics.jsonl", "train.log", "loss.png", "config.py")


class RunLock:
    """An exclusive lock on `run_dir/.lock` (flock: released by the kernel when the process ends, even on SIGKILL)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        try:
            self.file = open(self.path, "a+")
        except OSError as err:
            raise ConfigError(f"{run_dir}: the run folder is not writable ({err.strerror})") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise ConfigError(f"{run_dir}: in use by another run (pid {holder}); wait for it to finish or choose "
                              "another --exp-name") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        """Give the folder back (the lock file stays; only the lock on it matters)."""
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def config_paths(config: dict) -> dict[str, Path]:
    """{"section.field": path} of every string in a config (`config_strings`) that names an existing file or folder:
    the run's inputs (a teacher checkpoint, data, model folders)."""
    return {key: Path(value) for key, value in config_strings(config) if value and Path(value).exists()}


def claim_run_dir(run_dir: Path, resume: str | None, overwrite: bool,
                  inputs: dict[str, Path] | None = None) -> RunLock:
    """Create and lock the run folder; refuse one holding an earlier run unless resuming it or overwriting it.

    inputs: {"field": path} the run reads; --overwrite refuses to delete any of them. Raises ConfigError with one
    line naming the folder and the flags that would go on.
    """
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite deletes it: give one of them")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{run_dir}: cannot create the run folder ({err.strerror or err})") from None
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: exists and is not a folder")
    lock = RunLock(run_dir)
    earlier = list_checkpoints(run_dir / "checkpoints")
    if resume or not (earlier or (run_dir / "metrics.jsonl").is_file()):
        return lock
    if overwrite:
        doomed = [run_dir.resolve() / name for name in RUN_FILES if (run_dir / name).exists()]
        for field, path in (inputs or {}).items():
            if any(path.resolve().is_relative_to(target) for target in doomed):
                lock.release()
                raise ConfigError(f"--overwrite would delete {path}, which this run reads ({field}); move it out of "
                                  f"{run_dir} first, or use another --exp-name")
        for name in RUN_FILES:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return lock
    lock.release()
    last = f" (checkpoints up to {earlier[-1].name})" if earlier else ""
    raise ConfigError(f"{run_dir}: holds an earlier run{last}; pass --resume auto to continue it, --overwrite to "
                      "delete it and start over, or another --exp-name")
