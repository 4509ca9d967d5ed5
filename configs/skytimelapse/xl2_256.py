# SkyTimelapse at 256x256 with the paper's XL/2 setting (configs/_base_/xl2_256.py); one fixed caption.
_base_ = ["../_base_/xl2_256.py"]

# The paper's SkyTimelapse model: the chunk's spatial attention also reads the 3 frames before it (their spatial
# keys/values cached beside the temporal queue; the reference code's cross_frame_attn="prev_prefix_3").
model = dict(spatial_prefix="prev_frames_3")

dataset = dict(
    type="FrameFolderDataset",
    root="data/SkyTimelapse/sky_train",  # root/<video>/<clip>/*.jpg
    num_frames=33,
    image_size=(256, 256),
    sample_interval=1,
    caption="a time-lapse video of the sky",
)
