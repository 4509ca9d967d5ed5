"""What the autoregressive-generation benchmarks share (tools/benchmark_speedup.py, benchmark_step.py,
benchmark_steady_state.py): the flags, the random-weight model and inputs, the generator, the cost model's
frame-pass count, and the closing JSON and summary line."""

import argparse
import logging
import os
import sys

import torch
from torch._dynamo.utils import counters

import causalvdm
from causalvdm.cli.common import (ArgumentParser, device_arg, non_negative_int, one_line_errors, output_file,
                                  positive_float, positive_int)
from causalvdm.config import AutoregressiveSettings, add_config_args, load_config, require
from causalvdm.models.pretrained import split_init_fields
from causalvdm.models.utils import randomize_weights
from causalvdm.registry import SCHEDULERS, ConfigError, build
from causalvdm.sampling import AutoregressiveGenerator
from causalvdm.sampling.generator import COMPILE_MODES
from causalvdm.utils.dtypes import DTYPES, resolve_dtype
from causalvdm.utils.io import write_json
from causalvdm.utils.memory import keep_freed_memory

log = logging.getLogger("benchmark_ar")

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that capture CUDA graphs

# Settings a preset stands for; flags given on the command line win.
PRESETS = {
    "paper": dict(config="configs/_base_/xl2_256.py", frames=81, denoise_steps=100, text=True),
}

SETTING = """
Every run uses random weights (every parameter seeded, scaled by --weight-scale), one seed and one first frame,
through AutoregressiveGenerator with the iddpm sampler, whose per-step work besides the model is a few
elementwise ops. `--preset paper` is the paper's setting: CausalSTDiT-XL/2 on 32x32 latents (256x256 video),
text conditioning with random T5-XXL-shaped embeddings (1, 120, 4096), 80 frames generated from 1 given,
chunks of 8, 25 cached frames, 100 steps. Wall times on a shared machine are only as good as its idle cores: the
1-minute load average before and after is printed beside them.
"""


def frame_passes(n0: int, chunks: int, chunk_size: int, max_cond_frames: int, steps: int) -> tuple[int, int]:
    """Frames through the model summed over a video -> (recompute, cache incl. prefill and commits)."""
    recompute = steps * sum(min(n0 + j * chunk_size, max_cond_frames) + chunk_size for j in range(chunks))
    cache = steps * chunks * chunk_size + chunks * chunk_size + n0
    return recompute, cache


def name_list(choices: tuple[str, ...]):
    """An argparse type: a comma-separated list of distinct names from `choices` (no empty entry)."""
    def parse(text: str) -> list[str]:
        names = text.split(",")
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown[0]!r} in {text!r} (a comma-separated list of "
                                             f"{', '.join(choices)})")
        if len(set(names)) < len(names):
            raise argparse.ArgumentTypeError(f"{text!r} lists a name twice")
        return names
    return parse


DTYPE_NAMES = (*DTYPES, "auto")
DTYPE_HELP = "weights and KV cache: float32, bfloat16, float16 or auto (bf16 on CUDA, fp32 on the CPU)"


def new_parser(doc: str) -> ArgumentParser:
    """A parser described by `doc` plus the shared setting, with the flags every benchmark takes (not --dtype)."""
    parser = ArgumentParser(description=doc + SETTING)
    parser.add_argument("--config", help="config with `model`, `latent_size` (default 32 32), `autoregressive` and "
                        "optionally `diffusion` (default IDDPM); --preset gives one")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="paper: configs/_base_/xl2_256.py (XL/2, 32x32 "
                        "latents), --text, 81 frames, 100 steps; other flags still override")
    parser.add_argument("--device", type=device_arg, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, help="torch.compile the "
                        "per-step model call (mode default; reduce-overhead adds CUDA graphs, so that a small chunk's "
                        "call does not wait on kernel launches, and on CUDA a run in which inductor skipped them "
                        "exits with an error); the JSON gets the counts of compiled graphs and CUDA-graph skips")
    parser.add_argument("--text", action="store_true", help="condition on random text embeddings shaped like the "
                        "text encoder's (1, model_max_length, caption_channels), all tokens valid")
    parser.add_argument("--threads", type=positive_int, help="CPU threads of torch (default: torch's choice, one per "
                        "core); one thread leaves a core to the rest of the machine, so its interruptions stall no "
                        "barrier")
    parser.add_argument("--json", type=output_file, help="also write the figures to this JSON file (checked before the run)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random weights and of the "
                        "sampling noise")
    parser.add_argument("--weight-scale", type=positive_float, default=0.25,
                        help="scale of the random weights (default 0.25; at 1 a 12-layer random model is chaotic: the "
                        "1e-6 round-off between the two equal computations grows to O(1) within a few chunks)")
    add_config_args(parser)
    return parser


