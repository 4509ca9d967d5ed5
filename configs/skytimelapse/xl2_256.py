# SkyTimelapse at 256x256 with the paper's XL/2 setting (configs/_base_/xl2_256.py); one fixed caption.
_base_ = ["../_base_/xl2_256.py"]

dataset = dict(
    type="FrameFolderDataset",
    root="data/SkyTimelapse/sky_train",  # root/<video>/<clip>/*.jpg
    num_frames=33,
    image_size=(256, 256),
    sample_interval=1,
    caption="a time-lapse video of the sky",
)
