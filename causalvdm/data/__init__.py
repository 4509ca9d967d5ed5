"""Video data: datasets of pixel clips or cached latents, pure-torch transforms, resumable sharded sampling."""

from causalvdm.data.cache import DEFAULT_CACHE_BYTES, FrameCache
from causalvdm.data.caption_switch import CaptionSwitchDataset
from causalvdm.data.datasets import ClipDataset, RepeatDataset
from causalvdm.data.folders import ClassFolderDataset, FrameFolderDataset, class_caption
from causalvdm.data.latents import LATENT_FORMAT, LATENT_INDEX_FILE, LatentDataset
from causalvdm.data.manifest import VideoManifestDataset, read_manifest
from causalvdm.data.sampler import StatefulSampler, build_dataloader, default_num_workers, derive_seed
from causalvdm.data.transforms import video_transform
from causalvdm.data.video_clips import VideoClipDataset
from causalvdm.data.video_io import VideoInfo, VideoReadError, probe_video, read_video_frames

__all__ = [
    "DEFAULT_CACHE_BYTES", "LATENT_FORMAT", "LATENT_INDEX_FILE", "CaptionSwitchDataset", "ClassFolderDataset", "ClipDataset", "FrameCache",
    "FrameFolderDataset", "LatentDataset", "RepeatDataset", "StatefulSampler", "VideoClipDataset", "VideoInfo",
    "VideoManifestDataset", "VideoReadError", "build_dataloader", "class_caption", "default_num_workers", "derive_seed",
    "probe_video", "read_manifest", "read_video_frames", "video_transform",
]
