"""Convert an Open-Sora v1 STDiT-XL/2 or PixArt-alpha XL/2 checkpoint into a CausalSTDiT state dict (safetensors).

The model is built from the config's `model` field, initialised with the checkpoint (see
causalvdm/models/pretrained.py for the key mapping) and its whole state dict is saved, so the
output loads with `load_state_dict(strict=True)` and can be set as `model.from_pretrained`. A checkpoint
holding tensors the model has no place for (e.g. the reference code's `attn_cf.*`) is refused unless
`--no-strict` skips them.

    python tools/convert_checkpoint.py --src PixArt-XL-2-256x256.pth --config CFG --out init.safetensors
"""

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from causalvdm.cli.common import ArgumentParser, one_line_errors, output_file
from causalvdm.config import add_config_args, load_config, require
from causalvdm.models.pretrained import SOURCES, load_pretrained, split_init_fields
from causalvdm.registry import MODELS, build


def save_safetensors(state: dict, path: Path) -> None:
    """Write a safetensors file atomically: a temporary file in the same folder, renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None) -> int:
    """Convert the checkpoint `argv` names (default: the command line) -> exit status."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--src", required=True, help="source checkpoint: .pth/.pt (weights only) or .safetensors")
    parser.add_argument("--config", required=True, help="mmengine config whose `model` field is the target CausalSTDiT")
    parser.add_argument("--out", required=True, type=output_file, help="output .safetensors file (written atomically)")
    parser.add_argument("--source", choices=SOURCES, default="auto",
                        help="checkpoint family; auto: temporal blocks present -> opensora, else pixart (default auto)")
    parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                        help="refuse a checkpoint with tensors the model has no place for; --no-strict skips them "
                        "(default strict)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with one_line_errors():  # a bad config or checkpoint, or an unwritable --out
        cfg = load_config(args.config, args.cfg_options)
        model_cfg = split_init_fields(require(cfg, "model"))[0]  # the checkpoint given by --src is the one converted
        model = build(MODELS, model_cfg, "model")
        summary = load_pretrained(model, args.src, args.source, args.strict)  # refuses one of which nothing fits
        save_safetensors(model.state_dict(), Path(args.out))
    counts = ", ".join(f"{len(summary[k])} {k}" for k in
                       ("loaded", "reshaped", "skipped", "missing", "unexpected", "dropped"))
    print(f"{args.src} ({summary['source']}) -> {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
