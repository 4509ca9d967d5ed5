"""What every command line shares: one-line errors (with `--debug` / CAUSALVDM_DEBUG=1 for the traceback) and
argument types that check their range where the flag is read."""

import argparse
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from causalvdm.data.video_io import VideoReadError
from causalvdm.registry import ConfigError
from causalvdm.utils.weights import CheckpointError

DEBUG_ENV = "CAUSALVDM_DEBUG"

# Errors that mean "the input is wrong", not "the code is wrong": their message is the whole story.
USER_ERRORS = (ConfigError, CheckpointError, VideoReadError, OSError)


def debugging() -> bool:
    """True when the user asked for tracebacks (`--debug`, or CAUSALVDM_DEBUG=1 in the environment)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_line(err: BaseException) -> str:
    """The first line of an error's message; an OSError names its file ("path: No space left on device")."""
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


@contextmanager
def one_line_errors(*types: type[BaseException], prefix: str = ""):
    """Turn `types` (default USER_ERRORS) raised inside into `error: <prefix><message>` and exit code 1, unless
    debugging() (then the traceback shows). Under torchrun every process reads the same inputs, so only rank 0
    prints the line; the others exit with the same code."""
    try:
        yield
    except types or USER_ERRORS as err:
        if debugging():
            raise
        if int(os.environ.get("RANK", 0)):
            raise SystemExit(1) from None
        raise SystemExit(f"error: {prefix}{error_line(err)}") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a `--debug` flag and errors on one line (the usage is one `--help` away)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)
        self.add_argument("--debug", action="store_true", help=f"show the full traceback of an error (same as "
                          f"{DEBUG_ENV}=1; under torchrun it also keeps torchrun's own failure report)")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if parsed.debug:
            os.environ[DEBUG_ENV] = "1"  # seen by one_line_errors and by processes started from here
        return parsed

    def error(self, message):
        quiet = int(os.environ.get("RANK", 0))  # under torchrun every process parses the same flags
        self.exit(2, None if quiet else f"{self.prog}: error: {message} (--help lists the flags)\n")


def _number(kind, low, high, inclusive_low=True):
    """An argparse type: `kind(text)` within [low, high] (or (low, high] when not inclusive_low), finite."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if (low is not None and (value < low if inclusive_low else value <= low)) or (high is not None and value > high):
            bound = f"{'>=' if inclusive_low else '>'} {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, None)
non_negative_int = _number(int, 0, None)
finite_float = _number(float, None, None)
positive_float = _number(float, 0, None, inclusive_low=False)
non_negative_float = _number(float, 0, None)
x264_crf = _number(int, 1, 51)  # 0 would be lossless H.264, which browsers do not play


def device_arg(text: str) -> torch.device:
    """An argparse type: a torch device that exists on this machine ('cpu', 'cuda', 'cuda:1'), checked where the flag
    is read, so 'gpu', 'mps' or a GPU id that is not here never reaches the work."""
    try:
        device = torch.device(text.strip().lower())
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if not count:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available on this machine")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), 0..{count - 1}")
    return device


def _writable_place(text: str, folder: bool) -> Path:
    """`text` as a path (`~` expanded) that this process could create or replace: a folder (`folder`) or a file,
    whose nearest existing parent is a writable folder. Nothing is created, so a later bad flag leaves no trace."""
    path = Path(text).expanduser()
    what = "folder" if folder else "file"
    if not text.strip():
        raise argparse.ArgumentTypeError(f"an empty path is not a {what}")
    if path.exists() and path.is_dir() != folder:
        raise argparse.ArgumentTypeError(f"{text!r} is a {'file' if folder else 'folder'}, not a {what}")
    if not folder and text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    existing = path if path.exists() else next(parent for parent in path.absolute().parents if parent.exists())
    if not existing.is_dir() and existing != path:
        raise argparse.ArgumentTypeError(f"{text!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
        raise argparse.ArgumentTypeError(f"{text!r}: {existing} is not writable")
    return path


def output_file(text: str) -> Path:
    """An argparse type: a file the program can write, checked where the flag is read, before any work whose figures
    would be lost at the end; `~` is expanded."""
    return _writable_place(text, folder=False)


def output_dir(text: str) -> Path:
    """An argparse type: a folder the program can make or write into, checked before any work; `~` is expanded."""
    return _writable_place(text, folder=True)
