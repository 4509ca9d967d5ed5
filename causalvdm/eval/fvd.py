"""FVD (Fréchet Video Distance) through a local I3D TorchScript file, and its per-chunk form for autoregressive video.

The protocol is StyleGAN-V's (which matches the TF reference of Unterthiner et al. up to the resize):
- a clip is `num_frames` (16) consecutive frames of a video from frame `start` (0; StyleGAN-V draws a random start
  for real videos, a fixed one makes the number reproducible);
- frames are centre-cropped to a square (a no-op for square videos, as StyleGAN-V's datasets and the generated
  videos are) and resized to `size` x `size` (224) with bilinear interpolation, no antialiasing; values stay
  float on the 0-255 scale, with no rounding after the resize;
- the detector is called as StyleGAN-V calls it, `detector(x, rescale=True, resize=True, return_features=True)` on
  x (B, 3, T, S, S): it maps [0, 255] to [-1, 1] itself, and at S = 224 its own resize to 224x224 changes nothing;
- features are the 400 logits before the softmax; FVD is the Fréchet distance of their Gaussian fits.

Per-chunk FVD: a generated video is `given_frames` (n0) given frames, then chunks of `chunk_size` (k) frames, chunk i
being frames [n0 + i k, n0 + (i + 1) k). I3D needs `num_frames` (F) frames, usually more than a chunk, so chunk i
is scored on the F frames that end with it, [e - F, e) with e = n0 + (i + 1) k (moved to [0, F) while e < F): the
new chunk with the frames just before it, what a viewer sees at that autoregressive step; no frame is repeated or
made up. Every chunk's windows are compared with the same real statistics, those of the real clips of the plain
FVD, so a rising curve is drift away from real video whatever the length of the real videos.
"""

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from causalvdm.data.video_io import first_line
from causalvdm.eval.metrics import feature_stats, frechet_distance
from causalvdm.utils.weights import CheckpointError

I3D_FILE = "i3d_torchscript.pt"  # the file StyleGAN-V, DIGAN and most video-generation papers compute FVD with
DETECTOR_KWARGS = dict(rescale=True, resize=True, return_features=True)


def load_i3d(path: str | Path, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load the I3D feature network from a local TorchScript file (e.g. i3d_torchscript.pt) onto `device`, in eval mode.

    Only TorchScript is read (a plain state dict would need the I3D code, which is not here); nothing is downloaded.
    A missing or foreign file is a one-line CheckpointError. TorchScript files run code: load only trusted ones.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (the I3D TorchScript file, e.g. {I3D_FILE})")
    try:
        detector = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a TorchScript file (only a TorchScript I3D such as {I3D_FILE} is read, "
                              f"not a state dict): {first_line(err)}") from None
    return detector.eval()


def fvd_clip(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> float (3, T, size, size) on the 0-255 scale: centre square, bilinear resize."""
    x = frames.permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[:, :, top:top + side, left:left + side]  # (T, 3, side, side)
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return x.transpose(0, 1).contiguous()  # (3, T, size, size)


def chunk_windows(length: int, num_frames: int, chunk_size: int, given_frames: int) -> list[dict]:
    """The complete chunks of a `length`-frame generated video and the window each is scored on (module doc).

    -> [{"chunk": i, "frames": [first, end), "window": [start, end)}]; empty if no chunk is complete.
    """
    out = []
    for i in range((length - given_frames) // chunk_size):
        end = given_frames + (i + 1) * chunk_size
        start = max(0, end - num_frames)
        out.append(dict(chunk=i, frames=[end - chunk_size, end], window=[start, start + num_frames]))
    return out


class FeatureExtractor:
    """Run clips of many videos through the detector `batch_size` at a time; features are kept per key."""

    def __init__(self, detector, batch_size: int, device: str | torch.device = "cpu"):
        self.detector, self.batch_size, self.device = detector, batch_size, torch.device(device)
        self._pending: list[tuple[object, torch.Tensor]] = []
        self._features: dict[object, list[np.ndarray]] = defaultdict(list)

    def add(self, key, clip: torch.Tensor) -> None:
        """Queue one clip (3, T, S, S) under `key`; a full batch runs at once."""
        self._pending.append((key, clip))
        if len(self._pending) >= self.batch_size:
            self.flush()

    @torch.inference_mode()
    def flush(self) -> None:
        """Run the queued clips."""
        if not self._pending:
            return
        keys, clips = zip(*self._pending)
        self._pending = []
        out = self.detector(torch.stack(clips).to(self.device), **DETECTOR_KWARGS)  # (B, D)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or len(out) != len(clips):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the detector returned {shape} for {len(clips)} clips, expected (clips, features): "
                             f"is it the I3D TorchScript ({I3D_FILE})?")
        for key, row in zip(keys, out.float().cpu().numpy()):
            self._features[key].append(row)

    def features(self, key) -> np.ndarray:
        """All features of `key` so far (N, D), after running what is queued."""
        self.flush()
        return np.stack(self._features[key])


def fvd(real_features: np.ndarray, fake_features: np.ndarray) -> float:
    """FVD between two sets of detector features (N, D) and (M, D), N, M >= 2."""
    return frechet_distance(*feature_stats(real_features), *feature_stats(fake_features))
