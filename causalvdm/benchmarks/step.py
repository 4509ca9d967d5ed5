"""Benchmark the hot call alone: one denoising call of a chunk against a full queue, in several dtypes and spatial
prefixes, eager and compiled.

    python tools/benchmark_step.py --config configs/bench/cpu_s2.py --forward 10 --dtype float32,bfloat16 [--compile]
    python tools/benchmark_step.py --config configs/bench/cpu_s2.py --forward 10 --spatial-prefix none,first_frame

For every --dtype listed (and every --spatial-prefix, and eager and compiled with --compile) the variants run
interleaved --forward times, so the machine's drift hits all alike; per variant the median seconds, the ratio to
the first variant, and the cache-vs-recompute agreement of that call in that dtype (relative to the largest
output). Last line:
    forward <variant>=<s> ... speedup_<variant>=<r> ...
"""

import argparse
import copy
import logging
import statistics
import sys
import time

import torch

from causalvdm.benchmarks.ar import (DTYPE_HELP, DTYPE_NAMES, finish, name_list, new_parser, print_load,
                                     resolve_args, setup, synchronize)
from causalvdm.cli.common import one_line_errors, positive_int
from causalvdm.models.spatial_prefix import spatial_prefix_frames
from causalvdm.utils.dtypes import DTYPES

log = logging.getLogger("benchmark_ar")


def forward_variant(model, ar, first, text, dtype: torch.dtype, compile_mode: str | None, seed: int,
                    spatial_prefix: str | None) -> dict:
    """One variant of --forward: the model in `dtype` (and with `spatial_prefix`) with a full queue, the hot call
    (compiled or not), its output and the recompute baseline's output for the same chunk (the queue holds exactly
    max_cond frames, none evicted)."""
    # Cast outside inference mode: weights made inside it are inference tensors, and CPU bf16 matmuls then run
    # about 3x slower (measured on this project's 2-core CPU).
    model = copy.deepcopy(model).to(dtype)
    model.spatial_prefix = spatial_prefix  # no weights of its own: the same model reads a prefix or not
    with torch.inference_mode():
        return _prepare_variant(model, ar, first, text, compile_mode, seed)


def _prepare_variant(model, ar, first, text, compile_mode: str | None, seed: int) -> dict:
    k, max_cond = ar.chunk_size, ar.max_cond_frames
    b, c, _, h, w = first.shape
    gen = torch.Generator().manual_seed(seed)
    device = first.device
    frames = torch.randn(b, c, max_cond, h, w, generator=gen).to(device)
    x = torch.randn(b, c, k, h, w, generator=gen).to(device)
    t = torch.full((b, k), 500, device=device)
    y, mask = text
    cache = model.new_cache(b, max_cond, k)
    text_ctx = model.encode_text(y, mask, b, per_block_kv=True)
    for start in range(0, max_cond, k):
        model.write_cache(frames[:, :, start : start + k], cache, text=text_ctx)
    model.begin_call(cache, k, h, w)
    ctx = model.prepare(k, h, w, cache, text_ctx)
    call = model.step if compile_mode is None else torch.compile(model.step, mode=compile_mode, dynamic=False,
                                                                  fullgraph=True)
    out = call(x, t, ctx)
    t_full = torch.cat([torch.zeros(b, max_cond, dtype=t.dtype, device=device), t], dim=1)
    ref = model(torch.cat([frames, x], dim=2), t_full, y, mask, chunk=(max_cond, max_cond + k))[:, :, max_cond:]
    call(x, t, ctx)  # a second warm-up call
    synchronize(device)
    return dict(call=lambda: call(x, t, ctx), out=out, rel_diff=((out - ref).abs().max() / ref.abs().max()).item())


def forward_bench(args, model, ar, first, text) -> tuple[dict, str]:
    """Time every variant's hot call --forward times, interleaved -> (the JSON summary, the last line)."""
    modes = [None, args.compile] if args.compile else [None]
    variants = {}
    for prefix in args.spatial_prefixes:
        for name in args.dtypes:
            for mode in modes:
                label = name + ("" if mode is None else "+compile") + ("" if prefix == model.spatial_prefix
                                                                      else f"+{prefix}")
                log.info("%s: preparing ...", label)
                variants[label] = forward_variant(model, ar, first, text, DTYPES[name], mode, args.seed, prefix)
    times = {label: [] for label in variants}
    for _ in range(args.forward):
        for label, v in variants.items():
            with torch.inference_mode():
                start = time.perf_counter()
                v["call"]()
                synchronize(first.device)
                times[label].append(time.perf_counter() - start)
    base = next(iter(variants))
    medians = {label: statistics.median(ts) for label, ts in times.items()}
    reference = variants[base]["out"]
    print(f"{'variant':>22} {'median_s':>9} {'min_s':>7} {'max_s':>7} {'speedup':>7} {'cache_vs_recompute':>18} "
          f"{'vs_' + base:>14}")
    summary = dict(chunk=ar.chunk_size, max_cond=ar.max_cond_frames, repeats=args.forward, device=str(first.device),
                   threads=torch.get_num_threads(), variants={})
    for label, v in variants.items():
        vs_base = ((v["out"] - reference).abs().max() / reference.abs().max()).item()
        speedup = medians[base] / medians[label]
        print(f"{label:>22} {medians[label]:9.3f} {min(times[label]):7.3f} {max(times[label]):7.3f} {speedup:7.2f} "
              f"{v['rel_diff']:18.2e} {vs_base:14.2e}")
        summary["variants"][label] = dict(seconds=times[label], median=medians[label], speedup=speedup,
                                          cache_vs_recompute_rel_diff=v["rel_diff"], rel_diff_vs_base=vs_base)
    print_load(args)
    line = "forward " + " ".join(f"{label}={medians[label]:.4f}" for label in variants)
    line += "".join(f" speedup_{label}={medians[base] / medians[label]:.3f}" for label in list(variants)[1:])
    return summary, line

def spatial_prefix_list(text: str) -> list[str | None]:
    """An argparse type: comma-separated spatial prefixes ('none' for None), each checked by the model's rule."""
    prefixes = [None if name == "none" else name for name in text.split(",")]
    for prefix in prefixes:
        try:
            spatial_prefix_frames(prefix)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return prefixes


def parse_args(argv=None) -> argparse.Namespace:
    """The flags of this benchmark and the shared ones, checked, with the preset's settings filled in."""
    parser = new_parser(__doc__)
    parser.add_argument("--forward", type=positive_int, metavar="N", default=10, help="interleaved repetitions of the "
                        "hot call per variant (default 10)")
    parser.add_argument("--dtype", type=name_list(DTYPE_NAMES), default="auto", help=DTYPE_HELP + "; a "
                        "comma-separated list times each")
    parser.add_argument("--spatial-prefix", type=spatial_prefix_list, help="also time these spatial prefixes, a "
                        "comma-separated list of none, first_frame, prev_frames_N (default: the config's)")
    args = parser.parse_args(argv)
    resolve_args(parser, args, args.dtype)
    return args


def main(argv=None) -> int:
    """Time the hot call of every variant from `argv` (default: the command line) -> exit status."""
    args = parse_args(argv)
    model, _, ar, first, text = setup(args)
    args.spatial_prefixes = [model.spatial_prefix] if args.spatial_prefix is None else args.spatial_prefix
    with one_line_errors(ValueError):  # a setting the config cannot run
        summary, line = forward_bench(args, model, ar, first, text)
    return finish(args, summary, line)


if __name__ == "__main__":
    sys.exit(main())
