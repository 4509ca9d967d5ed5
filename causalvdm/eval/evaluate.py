"""One evaluation of generated videos against real ones: FVD, per-chunk FVD, paired PSNR / SSIM, frame statistics.

Each video is decoded once, whole, one at a time (with --pairs its real partner is decoded again beside it); the
detector sees batches of clips gathered across videos.
"""

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from causalvdm.data.video_io import VideoReadError
from causalvdm.eval.fvd import FeatureExtractor, chunk_windows, fvd, fvd_clip
from causalvdm.eval.metrics import FRAMES_AT_ONCE, frame_stats, psnr, ssim, token_grid_ratio
from causalvdm.eval.videos import Video, match_size, read_frames, video_length

log = logging.getLogger("causalvdm.eval")


@dataclass(frozen=True)
class EvalSettings:
    """What to compute: FVD clips of `num_frames` frames from frame `start` at `size` x `size`; per-chunk FVD when
    `chunk_size` is set (after `given_frames` given frames); PSNR / SSIM of same-name pairs when `pairs`, over the
    frames after the given ones; the token-grid ratio of every video when `token_size` (pixels) is set."""

    num_frames: int = 16
    size: int = 224
    start: int = 0
    chunk_size: int | None = None
    given_frames: int = 0
    pairs: bool = False
    batch_size: int = 8
    token_size: int | None = None


def _check_fvd_inputs(real: list[Video], fake: list[Video], settings: EvalSettings) -> list[dict]:
    """Fail early, before decoding anything, on too few or too short videos -> the chunk windows (may be empty)."""
    for which, videos in (("real", real), ("generated", fake)):
        if len(videos) < 2:
            raise ValueError(f"FVD needs at least 2 videos in each set, the {which} set has {len(videos)}")
    need = settings.start + settings.num_frames
    shortest = None
    for videos in (real, fake):
        for video in videos:
            length = video_length(video)
            if length < need:
                raise ValueError(f"{video.path}: {length} frames, fewer than the {need} of an FVD clip "
                                 f"(num_frames {settings.num_frames} from frame {settings.start})")
            if videos is fake and (shortest is None or length < shortest[1]):
                shortest = (video, length)
    if settings.chunk_size is None:
        return []
    windows = chunk_windows(shortest[1], settings.num_frames, settings.chunk_size, settings.given_frames)
    if not windows:
        raise ValueError(f"{shortest[0].path}: {shortest[1]} frames hold no complete chunk of {settings.chunk_size} "
                         f"after {settings.given_frames} given frames")
    return windows


def _pair_up(real: list[Video], fake: list[Video]) -> dict[str, Video]:
    """Generated video name -> the real video of the same name; at least one pair, names unique among the real."""
    by_name = {}
    for video in real:
        if video.name in by_name:
            raise ValueError(f"two real videos are named {video.name!r} ({by_name[video.name].path}, {video.path}): "
                             f"pairs need unique names")
        by_name[video.name] = video
    pairs = {v.name: by_name[v.name] for v in fake if v.name in by_name}
    if not pairs:
        raise ValueError("no generated video has the name of a real video to pair with (names are paths without "
                         "the extension, relative to each set)")
    if len(pairs) < len(fake):
        log.warning("%d of %d generated videos have no real video of the same name: left out of PSNR/SSIM",
                    len(fake) - len(pairs), len(fake))
    return pairs


def _compare(name: str, fake: torch.Tensor, real: torch.Tensor, given_frames: int) -> dict | None:
    """PSNR / SSIM of a generated video (T, H, W, 3) against its real one, brought to its size, after the given
    frames (copies of the real ones) -> a record, or None when no frame is left to compare."""
    real = match_size(real, tuple(fake.shape[1:3]))
    end = min(len(real), len(fake))
    if end <= given_frames:
        log.warning("%s: no frame after the %d given ones in both videos: left out of PSNR/SSIM", name, given_frames)
        return None
    a, b = fake[given_frames:end], real[given_frames:end]
    scores = {}
    for metric in (psnr, ssim):  # per frame, so a few frames at a time give the same numbers
        per_frame = [metric(a[i:i + FRAMES_AT_ONCE], b[i:i + FRAMES_AT_ONCE]) for i in range(0, len(a), FRAMES_AT_ONCE)]
        scores[metric.__name__] = torch.cat(per_frame).mean().item()
    return dict(name=name, frames=[given_frames, end], **scores)


