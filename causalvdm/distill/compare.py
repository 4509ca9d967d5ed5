"""Teacher against few-step student on one real clip: PSNR per frame in each model's own rollout, PSNR per chunk when
the real frames before it are given (the exposure-bias gap), and time per chunk, all in one run on one machine."""

import math
from dataclasses import dataclass

import numpy as np

from causalvdm.registry import ConfigError


@dataclass
class Variant:
    """One row of the comparison: a name, the pipeline to sample with and its sampler and steps."""

    name: str
    pipe: object  # CausalVDMPipeline
    sampler: str
    num_steps: int


def chunk_starts(chunk_size: int, train_frames: int) -> list[int]:
    """The given-frame counts 1, 1 + k, ... whose next chunk ends within the first `train_frames` frames."""
    return list(range(1, train_frames - chunk_size + 1, chunk_size))


def beyond_band(drift: dict) -> dict:
    """How far the last chunk of a drift record (DriftMonitor.summary()) lies outside the band, per statistic, in grey
    levels (0: inside; the largest over colour channels) -> {statistic: levels}."""
    last = drift["chunks"][-1]
    out = {}
    for name in drift["band"]:
        low, high = np.asarray(drift["band"][name], dtype=float).reshape(-1, 2).T
        value = np.asarray(last[name], dtype=float).reshape(-1)
        out[name] = float(np.max(np.maximum(0.0, np.maximum(low - value, value - high))))
    return out


def compare(variants: list[Variant], video, num_frames: int, train_frames: int, seed: int = 0,
            long_frames: int = 0, prompt: str = "") -> dict:
    """Sample each variant from the clip's first frame (num_frames frames) and once per chunk of the training length
    from the real frames before it -> {variant: {psnr, psnr_repeat_last, frames, chunks, chunk_ms, frames_per_s,
    beyond_band, beyond_band_long}}.

    video: the clip (a path or float (3, T, H, W) in [-1, 1]); chunks: [{frames, rollout_db, given_db, gap_db}].
    chunk_ms: the median time of a rollout chunk (its denoising steps plus the commit). beyond_band: the drift of the
    rollout's last chunk (see `beyond_band`); beyond_band_long: the same for a `long_frames` rollout (0: not run).
    prompt: the caption of every rollout ("" : the null caption).
    """
    for v in variants:  # checked before any sampling: each measured chunk's given frames must fit the model's queue
        k, queue = v.pipe.generator.chunk_size, v.pipe.generator.max_cond_frames
        too_many = [n0 for n0 in chunk_starts(k, train_frames) if n0 > queue]
        if too_many:
            raise ConfigError(f"train_frames={train_frames}: the chunk after {too_many[0]} given frames needs them all "
                              f"in view, and the model's cache holds {queue} (autoregressive.max_cond_frames); "
                              "use the training clip length, model.max_tpe_len")
    result = {}
    for v in variants:
        common = dict(first_video=video, prompt=prompt, seed=seed, sampler=v.sampler, num_steps=v.num_steps,
                      output_type=None)
        v.pipe(first_frames=1, num_frames=num_frames, **common)
        metrics, chunk_seconds = v.pipe.info["metrics"], v.pipe.info["chunk_seconds"]
        drift = beyond_band(v.pipe.info["drift"])
        by_frame = dict(zip(metrics["frames"], metrics["psnr"]))
        k = v.pipe.generator.chunk_size
        chunks = []
        for n0 in chunk_starts(k, train_frames):
            v.pipe(first_frames=n0, num_frames=n0 + k, **common)
            given = float(np.mean(v.pipe.info["metrics"]["psnr"]))
            rollout = float(np.mean([by_frame[f] for f in range(n0, n0 + k)]))
            chunks.append(dict(frames=[n0, n0 + k - 1], rollout_db=rollout, given_db=given, gap_db=given - rollout))
        drift_long = None
        if long_frames:
            v.pipe(first_frames=1, num_frames=long_frames, **common)
            drift_long = beyond_band(v.pipe.info["drift"])
        chunk_ms = 1000 * float(np.median(chunk_seconds))
        result[v.name] = dict(sampler=v.sampler, num_steps=v.num_steps, frames=metrics["frames"], psnr=metrics["psnr"],
                              psnr_repeat_last=metrics["psnr_repeat_last"], chunks=chunks, chunk_ms=chunk_ms,
                              frames_per_s=1000 * k / chunk_ms, beyond_band=drift, beyond_band_long=drift_long)
    return result


def range_means(row: dict, ranges: list[tuple[int, int]], key: str = "psnr") -> list[float]:
    """Mean of row[key] over each inclusive frame range [first, last] (nan where no frame falls in it)."""
    means = []
    for first, last in ranges:
        values = [p for f, p in zip(row["frames"], row[key]) if first <= f <= last]
        means.append(float(np.mean(values)) if values else math.nan)
    return means


def plot_curves(result: dict, path, title: str = "", train_frames: int | None = None) -> None:
    """Per-frame PSNR of every variant's own rollout and of repeating the first frame, to a PNG; a dotted line after
    the training clip's last frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for name, row in result.items():
        ax.plot(row["frames"], row["psnr"], marker=".", label=f"{name} ({row['chunk_ms']:.0f} ms/chunk)")
    first = next(iter(result.values()))
    ax.plot(first["frames"], first["psnr_repeat_last"], color="grey", linestyle="--", label="repeat the first frame")
    if train_frames is not None:
        ax.axvline(train_frames - 0.5, color="black", linestyle=":", label=f"training length ({train_frames} frames)")
    ax.set_xlabel("frame")
    ax.set_ylabel("PSNR against the real clip (dB)")
    ax.set_title(title or "own rollout from the first frame")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
