"""Drift monitor: cheap statistics of a generated video, chunk by chunk, checked against a band set by its first frames.

A long autoregressive video goes wrong slowly (colours shift, frames blur or freeze), hundreds of frames in. These
numbers show where, at a few milliseconds per chunk, with no network and no frames kept.
"""

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from causalvdm.eval.metrics import LUMA_WEIGHTS, frame_stats, token_grid_ratio

log = logging.getLogger("causalvdm.drift")

STATISTICS = ("mean", "std", "sharpness", "change")  # checked against the band; psnr is recorded and plotted only
TOKEN_GRID = "token_grid"  # also banded when the monitor knows the model's token size in pixels
CHANNELS = ("r", "g", "b")
REFERENCE_FRAMES = 8  # about one chunk: enough frames for a spread, few enough that the band is set early
BAND_K = 3.0
# Smallest band half-widths, in grey levels (0-255; token_grid: a ratio). With one given frame the spread is zero, and
# a real clip's own lighting and motion move these numbers by a few levels; the floors keep such changes inside.
BAND_FLOORS = dict(mean=8.0, std=6.0, sharpness=4.0, change=3.0, token_grid=0.15)
LUMA = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64)
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64).view(1, 1, 3, 3)


def sharpness(frames: torch.Tensor) -> torch.Tensor:
    """Root mean squared Laplacian of the grey image: frames (t, H, W, 3) uint8 -> (t,) float64, in grey levels.

    Grey is the BT.601 luma; the 4-neighbour 3x3 Laplacian is taken at interior pixels only (frames >= 3x3).
    0 for a flat frame or a linear gradient; it falls as frames blur and rises with noise.
    """
    grey = frames.to(torch.float64) @ LUMA  # (t, H, W)
    laplacian = F.conv2d(grey[:, None], LAPLACIAN)  # (t, 1, H-2, W-2)
    return laplacian.square().mean(dim=(1, 2, 3)).sqrt()


def frame_values(frames: np.ndarray, previous: np.ndarray | None = None,
                 token: tuple[int, int] | None = None) -> dict[str, list]:
    """Drift statistics of each frame: frames (t, H, W, 3) uint8 -> {statistic: t values}, on the 0-255 scale.

    mean, std: [r, g, b] over the frame's pixels; sharpness: see `sharpness`; change: mean absolute difference to
    the frame before, the first one's to `previous` (H, W, 3) (None without it); with `token` (th, tw) pixels also
    token_grid (`eval.metrics.token_grid_ratio`; None for a frame under two tokens).
    """
    x = torch.from_numpy(frames)
    before = [None if previous is None else torch.from_numpy(previous), *x[:-1]]
    values = {name: [] for name in STATISTICS}
    if token is not None:
        values[TOKEN_GRID] = [None if math.isnan(v) else v for v in token_grid_ratio(x, token).tolist()]
    for frame, prev in zip(x, before):  # one frame at a time: float64 copies of a whole chunk can be large
        stats = frame_stats(frame[None])
        values["mean"].append(stats["mean"])
        values["std"].append(stats["std"])
        values["sharpness"].append(sharpness(frame[None]).item())
        values["change"].append(None if prev is None else frame_stats(torch.stack([prev, frame]))["mean_abs_diff"])
    return values


def reference_band(values: list, k: float = BAND_K, floor: float = 0.0) -> np.ndarray:
    """Per-frame values (n,) or (n, c) -> band (c, 2) of low, high: mean ± max(k * std, floor) per column.

    std is the population standard deviation over the n frames.
    """
    v = np.asarray(values, dtype=np.float64).reshape(len(values), -1)  # (n, c)
    half = np.maximum(k * v.std(axis=0), floor)
    return np.stack([v.mean(axis=0) - half, v.mean(axis=0) + half], axis=1)


