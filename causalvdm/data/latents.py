"""Latent videos cached by tools/encode_latents.py: its index file, and the dataset that reads clips of them from the
memory-mapped safetensors shards."""

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from causalvdm.data.datasets import ClipDataset
from causalvdm.data.video_io import VideoReadError, first_line
from causalvdm.registry import DATASETS
from causalvdm.utils.io import inside_root

log = logging.getLogger("causalvdm.data")

LATENT_INDEX_FILE = "index.json"  # written by tools/encode_latents.py next to its shards
LATENT_FORMAT = "causalvdm-latents/1"
SHARD_META_KEY = "causalvdm"  # safetensors header metadata entry holding a shard's JSON description


def shard_header(path: Path) -> str:
    """The JSON description a shard keeps in its safetensors header (read without loading any tensor)."""
    with safe_open(os.fspath(path), framework="pt") as f:
        return f.metadata()[SHARD_META_KEY]


def shard_digest(path: Path) -> str:
    """A digest of a shard's description: the index records it, so a shard rewritten after the index is noticed."""
    return hashlib.sha256(shard_header(path).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Latent:
    """One cached latent video: the shard holding it, its key there, its caption and frame count."""

    shard: Path
    key: str
    caption: str
    num_frames: int


@DATASETS.register_module()
class LatentDataset(ClipDataset):
    """Latent videos cached by tools/encode_latents.py (root = its --out directory); clips as for pixels.

    Reads only the clip's frames from the memory-mapped safetensors shards; never builds a VAE. Items
    have "latents" (C, num_frames, h, w) float32. Latent videos shorter than a clip are left out.
    """

    def __init__(self, root: str, num_frames: int, sample_interval: int = 1, seed: int = 0):
        super().__init__(root, num_frames, sample_interval, seed)
        index_path = self.root / LATENT_INDEX_FILE
        if not index_path.is_file():
            raise ValueError(f"{index_path}: not found (write it with tools/encode_latents.py)")
        try:
            index = json.loads(index_path.read_text())
            if index.get("format") != LATENT_FORMAT:
                raise ValueError(f"format is {index.get('format')!r}, expected {LATENT_FORMAT!r}")
            items = [_Latent(Path(os.path.normpath(self.root / it["shard"])), it["key"], it["caption"],
                             int(it["num_frames"])) for it in index["items"]]
            self.sources = {it["key"]: it["path"] for it in index["items"]}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index_path}: not a latent index ({first_line(err)})") from None
        self._check_shards(index_path, index.get("shards", {}))
        for number, entry in enumerate(index["items"], 1):
            # tools/encode_latents.py writes bare shard names: one leaving the root was edited in
            if not inside_root(self.root, self.root / entry["shard"]):
                raise ValueError(f"{index_path}: item {number}: shard {entry['shard']!r} is outside the dataset "
                                 f"root {self.root}")
        self.latents = [it for it in items if it.num_frames >= self.span]
        if len(self.latents) < len(items):
            log.warning("%s: %d of %d latent videos have fewer than %d frames and are not used",
                        index_path, len(items) - len(self.latents), len(items), self.span)
        if not self.latents:
            raise ValueError(f"{index_path}: no latent video has the {self.span} frames a sample needs")

    def _check_shards(self, index_path: Path, shards: dict) -> None:
        """Fail with one line when a shard the index lists is missing or was written after the index."""
        for name, digest in shards.items():
            path = self.root / name
            try:
                same = shard_digest(path) == digest
            except (OSError, SafetensorError, KeyError, TypeError) as err:
                raise ValueError(f"{path}: listed in {index_path} but unreadable ({first_line(err)}); run "
                                 "tools/encode_latents.py again") from None
            if not same:
                raise ValueError(f"{path}: rewritten after {index_path} was (an interrupted encode?); run "
                                 "tools/encode_latents.py again")

    def __len__(self) -> int:
        return len(self.latents)

    def source(self, index: int) -> tuple[str, str]:
        item = self.latents[index]
        return self.sources[item.key], item.caption

    def load(self, index: int, generator: torch.Generator) -> dict:
        item = self.latents[index]
        name = f"{item.shard}[{item.key}]"
        frames = self.clip_indices(item.num_frames, generator, name)
        try:
            with safe_open(os.fspath(item.shard), framework="pt") as f:
                z = f.get_slice(item.key)[:, frames.start:frames.stop]  # (C, span, h, w)
        except (OSError, SafetensorError) as err:
            raise VideoReadError(f"{name}: cannot read latents ({first_line(err)})") from err
        if z.dim() != 4 or z.shape[1] != self.span:
            raise VideoReadError(f"{name}: stored shape {tuple(z.shape)} does not hold {item.num_frames} frames")
        return {"latents": z[:, ::self.sample_interval].float().contiguous(), "caption": item.caption}
