"""Benchmark training throughput of the clean-prefix objective on synthetic data: steps/s, tokens/s, model
TFLOP/s, MFU and peak memory.

    python tools/benchmark_train.py                                   # XL/2 at 256x256, the paper setting, on a GPU
    python tools/benchmark_train.py --grad-checkpointing both --json outputs/train_bench.json
    python tools/benchmark_train.py --config configs/debug/tiny.py --steps 2 --warmup-steps 1   # a CPU smoke run
    torchrun --nproc_per_node 8 tools/benchmark_train.py               # one group of 8 GPUs, global figures

Each step is the Trainer's (causalvdm/training/trainer.py): `clean_prefix_loss` under autocast, backward,
gradient clipping and an AdamW step (fused on CUDA, as there), on a model wrapped by `parallelize()` (FSDP2,
with its bf16 policy under bf16, or DDP; outside torchrun a one-process group is set up here). The data is random
and fixed: latents (B, C, T, H, W) with T = `dataset.num_frames` (else `model.max_tpe_len`) and (H, W) =
`latent_size` (else 32x32, a 256x256 video through the SD VAE), and text embeddings shaped like T5-XXL's
(B, model.model_max_length, model.caption_channels) with a full mask. No VAE, text encoder, data loading, EMA or checkpointing is timed.

The prefix length is fixed to the longest allowed one (25 of 33 frames with chunks of 8), so every step feeds
prefix + chunk frames (all 33) and the FLOP count is exact; the trainer draws it per step, so its mean step is
cheaper. Model FLOPs per step = 3 x forward FLOPs of the frames fed (causalvdm.utils.flops.forward_flops);
recomputation under gradient checkpointing is not counted, the usual MFU convention. MFU is against the
device's dense bf16 peak (causalvdm.utils.flops.PEAK_TFLOPS or --peak-tflops); on a CPU it is reported only
with --peak-tflops. Peak memory: torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on a CPU.
A run that runs out of GPU memory is recorded as such and the next one still runs. The --json file is written
when the settings are known and again as each run ends, so a run killed by a time limit leaves the runs before it.
One line per run:
    train_bench steps_per_s=<x> tokens_per_s=<x> tflops=<x> mfu=<x> peak_mb=<x> grad_checkpointing=<on|off>
"""

import logging
import math
import os
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

import causalvdm
from causalvdm.cli.common import (ArgumentParser, device_arg, non_negative_int, one_line_errors, output_file,
                                  positive_float, positive_int)
from causalvdm.config import AutoregressiveSettings, add_config_args, load_config, require
from causalvdm.diffusion import clean_prefix_loss, prefix_lengths
from causalvdm.models.pretrained import split_init_fields
from causalvdm.registry import SCHEDULERS, ConfigError, build
from causalvdm.training.distributed import DistInfo, init_distributed, parallelize
from causalvdm.training.settings import TrainSettings
from causalvdm.utils.flops import device_peak_tflops, forward_flops
from causalvdm.utils.io import write_json
from causalvdm.utils.memory import keep_freed_memory, peak_memory_mb, reset_peak_memory

log = logging.getLogger("benchmark_train")
DEFAULT_CONFIG = "configs/_base_/xl2_256.py"
CHECKPOINTING = {"on": [True], "off": [False], "both": [True, False]}


@dataclass
class Workload:
    """What every run of one invocation shares: the data shape, the objective's settings and the cost model."""

    batch_size: int
    shape: tuple[int, int, int]  # frames fed, latent height, latent width
    prefix_len: int
    diffusion: object
    ar: AutoregressiveSettings
    settings: TrainSettings
    autocast: object  # torch.autocast or nullcontext
    bf16: bool  # bf16 autocast on, so FSDP2 also gathers parameters in bf16
    tokens_per_step: int  # all processes
    flops_per_step: int  # all processes, 3 x forward
    peak_tflops: float | None  # one device


def free_port() -> int:
    """A TCP port nobody listens on now, for a one-process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process_group(parallel: str, device: torch.device):
    """Yield the DistInfo to train with: torchrun's group, a one-process group set up here, or none ('none').

    The environment variables set for a one-process group are restored and the group destroyed on exit, so a
    caller in the same process (a test) sees no trace of it.
    """
    if parallel == "none":
        yield DistInfo(0, 1, 0, device)
        return
    defaults = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    saved = {key: os.environ.get(key) for key in defaults}
    if "RANK" not in os.environ:  # not under torchrun
        os.environ.update(defaults)
    try:
        yield init_distributed()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def synthetic_batch(model, batch: int, frames: int, height: int, width: int, device: torch.device, seed: int):
    """Random latents x0 (B, C, T, H, W) and T5-shaped text y (B, L, C_text) with mask (B, L); y, mask None without text."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, model.in_channels, frames, height, width, generator=gen).to(device)
    if not model.caption_channels:
        return x0, None, None
    y = torch.randn(batch, model.model_max_length, model.caption_channels, generator=gen).to(device)
    return x0, y, torch.ones(y.shape[:2], dtype=torch.bool, device=device)