class DriftMonitor:
    """Per-chunk drift statistics of a video fed chunk by chunk (given frames first), and where they leave their band.

    A chunk's value of a statistic is the mean of its frames' values (`frame_values`). The band of each statistic
    (each channel of mean and std) is  reference mean ± max(k * reference spread, floor)  over the per-frame values
    of the reference frames: the given frames when there are at least `reference_frames` of them, else the first
    `reference_frames` frames of the video (the given ones, then generated ones). Keeps a few numbers per chunk.
    token: the model's token in pixels (VAE factor x patch), to watch for token-grid artifacts too.
    """

    def __init__(self, reference_frames: int = REFERENCE_FRAMES, k: float = BAND_K, floors: dict | None = None,
                 token: tuple[int, int] | None = None):
        if reference_frames < 2:
            raise ValueError(f"reference_frames must be >= 2 (change needs a pair), got {reference_frames}")
        self.reference_frames, self.k, self.token = reference_frames, k, token
        self.statistics = STATISTICS + ((TOKEN_GRID,) if token is not None else ())
        self.floors = {**BAND_FLOORS, **(floors or {})}
        self.chunks: list[dict] = []  # one record per add()
        self.band: dict[str, np.ndarray] | None = None  # statistic -> (channels, 2) low, high; None until set
        self.left_band: dict[str, dict] = {}  # statistic -> the chunk where it first left the band
        self.reference_count = 0  # frames whose values make the band
        self._reference = {name: [] for name in self.statistics}  # their per-frame values, dropped once the band is set
        self._frames = self._given = self._generated = 0
        self._last = None  # the last frame (H, W, 3): the next chunk's first `change` is taken against it

    def add(self, frames: np.ndarray, given: bool = False, psnr=None, psnr_repeat_last=None) -> dict:
        """Record the next frames (t, H, W, 3) uint8 as one chunk -> its record.

        given: conditioning frames (before any generated chunk). psnr, psnr_repeat_last: per-frame PSNR (dB) of those
        of the chunk's frames that have a real frame, of the video and of repeating the last given frame; averaged.
        """
        if given and self._frames > self._given:
            raise ValueError("given frames must come before the generated ones")
        values = frame_values(frames, self._last, self.token)
        self._last = frames[-1].copy()
        record = dict(chunk=None if given else self._generated, start=self._frames, frames=len(frames), given=given)
        for name, per_frame in values.items():
            known = [v for v in per_frame if v is not None]
            record[name] = np.mean(known, axis=0).tolist() if known else None
        record["psnr"] = float(np.mean(psnr)) if psnr else None
        record["psnr_repeat_last"] = float(np.mean(psnr_repeat_last)) if psnr_repeat_last else None
        record["out_of_band"] = []
        self.chunks.append(record)
        self._frames += len(frames)
        self._given += len(frames) if given else 0
        self._generated += 0 if given else 1

        if self.band is not None:
            self._check(record)
            return record
        if given or self.reference_count < self.reference_frames:
            take = len(frames) if given else self.reference_frames - self.reference_count
            for name in self.statistics:
                self._reference[name] += values[name][:take]
            self.reference_count += min(take, len(frames))
        if not given and self.reference_count >= self.reference_frames:
            self.band = {name: reference_band(known, self.k, self.floors[name]) for name in self.statistics
                         if (known := [v for v in self._reference[name] if v is not None])}
            self._reference = None
            for earlier in self.chunks:  # the reference chunks too: a chunk can leave the band its frames helped set
                self._check(earlier)
        return record

    def _check(self, record: dict) -> None:
        """Mark the statistics of `record` outside the band; log one warning the first time each one leaves it."""
        for name in self.band:
            if record[name] is None:
                continue
            value = np.atleast_1d(record[name])
            low, high = self.band[name].T  # (channels,)
            out = np.flatnonzero((value < low) | (value > high))
            if not len(out):
                continue
            record["out_of_band"].append(name)
            if name in self.left_band:
                continue
            self.left_band[name] = dict(chunk=record["chunk"], start=record["start"])
            where = "the given frames" if record["given"] else f"chunk {record['chunk']}"
            channels = CHANNELS if len(value) == 3 else ("",)
            detail = ", ".join(f"{channels[j]} {value[j]:.1f} outside [{low[j]:.1f}, {high[j]:.1f}]".lstrip()
                               for j in out)
            log.warning("drift: %s left its reference band at %s (frames %d-%d): %s", name, where, record["start"],
                        record["start"] + record["frames"] - 1, detail)

    def summary(self) -> dict:
        """The JSON-ready record (pipe.info["drift"], the sidecar's "drift"): rule, band, per-chunk records.

        band: statistic -> [[low, high]] * 3 for mean and std (r, g, b), [low, high] for the others (None while the
        video is shorter than the reference); left_band: statistic -> {chunk, start} where it first left the band;
        token: the token size [th, tw] in pixels behind token_grid (None without it).
        """
        band = None
        if self.band is not None:
            band = {name: (b.tolist() if len(b) == 3 else b[0].tolist()) for name, b in self.band.items()}
        return dict(
            rule=f"per-chunk mean of per-frame values; band = mean +/- max({self.k:g} * std, floor) of the first "
                 f"{self.reference_count} frames' values",
            k=self.k, floors=dict(self.floors), reference_frames=self.reference_count, band=band,
            left_band=dict(self.left_band), token=list(self.token) if self.token else None, chunks=self.chunks,
        )