def resolve_args(parser: ArgumentParser, args: argparse.Namespace, dtypes: list[str]) -> dict:
    """Fill args.config, args.text, args.device and args.dtypes (resolved `dtypes`) from the flags and the preset;
    -> the preset's settings, for the flags of one benchmark."""
    preset = PRESETS.get(args.preset, {})
    args.config = args.config or preset.get("config")
    if args.config is None:
        parser.error("give --config or --preset")
    args.text = args.text or preset.get("text", False)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtypes = [str(resolve_dtype(name, args.device)).removeprefix("torch.") for name in dtypes]
    return preset


def setup(args: argparse.Namespace) -> tuple:
    """The seeded random model on args.device, its diffusion and settings, a first frame (1, C, 1, h, w) and the
    text (y (1, L, D), mask (1, L)) or (None, None) -> (model, diffusion, ar, first, text)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    with one_line_errors(ConfigError):  # its errors name the file
        cfg = load_config(args.config, args.cfg_options)
    with one_line_errors(ConfigError, prefix=f"{args.config}: "):
        model = causalvdm.build_model(split_init_fields(require(cfg, "model"))[0])
        diffusion = build(SCHEDULERS, cfg.get("diffusion") or dict(type="IDDPM"), "diffusion")
        ar = AutoregressiveSettings.from_cfg(cfg.get("autoregressive"))
    device = args.device
    randomize_weights(model, seed=args.seed, scale=args.weight_scale).to(device).eval()
    h, w = cfg.get("latent_size", (32, 32))
    gen = torch.Generator().manual_seed(args.seed)
    first = torch.randn(1, model.in_channels, 1, h, w, generator=gen).to(device)
    text = (None, None)
    if args.text and model.caption_channels:
        text = (torch.randn(1, model.model_max_length, model.caption_channels, generator=gen).to(device),
                torch.ones(1, model.model_max_length, dtype=torch.bool, device=device))
    log.info("%s: %.1fM parameters, latents %dx%d, %s (%s), %s, %d threads, k=%d, max_cond=%d, text %s, compile %s",
             cfg.model.type, sum(p.numel() for p in model.parameters()) / 1e6, h, w, device, device_name(device),
             ",".join(args.dtypes), torch.get_num_threads(), ar.chunk_size, ar.max_cond_frames,
             "yes" if text[0] is not None else "no", args.compile or "no")
    args.load_before = os.getloadavg()[0]
    return model, diffusion, ar, first, text


def warm_up(model, first: torch.Tensor, dtype: str) -> None:
    """Cast the model to `dtype` and run one call on `first` (1, C, 1, h, w): first-call allocations stay out of
    every timing."""
    model.to(DTYPES[dtype])
    with torch.inference_mode():
        model(first, torch.zeros(1, 1, dtype=torch.long, device=first.device))


def make_generator(args, model, diffusion, ar: AutoregressiveSettings, mode: str) -> AutoregressiveGenerator:
    """The iddpm generator of every run, with --denoise-steps, --cfg-scale, --compile and the config's settings."""
    return AutoregressiveGenerator(model, diffusion, "iddpm", args.denoise_steps, ar.chunk_size, ar.max_cond_frames,
                                   cfg_scale=args.cfg_scale, prefix_perturb_t=ar.prefix_perturb_t, mode=mode,
                                   compile=args.compile or False, sink_frames=ar.sink_frames)


def device_name(device: torch.device) -> str:
    """The GPU's name, or 'cpu'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (each recompilation adds one)."""
    return counters["stats"]["unique_graphs"]


def print_load(args) -> None:
    """The 1-minute load average before the run and now, beside the core count."""
    print(f"load average (1 min): {args.load_before:.2f} before, {os.getloadavg()[0]:.2f} after, "
          f"{os.cpu_count()} cores")


def finish(args, summary: dict, line: str) -> int:
    """Write --json, print the last line; exit with an error when inductor skipped CUDA graphs it was asked for."""
    if args.json:
        write_json(args.json, summary)
    print(line)
    if args.compile in CUDA_GRAPH_MODES and args.device.type == "cuda" and summary.get("cudagraph_skips"):
        sys.exit(f"error: inductor ran {summary['cudagraph_skips']} compiled graph(s) without CUDA graphs under "
                 f"--compile {args.compile} (TORCH_LOGS=cudagraphs says why)")
    return 0
