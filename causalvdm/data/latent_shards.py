"""Latent shards: every video of a pixel dataset encoded whole by the VAE, written atomically as safetensors shards
with an index.json that LatentDataset reads (tools/encode_latents.py writes them). A rerun keeps the shards that
still match their config and sources."""

import json
import logging
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm

from causalvdm.data.latents import LATENT_FORMAT, LATENT_INDEX_FILE, SHARD_META_KEY, shard_digest, shard_header
from causalvdm.data.video_clips import SourceVideo, VideoClipDataset
from causalvdm.data.video_io import NoReadableItemError, VideoReadError, first_line
from causalvdm.registry import ConfigError

log = logging.getLogger("causalvdm.data")

def shard_name(k: int) -> str:
    """File name of shard `k`."""
    return f"latents-{k:05d}.safetensors"


def _atomic(path: Path, write) -> None:
    # write to a temporary file beside `path`, then rename: a crash never leaves a half shard that looks whole
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def read_shard_meta(path: Path) -> dict | None:
    """The JSON description stored in a shard's header, or None if the shard is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        return json.loads(shard_header(path))
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as err:
        log.warning("%s: unreadable shard, encoding it again (%s)", path, first_line(err))
        return None


def video_fingerprint(video: SourceVideo) -> list:
    """What a video's latents were made from: its name, caption, and each file's size and modification time (a
    frame folder: its frames'), so an edited video or caption is encoded again."""
    files = video.frames or (video.path,)
    stats = [os.stat(f) for f in files]
    return [video.name, video.caption, sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)]


@torch.no_grad()
def encode_dataset(dataset: VideoClipDataset, vae, out_dir: Path, config: dict, shard_size: int = 256,
                   frames_per_call: int = 16, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Encode all videos of `dataset` into shards under `out_dir` and write the index; returns counts.

    `config` (JSON-able) identifies what produced the latents; shards written under another config are an
    error (so cached latents are never silently mixed), shards whose source files changed are re-encoded.
    Raises NoReadableItemError, and writes no index, when not one video can be read.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # The index goes first and comes back last: a run stopped half-way leaves none, not one that lies about its shards.
    (out_dir / LATENT_INDEX_FILE).unlink(missing_ok=True)
    n = len(dataset)
    num_shards = math.ceil(n / shard_size)
    metas = [read_shard_meta(out_dir / shard_name(k)) for k in range(num_shards)]
    for k, meta in enumerate(metas):
        if meta is not None and meta["config"] != config:
            raise ConfigError(f"{out_dir / shard_name(k)}: written from another vae/dataset config; "
                              "use another --out or delete it")
    items, skipped, reused = [], [], 0
    with tqdm(total=n, unit="video", desc="encoding latents") as bar:
        for k, meta in enumerate(metas):
            lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
            sources = [video_fingerprint(dataset.videos[i]) for i in range(lo, hi)]
            if meta is not None and meta["sources"] == sources:
                items += meta["items"]
                skipped += meta["skipped"]
                reused += 1
                bar.update(hi - lo)
                continue
            path = out_dir / shard_name(k)
            tensors, shard_items, shard_skipped = {}, [], []
            for i in range(lo, hi):
                name, caption = dataset.source(i)
                try:
                    chunks = [vae.encode(x[None].to(device))[0].to("cpu", dtype)  # (C, t, h, w)
                              for x in dataset.full_video_chunks(i, frames_per_call)]
                except VideoReadError as err:
                    log.warning("skipping unreadable video: %s", err)
                    shard_skipped.append(name)
                else:
                    z = torch.cat(chunks, dim=1).contiguous()  # (C, T, h, w)
                    tensors[str(i)] = z
                    shard_items.append(dict(shard=path.name, key=str(i), index=i, path=name, caption=caption,
                                            num_frames=z.shape[1]))
                bar.update(1)
            meta = dict(config=config, sources=sources, items=shard_items, skipped=shard_skipped)
            _atomic(path, lambda tmp: save_file(tensors, tmp, metadata={SHARD_META_KEY: json.dumps(meta)}))
            items += shard_items
            skipped += shard_skipped
    if not items:  # an index of no video would only fail later, in the training that reads it
        names = f" ({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''})" if skipped else ""
        raise NoReadableItemError(f"{type(dataset).__name__}: none of the {n} videos under {dataset.root} can be "
                                  f"read{names}; no {LATENT_INDEX_FILE} written")
    shards = {shard_name(k): shard_digest(out_dir / shard_name(k)) for k in range(num_shards)}
    index = dict(format=LATENT_FORMAT, config=config, latent_channels=vae.out_channels,
                 downsample=vae.downsample, image_size=list(dataset.image_size), shards=shards, items=items,
                 skipped=skipped)
    _write_text(out_dir / LATENT_INDEX_FILE, json.dumps(index, indent=1))
    return dict(encoded=len(items), skipped=len(skipped), shards=num_shards, reused=reused)