def train_step(model, optimizer, data, step: int, w: Workload) -> float:
    """One trainer step (loss, backward, clip, AdamW) -> the loss; its .item() syncs the device once per step."""
    x0, y, mask = data
    generators = [torch.Generator().manual_seed(step * 1_000_003 + i) for i in range(x0.shape[0])]
    with w.autocast:
        out = clean_prefix_loss(model, w.diffusion, x0, y=y, mask=mask, chunk_size=w.ar.chunk_size,
                                prefix_len=w.prefix_len, prefix_perturb_t=w.ar.prefix_perturb_t,
                                txt_dropout_prob=w.settings.txt_dropout_prob, generators=generators,
                                sink_frames=w.ar.sink_frames)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), w.settings.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out["loss"].item()


def run(model_cfg: dict, info: DistInfo, parallel: str, checkpointing: bool, w: Workload, warmup_steps: int,
        steps: int) -> dict:
    """Build a fresh model, run `warmup_steps` steps, then time `steps` steps -> the run's figures."""
    torch.manual_seed(0)
    with torch.device(info.device):  # initialised in place: an XL/2 takes a while on the host
        model = causalvdm.build_model(model_cfg)
    model.grad_checkpointing = checkpointing
    model = parallelize(model, parallel, info, bf16=w.bf16)  # as the trainer: FSDP2's bf16 policy under bf16
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=w.settings.lr, weight_decay=w.settings.weight_decay,
                                  betas=tuple(w.settings.adam_betas), fused=info.device.type == "cuda")
    data = synthetic_batch(model, w.batch_size, *w.shape, info.device, seed=info.rank)
    figures = dict(grad_checkpointing=checkpointing, steps=steps, warmup_steps=warmup_steps)
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(info.device)
    losses = []
    try:
        for step in range(warmup_steps):
            losses.append(train_step(model, optimizer, data, step, w))
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        start = time.perf_counter()
        for step in range(warmup_steps, warmup_steps + steps):
            losses.append(train_step(model, optimizer, data, step, w))
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        seconds = time.perf_counter() - start
    except torch.cuda.OutOfMemoryError:
        # A configuration that does not fit is a result too (no checkpointing at a large batch); the next run goes on.
        log.warning("grad_checkpointing=%s: out of GPU memory", checkpointing)
        figures.update(status="out_of_memory", peak_mb=peak_memory_mb(info.device))
        return figures
    finally:
        del model, optimizer  # free the weights and optimizer state before the next run measures its peak

    steps_per_s = steps / seconds
    tflops = w.flops_per_step * steps_per_s / 1e12
    figures.update(status="ok", seconds=seconds, steps_per_s=steps_per_s, tokens_per_s=w.tokens_per_step * steps_per_s,
                   tflops=tflops, mfu=tflops / (w.peak_tflops * info.world_size) if w.peak_tflops else None,
                   peak_mb=peak_memory_mb(info.device), loss_first=losses[0], loss_last=losses[-1],
                   loss_finite=all(math.isfinite(v) for v in losses))
    return figures


def summary_line(r: dict) -> str:
    """The per-run line: train_bench steps_per_s=... grad_checkpointing=on|off."""
    gc = "on" if r["grad_checkpointing"] else "off"
    if r["status"] != "ok":
        return f"train_bench status={r['status']} peak_mb={r['peak_mb']:.0f} grad_checkpointing={gc}"
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.3f}"
    return (f"train_bench steps_per_s={r['steps_per_s']:.3f} tokens_per_s={r['tokens_per_s']:.0f} "
            f"tflops={r['tflops']:.3f} mfu={mfu} peak_mb={r['peak_mb']:.0f} grad_checkpointing={gc}")