def _clip(video: Video, frames: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """frames[start:end], checked: a header can promise more frames than decode."""
    if len(frames) < end:
        raise VideoReadError(f"{video.path}: has {len(frames)} decodable frames, need {end}")
    return frames[start:end]


def _set_summary(records: list[dict]) -> dict:
    """Mean over the videos of a set of their frame statistics."""
    diffs = [r["mean_abs_diff"] for r in records if r["mean_abs_diff"] is not None]
    grids = [r["token_grid"] for r in records if r.get("token_grid") is not None]
    summary = dict(videos=len(records), mean=np.mean([r["mean"] for r in records], axis=0).tolist(),
                   std=np.mean([r["std"] for r in records], axis=0).tolist(),
                   mean_abs_diff=float(np.mean(diffs)) if diffs else None)
    if "token_grid" in records[0]:
        summary["token_grid"] = float(np.mean(grids)) if grids else None
    return summary


def _token_grid(frames: torch.Tensor, token_size: int) -> float | None:
    """Mean token-grid ratio of a video's frames (T, H, W, 3) uint8; None when a frame holds under two tokens."""
    ratios = torch.cat([token_grid_ratio(frames[i:i + FRAMES_AT_ONCE], (token_size, token_size))
                        for i in range(0, len(frames), FRAMES_AT_ONCE)])
    return None if ratios.isnan().any() else ratios.mean().item()


def evaluate(real: list[Video], fake: list[Video], settings: EvalSettings, detector=None,
             device: str | torch.device = "cpu") -> dict:
    """Evaluate `fake` against `real` -> a JSON-ready dict: settings, set summaries, per-video statistics, and "fvd"
    and "fvd_per_chunk" (with a detector), "pairs" (settings.pairs). Input errors are one-line ValueErrors or
    VideoReadErrors, raised before decoding where they can be."""
    if settings.chunk_size is not None and detector is None:
        raise ValueError("per-chunk FVD needs the I3D detector")
    windows = _check_fvd_inputs(real, fake, settings) if detector is not None else []
    pairs = _pair_up(real, fake) if settings.pairs else {}
    extractor = FeatureExtractor(detector, settings.batch_size, device) if detector is not None else None
    first, end = settings.start, settings.start + settings.num_frames
    records = {"real": [], "fake": []}
    compared = []
    for which, videos in (("real", real), ("fake", fake)):
        chunks = windows if which == "fake" else []  # per-chunk windows are cut from generated videos only
        for video in tqdm(videos, desc=f"{which} videos", unit="video", disable=None):  # no bar off a terminal
            frames = read_frames(video)  # (T, H, W, 3) uint8
            records[which].append(dict(name=video.name, path=str(video.path), frames=len(frames),
                                       **frame_stats(frames)))
            if settings.token_size:
                records[which][-1]["token_grid"] = _token_grid(frames, settings.token_size)
            if extractor is not None:
                extractor.add(which, fvd_clip(_clip(video, frames, first, end), settings.size))
                for w in chunks:
                    extractor.add(w["chunk"], fvd_clip(_clip(video, frames, *w["window"]), settings.size))
            if which == "fake" and video.name in pairs:
                record = _compare(video.name, frames, read_frames(pairs[video.name]), settings.given_frames)
                if record:
                    compared.append(record)

    result = dict(settings=asdict(settings), real=_set_summary(records["real"]), fake=_set_summary(records["fake"]))
    if extractor is not None:
        real_features = extractor.features("real")
        if len(real_features) < real_features.shape[1]:
            log.warning("FVD from %d videos, fewer than the %d features: the covariances are singular and the value "
                        "is biased upwards (the usual protocol uses 2,048 videos)", len(real_features),
                        real_features.shape[1])
        result["fvd"] = fvd(real_features, extractor.features("fake"))
        if windows:
            result["fvd_per_chunk"] = [dict(w, fvd=fvd(real_features, extractor.features(w["chunk"])))
                                       for w in windows]
    if settings.pairs:
        means = {k: float(np.mean([r[k] for r in compared])) if compared else None for k in ("psnr", "ssim")}
        result["pairs"] = dict(count=len(compared), **means, videos=compared)
    result["videos"] = records
    return result
