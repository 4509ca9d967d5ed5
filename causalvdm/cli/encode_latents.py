"""Encode every video of a dataset with the VAE once, so that training reads latents instead of pixels.

    python tools/encode_latents.py --config CFG --out DIR [--batch-size 16] [--shard-size 256]

Builds cfg.vae and cfg.dataset and encodes each video whole: every frame at stride 1, centre-cropped to the
dataset's image_size, in calls of --batch-size frames (the VAE is frame-wise, so splitting in time is exact).
DIR receives shards latents-00000.safetensors, ... of --shard-size videos, one (C, T, h, w) tensor per video
keyed by its dataset index, and index.json (shard, key, path, caption, num_frames of every video). Train on
them with dataset = dict(type="LatentDataset", root=DIR, num_frames=...).

Shards are written atomically and record the config and source files they hold: a rerun keeps the ones that
still match, so an interrupted run resumes where it stopped. Unreadable videos are skipped with a warning.
"""

import json
import logging
import sys
from pathlib import Path

import torch

from causalvdm.cli.common import ArgumentParser, device_arg, one_line_errors, output_dir, positive_int
from causalvdm.config import add_config_args, load_config, require
from causalvdm.data.video_clips import VideoClipDataset
from causalvdm.data.latent_shards import encode_dataset
from causalvdm.data.video_io import VideoReadError
from causalvdm.registry import DATASETS, VAES, ConfigError, build
from causalvdm.utils.dtypes import DTYPES


def main(argv=None) -> int:
    """Encode the dataset of `argv` (default: the command line) into latent shards -> exit status."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="mmengine config with `vae` and `dataset` (a pixel dataset)")
    parser.add_argument("--out", required=True, type=output_dir, help="output directory for the shards and index.json")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="frames per VAE call; bounds memory, not the result (default 16)")
    parser.add_argument("--shard-size", type=positive_int, default=256, help="videos per shard file (default 256)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="storage dtype of the latents (default float32; LatentDataset returns float32)")
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the VAE (default: cuda if available, else cpu)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with one_line_errors(ConfigError):  # these errors name the file
        cfg = load_config(args.config, args.cfg_options)
        vae_cfg, dataset_cfg = require(cfg, "vae", "dataset")
    with one_line_errors(ConfigError, VideoReadError, OSError, prefix=f"{args.config}: "):
        dataset = build(DATASETS, dataset_cfg, "dataset")
        if not isinstance(dataset, VideoClipDataset):
            raise ConfigError(f"dataset.type: {dataset_cfg['type']} is not a pixel video dataset")
        vae = build(VAES, vae_cfg, "vae").to(args.device).eval()
        config = json.loads(json.dumps(dict(vae=vae_cfg, dataset=dataset_cfg, dtype=args.dtype), default=str))
        counts = encode_dataset(dataset, vae, Path(args.out), config, args.shard_size, args.batch_size,
                                args.device, DTYPES[args.dtype])
    print(f"encoded {counts['encoded']} videos ({counts['skipped']} unreadable skipped) into {counts['shards']} "
          f"shards ({counts['reused']} already done) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
