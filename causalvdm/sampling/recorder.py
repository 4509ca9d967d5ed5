"""What is kept of a video while the pipeline decodes it, chunk by chunk: per-frame PSNR against the real frames of a
given video, drift statistics and the contact sheet's frames. The pipeline feeds a `VideoRecorder`; a caller that
wants the PNGs (the sampling command line) attaches its own and saves them when the video is done."""

from itertools import islice

import numpy as np
import torch

from causalvdm.eval.metrics import psnr_pixels
from causalvdm.sampling.drift import DriftMonitor
from causalvdm.sampling.writer import ContactSheetCollector, to_uint8


def psnr_summary(frames: list[int], scores: list[float], baseline: list[float], eval_len: int) -> dict:
    """Per-frame PSNR lists and their means over frames < eval_len and over all compared frames."""
    in_eval = [i for i, f in enumerate(frames) if f < eval_len] or list(range(len(frames)))
    return dict(
        frames=frames, psnr=scores, psnr_repeat_last=baseline, eval_len=eval_len,
        psnr_mean_eval=float(np.mean([scores[i] for i in in_eval])),
        psnr_repeat_last_mean_eval=float(np.mean([baseline[i] for i in in_eval])),
        psnr_mean_all=float(np.mean(scores)), psnr_repeat_last_mean_all=float(np.mean(baseline)),
    )


class VideoRecorder:
    """The bookkeeping of one video: `begin`, then `add` for the given frames and each decoded chunk, then `summary`.

    drift: a DriftMonitor of the video's chunks; contact_sheet: a ContactSheetCollector (`.save(path)` writes the PNG);
    both None before the first video, renewed by each `begin`.
    """

    def __init__(self):
        self.drift: DriftMonitor | None = None
        self.contact_sheet: ContactSheetCollector | None = None

    def begin(self, num_frames: int, eval_len: int, given: torch.Tensor | None = None, reference=None,
              token: tuple[int, int] | None = None) -> None:
        """Start a video of `num_frames` frames. given: the given frames (3, n0, H, W) in [-1, 1], or None; reference:
        an iterator of the real frames (3, H, W) that follow them in a given video (the PSNR reference), or None.
        eval_len: the PSNR summary's means are over frames before it; token: the model's token in pixels (the drift
        monitor then watches for token-grid artifacts)."""
        self.given, self.reference, self.eval_len = given, reference, eval_len
        self.drift = DriftMonitor(token=token)
        self.contact_sheet = ContactSheetCollector(num_frames)
        self.scores, self.baseline, self.compared = [], [], []  # per compared frame: PSNR, its baseline, its index
        self.recorded = 0

    def add(self, video: torch.Tensor, given: bool = False) -> None:
        """Record the next decoded frames (3, t, H, W) in [-1, 1]: the given frames (given=True), then each chunk."""
        frames = to_uint8(video)  # (t, H, W, 3)
        if given:
            self.drift.add(frames, given=True)
            real = to_uint8(self.given) if self.reference is not None else None
            self.contact_sheet.add(frames, real=real, given=True)
            self.recorded += video.shape[1]
            return
        real = list(islice(self.reference, video.shape[1])) if self.reference is not None else []
        scores = baseline = real_frames = None
        if real:  # the repeat-the-last-given-frame baseline tells how much the model adds
            real = torch.stack(real, dim=1).cpu()  # (3, r, H, W)
            scores = psnr_pixels(video[:, : real.shape[1]].cpu(), real).tolist()
            baseline = psnr_pixels(self.given[:, -1:].cpu().expand_as(real), real).tolist()
            self.scores += scores
            self.baseline += baseline
            self.compared += range(self.recorded, self.recorded + real.shape[1])
            real_frames = to_uint8(real)  # (r, H, W, 3)
        self.drift.add(frames, psnr=scores, psnr_repeat_last=baseline)
        self.contact_sheet.add(frames, real=real_frames)
        self.recorded += video.shape[1]

    def summary(self) -> dict:
        """The video's record: "metrics" (psnr_summary, only when real frames were compared), then "drift"
        (DriftMonitor.summary())."""
        out = {}
        if self.compared:
            out["metrics"] = psnr_summary(self.compared, self.scores, self.baseline, self.eval_len)
        out["drift"] = self.drift.summary()
        return out
