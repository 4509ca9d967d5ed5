"""Video evaluation: FVD and per-chunk FVD through a local I3D TorchScript file, PSNR, SSIM and frame statistics."""

from causalvdm.eval.evaluate import EvalSettings, evaluate
from causalvdm.eval.fvd import I3D_FILE, FeatureExtractor, chunk_windows, fvd, fvd_clip, load_i3d
from causalvdm.eval.metrics import feature_stats, frame_stats, frechet_distance, nearest_psnr, psnr, ssim
from causalvdm.eval.videos import Video, list_videos, match_size, read_frames, video_length

__all__ = [
    "EvalSettings", "FeatureExtractor", "I3D_FILE", "Video", "chunk_windows", "evaluate", "feature_stats",
    "frame_stats", "frechet_distance", "fvd", "fvd_clip", "list_videos", "load_i3d", "match_size", "nearest_psnr", "psnr",
    "read_frames", "ssim", "video_length",
]