def parse_args(argv=None):
    """The benchmark's flags, parsed from `argv` (default: the command line)."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config with `model` and optionally `latent_size`, "
                        "`dataset.num_frames`, `diffusion` (default IDDPM), `autoregressive` and `train` (lr, "
                        f"grad_clip, AdamW, txt_dropout_prob); model.from_pretrained is ignored (default {DEFAULT_CONFIG})")
    parser.add_argument("--device", type=device_arg, help="where to train: cpu, cuda or cuda:N (default: cuda if "
                        "available, else cpu)")
    parser.add_argument("--parallel", choices=("fsdp", "ddp", "none"), default="fsdp",
                        help="wrap with FSDP2 (fully_shard per block, then the root) or DDP, as the trainer does, in "
                        "torchrun's group or a one-process group set up here; 'none': the plain model (default fsdp)")
    parser.add_argument("--grad-checkpointing", choices=tuple(CHECKPOINTING),
                        help="activation checkpointing of every block; 'both': one run with, one without, in one JSON "
                        "(default: the config's train.grad_checkpointing)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="clips per process and step (default 4, "
                        "the paper's)")
    parser.add_argument("--warmup-steps", type=non_negative_int, default=5, help="untimed steps first (allocator, "
                        "kernels; default 5)")
    parser.add_argument("--steps", type=positive_int, default=30, help="timed steps (default 30)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"),
                        help="autocast dtype of the forward; float32: no autocast (default: bfloat16 on CUDA, float32 "
                        "on the CPU)")
    parser.add_argument("--peak-tflops", type=positive_float, help="peak TFLOP/s of one device for the MFU (default: "
                        "the known dense bf16 peak of the GPU; none on a CPU, so no MFU there)")
    parser.add_argument("--json", type=output_file, help="also write every figure to this JSON file (checked before "
                        "the run)")
    add_config_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Run the training benchmark of `argv` (default: the command line) -> exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and torch.cuda.is_available() and args.parallel != "none":
        sys.exit("error: --parallel fsdp/ddp trains on the GPU when one is present; use --parallel none with --device cpu")
    with one_line_errors(ConfigError):  # these errors name the file
        cfg = load_config(args.config, args.cfg_options)
        require(cfg, "model")
    with one_line_errors(ConfigError, ValueError, prefix=f"{args.config}: "):
        model_cfg = split_init_fields(cfg.model)[0]
        with torch.device("meta"):  # shapes only, for the FLOP count; every run trains a fresh model
            plain = causalvdm.build_model(model_cfg)
        diffusion = build(SCHEDULERS, cfg.get("diffusion") or dict(type="IDDPM"), "diffusion")
        ar = AutoregressiveSettings.from_cfg(cfg.get("autoregressive"))
        settings = TrainSettings.from_cfg(cfg.get("train"))
    frames = cfg.get("dataset", {}).get("num_frames", plain.max_tpe_len)
    height, width = cfg.get("latent_size", (32, 32))
    ph, pw = plain.patch_size[1:]
    if frames < 1 + ar.chunk_size:
        sys.exit(f"error: {args.config}: {frames} frames (dataset.num_frames, else model.max_tpe_len) cannot hold a "
                 f"clean frame and a chunk of autoregressive.chunk_size={ar.chunk_size}")
    if height % ph or width % pw:
        sys.exit(f"error: {args.config}: latent_size {height}x{width} is not a multiple of the {ph}x{pw} patch")
    prefix_len = prefix_lengths(frames, ar.chunk_size)[-1]  # the longest prefix: every step feeds prefix + chunk
    keep_freed_memory()

    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    fed = prefix_len + ar.chunk_size  # frames after the chunk are never fed (causal attention)
    tokens = (height // ph) * (width // pw)  # per frame
    text_tokens = plain.model_max_length if plain.caption_channels else 0
    fwd = forward_flops(plain, args.batch_size, fed, height, width, text_tokens=text_tokens)
    parameters = sum(p.numel() for p in plain.parameters())
    del plain
    checkpointing = CHECKPOINTING[args.grad_checkpointing] if args.grad_checkpointing else [settings.grad_checkpointing]

    with process_group(args.parallel, device) as info:
        world = info.world_size
        w = Workload(args.batch_size, (fed, height, width), prefix_len, diffusion, ar, settings, autocast,
                     bf16=dtype == "bfloat16", tokens_per_step=world * args.batch_size * fed * tokens, flops_per_step=world * 3 * fwd,
                     peak_tflops=args.peak_tflops or device_peak_tflops(info.device))
        log.info("%s: %.1fM parameters, %s x %d process(es), %s, %s, batch %d x %d frames fed (prefix %d + "
                 "chunk %d) of %dx%d latents, %d tokens/frame, %d text tokens; %.1f TFLOP per step",
                 cfg.model.type, parameters / 1e6, args.parallel, world, info.device, dtype, args.batch_size, fed,
                 prefix_len, ar.chunk_size, height, width, tokens, text_tokens, w.flops_per_step / 1e12)
        gpu = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else None
        runs = []
        summary = dict(config=str(args.config), model=cfg.model.type, parameters=parameters, device=str(device),
                       gpu=gpu, world_size=world, parallel=args.parallel, dtype=dtype, batch_size=args.batch_size,
                       frames=frames, frames_fed=fed, prefix_len=prefix_len, chunk=ar.chunk_size,
                       latent_size=[height, width], tokens_per_frame=tokens, text_tokens=text_tokens,
                       tokens_per_step=w.tokens_per_step, forward_flops=fwd, flops_per_step=w.flops_per_step,
                       peak_tflops=w.peak_tflops, threads=torch.get_num_threads(), torch=torch.__version__, runs=runs)
        write = bool(args.json) and info.is_main
        if write:
            write_json(args.json, summary)
        for gc in checkpointing:
            runs.append(run(model_cfg, info, args.parallel, gc, w, args.warmup_steps, args.steps))
            if info.is_main:
                print(summary_line(runs[-1]), flush=True)
            if write:  # as each run ends: a time limit that stops the next one keeps this one
                write_json(args.json, summary)
    if any(r["status"] == "ok" and not r["loss_finite"] for r in runs):
        log.error("a loss was not finite")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
