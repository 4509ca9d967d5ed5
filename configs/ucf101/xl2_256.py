# UCF-101 at 256x256 with the paper's XL/2 setting (configs/_base_/xl2_256.py); captions from class names.
_base_ = ["../_base_/xl2_256.py"]

dataset = dict(
    type="ClassFolderDataset",
    root="data/UCF-101",  # root/<Class>/*.avi
    num_frames=33,
    image_size=(256, 256),
    sample_interval=2,
)
sample = dict(cfg_scale=4.0)
