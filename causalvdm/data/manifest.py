"""Videos listed in a manifest: reading and checking the .jsonl / .csv rows, and the dataset over them."""

import csv
import os
from pathlib import Path

from causalvdm.data.cache import DEFAULT_CACHE_BYTES
from causalvdm.data.video_clips import SourceVideo, VideoClipDataset
from causalvdm.registry import DATASETS
from causalvdm.utils.io import inside_root, iter_jsonl


def read_manifest(path: Path) -> list[dict]:
    """Rows of a .jsonl or .csv manifest: dicts with "path", "caption", "num_frames" (None if not given), "line".

    Raises a one-line ValueError naming the file (and line) for a missing, empty or malformed manifest.
    """
    if not path.is_file():
        raise ValueError(f"{path}: manifest not found")
    if path.suffix not in (".jsonl", ".csv"):
        raise ValueError(f"{path}: manifest must be a .jsonl or .csv file")
    if path.suffix == ".jsonl":
        rows = list(iter_jsonl(path))
    else:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"path", "caption"} - set(reader.fieldnames or ())
            if reader.fieldnames is not None and missing:
                raise ValueError(f"{path}: line 1: header lacks column(s) {', '.join(sorted(missing))}")
            rows = [(reader.line_num, row) for row in reader]
    if not rows:
        raise ValueError(f"{path}: manifest has no rows")
    return [_check_row(path, line_no, row) for line_no, row in rows]


def _check_row(path: Path, line_no: int, row) -> dict:
    where = f"{path}: line {line_no}"
    if not isinstance(row.get("path"), str) or not row["path"]:
        raise ValueError(f"{where}: missing or empty field 'path'")
    if not isinstance(row.get("caption"), str):
        raise ValueError(f"{where}: missing field 'caption' (use \"\" for none)")
    out = {"path": row["path"], "caption": row["caption"], "num_frames": None, "line": line_no}
    if row.get("num_frames") not in (None, ""):  # a hint that saves probing the file; fps is accepted, unused
        try:
            out["num_frames"] = int(row["num_frames"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: num_frames must be an integer, got {row['num_frames']!r}") from None
        if out["num_frames"] < 1:
            raise ValueError(f"{where}: num_frames must be >= 1, got {out['num_frames']}")
    return out


@DATASETS.register_module()
class VideoManifestDataset(VideoClipDataset):
    """Videos listed in a manifest (.jsonl or .csv rows {path, caption[, num_frames, fps]}), paths relative to root.

    `manifest` is absolute or relative to `root` (or, failing that, to the working directory).
    `cache_bytes`: keep the decoded videos in memory if all fit in this (per process; see VideoClipDataset).
    `allow_outside_root`: accept rows whose path leaves `root` (`..`, or absolute elsewhere); else they are an error.
    """

    def __init__(self, root: str, manifest: str, num_frames: int, image_size: int | tuple[int, int],
                 sample_interval: int = 1, random_crop: bool = True, seed: int = 0,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, allow_outside_root: bool = False):
        super().__init__(root, num_frames, image_size, sample_interval, random_crop, seed, cache_bytes)
        manifest_path = self.root / manifest
        if not manifest_path.is_file() and Path(manifest).is_file():
            manifest_path = Path(manifest)
        self.manifest = manifest_path
        for row in read_manifest(manifest_path):
            # normalised, so the file read is the one checked; an absolute row path replaces the root
            path = Path(os.path.normpath(self.root / row["path"]))
            if not allow_outside_root and not inside_root(self.root, path):
                raise ValueError(f"{manifest_path}: line {row['line']}: path {row['path']!r} is outside the dataset "
                                 f"root {self.root} (set dataset.allow_outside_root=True to read it anyway)")
            self.videos.append(SourceVideo(path, row["path"], row["caption"], num_frames=row["num_frames"]))
