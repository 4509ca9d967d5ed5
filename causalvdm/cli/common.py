"""What every command line shares: one-line errors (with `--debug` / CAUSALVDM_DEBUG=1 for the traceback) and
argument types that check their range where the flag is read."""

import argparse
import math
import os
from contextlib import contextmanager

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
