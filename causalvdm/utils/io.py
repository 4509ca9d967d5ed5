"""Files and folders: JSON written atomically, JSON-lines manifests with errors that name the file and line, output
names and folders checked before work whose results would be lost, paths kept inside a root. Weights files are
utils/weights.py's."""

import json
import os
import shutil
import tempfile
from pathlib import Path

from causalvdm.registry import ConfigError


def write_json(path: str | Path, data: dict) -> None:
    """Write `data` as JSON through a temporary file and a rename, so a kill mid-write leaves the previous whole
    file (benchmarks rewrite their figures as each measurement ends); the folder is made if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file as editors save it: a byte-order mark is dropped and Windows line ends read as "\\n";
    a file that is not UTF-8 is a one-line ValueError naming it and the line."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text (save it as UTF-8)") from None
    return text.replace("\r\n", "\n")


def iter_jsonl(path: str | Path):
    """Yield (line number, object) for each non-blank line of a JSON-lines file (read by `read_text`).

    Raises a one-line ValueError naming the file and line for a line that is not a JSON object.
    """
    for line_no, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {line_no}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {line_no}: expected an object, got {type(row).__name__}")
        yield line_no, row


def plain_name(name: str, what: str) -> str:
    """`name` if it is a plain file name (an output goes exactly where asked), else a one-line ValueError naming `what`.

    A name with a folder in it (`../x`, `/tmp/x`, `a/b`) would write outside the folder it is meant for.
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
        raise ValueError(f"{what} {name!r} must be a plain name: no folders, '..' or surrounding spaces")
    return name


def writable_dir(path: str | Path, what: str) -> Path:
    """Create the folder `path` if needed and check a file can be written in it -> path.

    Fails with one line naming `what` (e.g. "--out") for a file in the way, no permission or a read-only disk,
    before any work whose results would be lost.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: {what} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"{path}: {what} is not writable ({err.strerror})") from None
    return path


def check_free_space(path: str | Path, needed: int, what: str) -> None:
    """Fail with one line when the disk holding `path` has less than `needed` bytes free for `what`."""
    free = shutil.disk_usage(path).free
    if free < needed:
        raise ConfigError(f"{path}: {free / 2**20:.1f} MiB free, {what} needs about {needed / 2**20:.1f} MiB")


def inside_root(root: Path, path: Path) -> bool:
    """Whether `path` is `root` or below it, judged on the normalised text of both (`..` is followed lexically).

    Symlinks are not resolved: data roots are often links to other disks.
    """
    base = os.path.abspath(root)
    return os.path.commonpath([base, os.path.abspath(path)]) == base
