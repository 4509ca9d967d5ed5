"""Serve a model live: a web page and one websocket per viewer over the stream engine (`causalvdm-serve`).

    bash scripts/serve.sh --ckpt outputs/caption_demo/checkpoints/step_00002000 --clips data/demo_long/captions.jsonl
    bash scripts/serve.sh CONFIG --ckpt CKPT --host 0.0.0.0 --token "$(openssl rand -hex 16)"

Open the printed address: start a stream from one of the clips' frames (or an uploaded image, or nothing) with a
caption, watch it, switch the caption (it lands at the next chunk boundary), pause, branch, stop, download the mp4.
It listens on 127.0.0.1; another address needs --token, which every request must carry (?token=...). GET /status
gives streams, frames/s, tick time, memory and refusals. SIGTERM or Ctrl-C finishes the tick in flight and closes
every socket with a reason.
"""

import logging
import sys
from pathlib import Path

import numpy as np
from aiohttp import web

from causalvdm.cli.common import ArgumentParser, non_negative_float, one_line_errors, positive_int
from causalvdm.config import add_config_args, load_config
from causalvdm.data.video_io import iter_video_frames
from causalvdm.diffusion.samplers import SAMPLERS
from causalvdm.models.kv_quant import CACHE_DTYPES
from causalvdm.pipeline import CausalVDMPipeline, SampleSettings
from causalvdm.serving.server import Limits, LiveServer
from causalvdm.utils.io import iter_jsonl
from causalvdm.utils.weights import pretrained_config_path

log = logging.getLogger("causalvdm.serve")
LOCAL = ("127.0.0.1", "localhost", "::1")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("config", nargs="?", help="config file (default: the one saved with --ckpt)")
    parser.add_argument("--ckpt", required=True, help="training checkpoint directory or save_pretrained folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other "
                        "needs --token)")
    parser.add_argument("--port", type=positive_int, default=8765, help="port (default 8765)")
    parser.add_argument("--token", help="a secret every request must carry as ?token=...; required off 127.0.0.1")
    parser.add_argument("--max-rows", type=positive_int, default=8, help="KV-cache rows of the engine's pool: a "
                        "stream takes one, two with guidance (default 8)")
    parser.add_argument("--streams-per-client", type=positive_int, default=2, help="streams one viewer may hold at "
                        "once (default 2)")
    parser.add_argument("--cache-dtype", choices=list(CACHE_DTYPES), help="store the KV cache in 8 bits")
    parser.add_argument("--sampler", choices=list(SAMPLERS), help="sampler of every stream (default: sample.sampler, "
                        "or a few-step student's own)")
    parser.add_argument("--num-steps", type=positive_int, help="denoising steps per chunk (default: sample.num_steps, "
                        "or a few-step student's own)")
    parser.add_argument("--cfg-scale", type=non_negative_float, help="classifier-free guidance scale; 1 = none, one "
                        "pool row per stream (default: sample.cfg_scale)")
    parser.add_argument("--deblock", type=non_negative_float, metavar="STRENGTH", help="soften the small steps the "
                        "model's token grid leaves at token borders of the frames sent, as a video codec's deblocking "
                        "filter does; 0 off, 1 the demo's strength (default: sample.deblock)")
    parser.add_argument("--clips", help="a .jsonl manifest of {\"path\", \"caption\"} rows: their frames can start a "
                            "stream and their captions are the page's suggestions (scripts/demo.sh writes one)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine's tick")
    add_config_args(parser)
    args = parser.parse_args(argv)
    if args.host not in LOCAL and not args.token:
        parser.error(f"--host {args.host} listens beyond this machine: give --token as well")
    return args


def read_clips(manifest: str) -> tuple[list, list[str]]:
    """A manifest of {"path", "caption"} rows -> [(name, frames uint8 (T, H, W, 3))], [captions]."""
    clips, captions = [], []
    root = Path(manifest).parent
    for line, row in iter_jsonl(manifest):
        if not isinstance(row.get("path"), str):
            raise ValueError(f"{manifest}:{line}: a clip row needs a \"path\"")
        frames = np.stack(list(iter_video_frames(root / row["path"])))
        clips.append((Path(row["path"]).stem, frames))
        if row.get("caption"):
            captions.append(row["caption"])
    return clips, captions


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with one_line_errors():
        cfg = load_config(str(args.config or pretrained_config_path(args.ckpt)), args.cfg_options)
        sample = SampleSettings.from_cfg(cfg.get("sample"), dict(ckpt=args.ckpt, cache_dtype=args.cache_dtype,
                                                                 sampler=args.sampler, num_steps=args.num_steps,
                                                                 cfg_scale=args.cfg_scale, deblock=args.deblock))
        pipe = CausalVDMPipeline.from_config(cfg, sample)
        engine = pipe.stream_engine(max_rows=args.max_rows, compile=args.compile)
        clips, captions = read_clips(args.clips) if args.clips else ([], [])
    server = LiveServer(pipe, engine, clips, captions, args.token, Limits(streams_per_client=args.streams_per_client))
    address = f"http://{args.host}:{args.port}/" + (f"?token={args.token}" if args.token else "")
    log.info("serving %s: open %s", args.ckpt, address)
    web.run_app(server.app, host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