def plot_drift(drift: dict, path: str | Path, title: str = "") -> None:
    """Draw a drift record (DriftMonitor.summary(), a sidecar's "drift") as a PNG: one panel per statistic.

    x: the first frame of each chunk; the band shaded (per channel for mean and std), chunks outside it crossed,
    a dotted line after the reference frames; PSNR (when the video had real frames) beside repeating the last given
    frame, not banded: it falls as any continuation departs from the real one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunks = drift["chunks"]
    x = np.array([c["start"] for c in chunks])
    names = [*(name for name in (*STATISTICS, TOKEN_GRID) if name in chunks[0]),
             *(["psnr"] if any(c["psnr"] is not None for c in chunks) else [])]
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.8 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        if drift["reference_frames"]:
            ax.axvline(drift["reference_frames"] - 0.5, color="0.5", linestyle=":")
        if name == "psnr":
            for key, label in (("psnr", "generated"), ("psnr_repeat_last", "repeat last given")):
                ax.plot(x, [math.nan if c[key] is None else c[key] for c in chunks], marker=".", label=label)
            ax.legend(fontsize=7, loc="best")
            ax.set_ylabel("psnr (dB)")
            continue
        values = np.array([[math.nan] * (3 if name in ("mean", "std") else 1) if c[name] is None
                           else np.atleast_1d(c[name]) for c in chunks], dtype=np.float64)  # (chunks, channels)
        band = None if (drift["band"] or {}).get(name) is None else np.atleast_2d(drift["band"][name])  # (c, 2)
        colors = ("tab:red", "tab:green", "tab:blue") if values.shape[1] == 3 else ("tab:purple",)
        for j, color in enumerate(colors):
            ax.plot(x, values[:, j], marker=".", color=color, label=CHANNELS[j] if len(colors) == 3 else None)
            if band is not None:
                ax.axhspan(band[j, 0], band[j, 1], color=color, alpha=0.12, linewidth=0)
                out = (values[:, j] < band[j, 0]) | (values[:, j] > band[j, 1])
                ax.scatter(x[out], values[out, j], marker="x", color=color, s=40, zorder=3)
        if len(colors) == 3:
            ax.legend(fontsize=7, loc="best", ncol=3)
        ax.set_ylabel(name)
    axes[-1, 0].set_xlabel("frame (first of the chunk); dotted: end of the reference frames")
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
