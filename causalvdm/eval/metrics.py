"""Metrics that need no network weights, and the Fréchet distance between two sets of features.

Frames are uint8 `(T, H, W, 3)` in [0, 255] (as the video readers return them) or float `(T, H, W, 3)` in [0, 1].
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

# SSIM constants of Wang et al. 2004: an 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
# Frames converted to float64 at a time by the per-video functions: 8 frames of 256x256 are 13 MB, a whole
# 200-frame video would be 300 MB per copy.
FRAMES_AT_ONCE = 8


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) -> mean (D,) and covariance (D, D) in float64; N >= 2.

    The covariance is the unbiased one (divided by N - 1), as pytorch-fid and the TF FVD reference compute it;
    StyleGAN-V divides by N, a factor N / (N - 1) apart (0.05% at 2,048 videos).
    """
    x = torch.as_tensor(features).detach().cpu().numpy().astype(np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"feature_stats needs features (N, D) with N >= 2, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _drop_rounding(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those below its rounding level set to 0 (the numerical rank, as pinv cuts):
    the square root would blow a 1e-16 residue of a true zero up to 1e-8."""
    return np.where(values > values.max() * len(values) * np.finfo(np.float64).eps, values, 0.0)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) in float64; mu (D,), sigma (D, D).

    tr((sigma1 sigma2)^(1/2)) is the sum of the square roots of the eigenvalues of sigma1 sigma2, which are those of
    the symmetric s sigma2 s with s = sigma1^(1/2) (both from `eigh`: scipy is no dependency here). pytorch-fid calls scipy's sqrtm on
    the non-symmetric product, drops the imaginary parts that rounding leaves and offsets the diagonals by eps when
    a singular product (fewer samples than features) makes it fail; here a singular covariance only gives zero
    eigenvalues, and those that rounding leaves just off zero (either sign) are set to zero.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape} do not "
                         f"match (D,), (D, D)")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("frechet_distance: the statistics hold NaN or inf (features of a broken video?)")
    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (vectors * np.sqrt(_drop_rounding(values))) @ vectors.T  # sigma1^(1/2), symmetric
    product = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(_drop_rounding(np.linalg.eigvalsh((product + product.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _as_pixels(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] frames (T, H, W, 3) -> float64 (T, 3, H, W) in [0, 255]."""
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames (T, H, W, 3), got shape {tuple(frames.shape)}")
    x = frames.permute(0, 3, 1, 2).to(torch.float64)  # (T, 3, H, W)
    return x if frames.dtype == torch.uint8 else x * 255


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"frames to compare differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def psnr_pixels(pred: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-frame PSNR in dB of pixels (3, T, H, W) in [-1, 1] -> (T,) on the CPU; capped at 100 dB for identical
    frames. The one PSNR of the project: `psnr` of uint8 frames, the pipeline and the drift monitor use it."""
    mse = ((pred.float().clamp(-1, 1) - target.float().clamp(-1, 1)) ** 2).mean(dim=(0, 2, 3))  # (T,)
    return (10 * torch.log10(data_range**2 / mse.clamp_min(data_range**2 * 1e-10))).cpu()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR in dB of frames (T, H, W, 3) -> (T,); 100 dB for identical frames (as `psnr_pixels`)."""
    _check_pair(a, b)
    x, y = (_as_pixels(f).permute(1, 0, 2, 3).float() / 127.5 - 1 for f in (a, b))  # (3, T, H, W) in [-1, 1]
    return psnr_pixels(x, y)


def nearest_psnr(frames: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Frames (T, H, W, 3) against a clip (R, H, W, 3) -> (T,): each frame's PSNR against the reference frame it is
    closest to. How much a frame looks like the clip at all, when its place in the clip is unknown (after a
    caption switch the video turns towards the new clip, from no particular frame of it)."""
    if frames.shape[1:] != reference.shape[1:]:
        raise ValueError(f"frames to compare differ in shape: {tuple(frames.shape[1:])} vs "
                         f"{tuple(reference.shape[1:])}")
    rows = [psnr(frame[None].expand_as(reference), reference).max() for frame in frames]
    return torch.stack(rows) if rows else torch.zeros(0)


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian (size,) whose outer product is the SSIM window."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame SSIM of frames (T, H, W, 3) -> (T,) in float64: Wang et al. 2004, mean over pixels and channels.

    Gaussian window 11x11 (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 255 (1 for float frames), population
    (co)variances, and only the pixels whose window lies inside the frame: what skimage's structural_similarity
    gives with gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1. No downsampling of
    large frames (the MATLAB reference's automatic step). Frames must be at least 11x11.
    """
    _check_pair(a, b)
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {a.shape[1]}x{a.shape[2]}")
    x, y = _as_pixels(a), _as_pixels(b)  # (T, 3, H, W)
    t, c, h, w = x.shape
    g = _gaussian_window()

    def blur(z: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid positions only: (T*3, 1, H-10, W-10)
        z = F.conv2d(z.reshape(t * c, 1, h, w), g.view(1, 1, -1, 1))
        return F.conv2d(z, g.view(1, 1, 1, -1))

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.view(t, c, -1).mean(dim=(1, 2))  # (T,)


def frame_stats(frames: torch.Tensor) -> dict:
    """Frames (T, H, W, 3) -> per-channel mean and std, and the mean absolute change between consecutive frames.

    All on the 0-255 scale; `mean_abs_diff` is None for a single frame. A static or colour-drifting generated
    video shows here before any network is involved. Frames are converted FRAMES_AT_ONCE at a time.
    """
    t, h, w, _ = frames.shape
    sums = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    diff = 0.0
    for i in range(0, t, FRAMES_AT_ONCE):
        x = _as_pixels(frames[i:i + FRAMES_AT_ONCE + 1])  # (t', 3, H, W), one frame more for the change across
        own = x[:FRAMES_AT_ONCE]
        sums += own.sum(dim=(0, 2, 3))
        squares += (own**2).sum(dim=(0, 2, 3))
        diff += (x[1:] - x[:-1]).abs().sum().item()
    n = t * h * w
    mean = sums / n
    std = (squares / n - mean**2).clamp_min(0).sqrt()
    return dict(mean=mean.tolist(), std=std.tolist(), mean_abs_diff=diff / ((t - 1) * h * w * 3) if t > 1 else None)


LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")


def token_grid_ratio(frames: torch.Tensor, token: tuple[int, int]) -> torch.Tensor:
    """Token-grid artifacts: frames (t, H, W, 3) uint8 -> (t,) float64, the mean absolute luma step across token
    borders (every `token` = (th, tw) pixels) over the mean step between neighbours inside a token.

    About 1 for a real image; above 1 when each token's error is its own, so the grid of tokens shows (a 2x2 patch
    after a factor-4 VAE: 8-pixel squares). Steps in both directions; NaN when a frame holds under two tokens.
    """
    th, tw = token
    luma = frames.to(torch.float64) @ torch.tensor(LUMA_WEIGHTS, dtype=torch.float64)  # (t, H, W)
    across = (luma[:, :, 1:] - luma[:, :, :-1]).abs()  # (t, H, W-1): step from column x to x + 1
    down = (luma[:, 1:] - luma[:, :-1]).abs()  # (t, H-1, W)
    col_border = (torch.arange(1, luma.shape[2]) % tw) == 0  # (W-1,): x + 1 starts a token
    row_border = (torch.arange(1, luma.shape[1]) % th) == 0  # (H-1,)
    border = across[:, :, col_border].sum(dim=(1, 2)) + down[:, row_border].sum(dim=(1, 2))
    inner = across[:, :, ~col_border].sum(dim=(1, 2)) + down[:, ~row_border].sum(dim=(1, 2))
    n_border = col_border.sum() * luma.shape[1] + row_border.sum() * luma.shape[2]
    n_inner = (~col_border).sum() * luma.shape[1] + (~row_border).sum() * luma.shape[2]
    if n_border == 0 or n_inner == 0:
        return torch.full((luma.shape[0],), math.nan, dtype=torch.float64)
    eps = 1e-3  # grey levels: a flat frame (no step anywhere) scores 1
    return (border / n_border + eps) / (inner / n_inner + eps)
