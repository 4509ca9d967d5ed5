"""Benchmark the shared KV cache against the recompute baseline over whole videos: the speed-up and its bound.

    python tools/benchmark_speedup.py --config configs/bench/cpu_s2.py --frames 81 [--denoise-steps 10] [--json o.json]
    python tools/benchmark_speedup.py --preset paper --dtype bfloat16 [--compile reduce-overhead] [--modes cache]
    python tools/benchmark_speedup.py --preset paper --modes cache,recompute --recompute-frames 33

Both --modes, and per video the wall seconds, frames/s, first-chunk latency (prefill and chunk 0), model TFLOP/s
and MFU against the device's dense bf16 peak (a table of known GPUs, or --peak-tflops), peak memory (CUDA: max
allocated; CPU: the process's peak RSS, reset before each mode), the cache's bytes, then the speed-up and its
model-FLOP bound from the frame-pass count (recompute: S * sum(p_i + k); cache: S * sum(k), plus one cache-write
pass of the k new frames per chunk and the prefill pass of the given frames), and the difference of the chunks
generated before the first eviction. --recompute-frames stops the baseline early (its cost grows with the
context), and the speed-up is then taken over the prefill and the chunks both modes ran. A warm-up video of two
chunks runs first (with --compile it compiles there; its seconds are recorded). With --compile the JSON counts the
graphs dynamo compiled and the graphs inductor ran without CUDA graphs (target 0; under reduce-overhead a skip is
an error). The --json file is written as each warm-up and each video ends, so a run stopped by a time limit keeps
what it measured. Last line:
    speedup=<x> bound=<y> ratio=<x/y> frames=<F> chunk=<k> max_cond=<P> denoise_steps=<S>
(with one mode: mode=<m> seconds=<s> fps=<f> tflops=<t> mfu=<u> ...).
"""

import argparse
import logging
import sys
import time

import torch
from torch._dynamo.utils import counters

from causalvdm.benchmarks.ar import (DTYPE_HELP, DTYPE_NAMES, compiled_graphs, device_name, finish, frame_passes,
                                     make_generator, name_list, new_parser, print_load, resolve_args, setup, warm_up)
from causalvdm.cli.common import finite_float, one_line_errors, positive_float, positive_int
from causalvdm.models.spatial_prefix import spatial_context, spatial_prefix_frames
from causalvdm.sampling import AutoregressiveGenerator
from causalvdm.utils.flops import device_peak_tflops, forward_flops
from causalvdm.utils.io import write_json
from causalvdm.utils.memory import peak_memory_mb, reset_peak_memory

log = logging.getLogger("benchmark_ar")


def video_flops(model, mode: str, n0: int, chunks: int, k: int, max_cond: int, steps: int, rows: int, h: int, w: int,
                text_tokens: int) -> int:
    """Model FLOPs of one video as AutoregressiveGenerator runs it (`rows`: batch rows of a call, 2B with guidance).

    In the paper's letters (k = chunk_size, max_cond = max_cond_frames): cache: the prefill, per chunk `steps` calls
    on k frames against max_cond + k keys and one cache write that stops at the last block's K/V, the caption
    projected once; recompute: per chunk `steps` calls on p + k frames.
    """
    f = dict(batch=rows, height=h, width=w, text_tokens=text_tokens)
    rule = model.spatial_prefix
    total = 0
    if text_tokens:  # caption MLP and the per-block text K/V, once per video
        total += forward_flops(model, frames=0, **f)
    if mode == "cache":
        if n0:
            total += forward_flops(model, frames=n0, keys=max(k, n0) + max_cond, project_text=False, head=False,
                                   last_block_kv_only=True, **f)
        call = forward_flops(model, frames=k, keys=max_cond + max(k, n0), project_text=False,
                             spatial_context=(k, spatial_prefix_frames(rule)), **f)
        write = forward_flops(model, frames=k, keys=max_cond + max(k, n0), project_text=False, head=False,
                              last_block_kv_only=True, **f)
        return total + chunks * (steps * call + write)
    for j in range(chunks):
        p = min(n0 + j * k, max_cond)
        total += steps * forward_flops(model, frames=p + k, project_text=False,
                                       spatial_context=(k, len(spatial_context(rule, p))), **f)
    return total


def run(gen: AutoregressiveGenerator, first, text, num_frames: int, seed: int, compare_chunks: int) -> dict:
    """Generate one video -> timings, peak memory, cache bytes and the first `compare_chunks` chunks."""
    device = gen.device
    reset_peak_memory(device)
    start = time.perf_counter()
    kept, first_chunk = [], None
    for j, latents in enumerate(gen.iter_chunks(first, num_frames, *text, seed=seed)):
        if first_chunk is None:
            first_chunk = time.perf_counter() - start  # iter_chunks synchronises the device after each chunk
        if j < compare_chunks:
            kept.append(latents.cpu())
    total = time.perf_counter() - start
    return dict(total=total, prefill=gen.prefill_time, first_chunk_latency=first_chunk, chunk_times=list(gen.chunk_times),
                peak_mb=peak_memory_mb(device), cache_bytes=gen.cache.nbytes if gen.cache is not None else 0,
                chunks=kept)


def compile_counters() -> dict:
    """Graphs dynamo compiled and CUDA-graph skips of inductor in this process so far (target: one graph, 0 skips)."""
    return dict(compiled_graphs=compiled_graphs(), cudagraph_skips=counters["inductor"]["cudagraph_skips"])


def seconds_over(result: dict, chunks: int) -> float:
    """Wall seconds of a video's prefill and its first `chunks` chunks."""
    return result["prefill"] + sum(result["chunk_times"][:chunks])
def compare(args, model, diffusion, ar, first, text) -> tuple[dict, str]:
    """Compare mode: each of --modes, a warm-up then one timed video; the summary is written to --json as each
    warm-up and each video ends, so a run stopped by a time limit keeps what it measured."""
    k, max_cond = ar.chunk_size, ar.max_cond_frames
    b, _, n0, h, w = first.shape
    rows = 2 * b if text[0] is not None and args.cfg_scale != 1 else b
    text_tokens = text[0].shape[1] if text[0] is not None else 0
    peak = args.peak_tflops or device_peak_tflops(first.device)
    summary = dict(frames=args.frames, recompute_frames=args.recompute_frames, given=n0, chunk=k, max_cond=max_cond,
                   denoise_steps=args.denoise_steps, sampler="iddpm", device=str(first.device),
                   device_name=device_name(first.device), dtype=str(model.dtype).removeprefix("torch."),
                   compile=args.compile, cfg_scale=args.cfg_scale, text_tokens=text_tokens,
                   threads=torch.get_num_threads(), peak_tflops=peak)

    def save() -> None:
        if args.json:
            write_json(args.json, summary)

    save()
    results = {}
    for mode in args.modes:
        frames = args.recompute_frames if mode == "recompute" else args.frames
        gen = make_generator(args, model, diffusion, ar, mode)
        chunks = gen.num_chunks(n0, frames)
        no_eviction = sum(1 for j in range(chunks) if n0 + j * k <= max_cond)
        log.info("%s: warm-up video of 2 chunks ...", mode)
        start = time.perf_counter()
        for _ in gen.iter_chunks(first, n0 + 2 * k, *text, seed=args.seed):
            pass
        summary[mode] = dict(warmup_seconds=time.perf_counter() - start)  # with --compile: the compilation
        if args.compile:
            summary.update(compile_counters())
        save()
        log.info("%s: %d chunks ...", mode, chunks)
        result = run(gen, first, text, frames, args.seed, no_eviction)
        flops = video_flops(model, mode, n0, chunks, k, max_cond, args.denoise_steps, rows, h, w, text_tokens)
        result.update(name=mode, frames=frames, frames_per_s=(frames - n0) / result["total"],
                      model_tflop=flops / 1e12, tflops=flops / result["total"] / 1e12)
        result["mfu"] = result["tflops"] / peak if peak else None
        results[mode] = result
        summary[mode].update({k_: v for k_, v in result.items() if k_ != "chunks"})
        if args.compile:
            summary.update(compile_counters())
        save()
        print(f"{mode:>9}: {result['total']:.2f}s for {frames - n0} frames ({result['frames_per_s']:.2f} frames/s), "
              f"first chunk {result['first_chunk_latency']:.3f}s, {result['model_tflop']:.3g} TFLOP at "
              f"{result['tflops']:.3g} TFLOP/s" + (f" = {100 * result['mfu']:.1f}% MFU" if peak else "")
              + f", peak memory {result['peak_mb']:.0f} MB, cache {result['cache_bytes'] / 2**20:.2f} MB", flush=True)
    print_load(args)
    if args.compile:
        print(f"compiled graphs: {summary['compiled_graphs']}, CUDA-graph skips: {summary['cudagraph_skips']}")
    if len(results) == 1:
        (mode, r), = results.items()
        mfu = f"{r['mfu']:.3f}" if peak else "n/a"
        line = (f"mode={mode} seconds={r['total']:.3f} fps={r['frames_per_s']:.3f} tflops={r['tflops']:.3f} mfu={mfu} "
                f"frames={r['frames']} chunk={k} max_cond={max_cond} denoise_steps={args.denoise_steps}")
        return summary, line

    rec, cac = results["recompute"], results["cache"]
    print(f"{'chunk':>5} {'frames':>9} {'cond':>4} {'recompute_s':>11} {'cache_s':>8} {'speedup':>7}")
    for j, (tr, tc) in enumerate(zip(rec["chunk_times"], cac["chunk_times"])):
        lo = n0 + j * k
        print(f"{j:5d} {lo:4d}-{lo + k - 1:<4d} {min(lo, max_cond):4d} {tr:11.3f} {tc:8.3f} {tr / tc:7.2f}")
    both = min(len(rec["chunk_times"]), len(cac["chunk_times"]))  # --recompute-frames may stop the baseline early
    passes_rec, passes_cache = frame_passes(n0, both, k, max_cond, args.denoise_steps)
    bound = passes_rec / passes_cache
    speedup = seconds_over(rec, both) / seconds_over(cac, both)
    diffs = [(a - b).abs().max().item() for a, b in zip(rec["chunks"], cac["chunks"])]
    scale = max(a.abs().max().item() for a in rec["chunks"])
    print(f"over the prefill and the {both} chunks both ran: frame passes recompute {passes_rec} = S*sum(p_i + k); "
          f"cache {passes_cache} = S*sum(k) + one cache-write pass of k frames per chunk + the prefill pass of "
          f"{n0} frame(s)")
    print(f"max abs diff over the {len(diffs)} chunks before the first eviction: {max(diffs):.3e} "
          f"(largest |latent| {scale:.3g}, relative {max(diffs) / scale:.2e})")
    summary.update(speedup=speedup, bound=bound, ratio=speedup / bound, speedup_chunks=both,
                   frame_passes=dict(recompute=passes_rec, cache=passes_cache),
                   max_abs_diff=max(diffs), max_rel_diff=max(diffs) / scale)
    save()
    line = (f"speedup={speedup:.3f} bound={bound:.3f} ratio={speedup / bound:.3f} frames={args.frames} chunk={k} "
            f"max_cond={max_cond} denoise_steps={args.denoise_steps}")
    return summary, line


def parse_args(argv=None) -> argparse.Namespace:
    """The flags of this benchmark and the shared ones, checked, with the preset's settings filled in."""
    parser = new_parser(__doc__)
    parser.add_argument("--frames", type=positive_int, help="frames of the video, the first one given (default 81)")
    parser.add_argument("--denoise-steps", type=positive_int, help="iddpm steps per chunk, S (default 10)")
    parser.add_argument("--modes", type=name_list(("recompute", "cache")), default="recompute,cache",
                        help="which of recompute,cache to run, in this order (default both; the speed-up needs both)")
    parser.add_argument("--recompute-frames", type=positive_int, help="the recompute baseline generates only this "
                        "many frames (default and at most --frames), and the speed-up is taken over the chunks both "
                        "modes ran: the baseline's cost grows with the context, so a short one fits a time limit")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help=DTYPE_HELP)
    parser.add_argument("--cfg-scale", type=finite_float, default=1.0, help="classifier-free guidance with --text "
                        "(default 1: none; otherwise every call runs a batch of 2)")
    parser.add_argument("--peak-tflops", type=positive_float, help="the device's dense peak in TFLOP/s for the MFU "
                        "(default: the bf16 peak of a known GPU; none on a CPU)")
    args = parser.parse_args(argv)
    preset = resolve_args(parser, args, [args.dtype])
    args.frames = args.frames or preset.get("frames", 81)
    if args.frames < 2:  # one frame is given, so a video of one frame generates nothing to time
        parser.error(f"argument --frames: must be >= 2 (the first frame is given), got {args.frames}")
    args.denoise_steps = args.denoise_steps or preset.get("denoise_steps", 10)
    args.recompute_frames = min(args.recompute_frames or args.frames, args.frames)
    if args.recompute_frames < 2:
        parser.error(f"argument --recompute-frames: must be >= 2 (the first frame is given), got "
                     f"{args.recompute_frames}")
    return args


def main(argv=None) -> int:
    """Run the cache-vs-recompute comparison of `argv` (default: the command line) -> exit status."""
    args = parse_args(argv)
    model, diffusion, ar, first, text = setup(args)
    with one_line_errors(ValueError):  # a setting the config cannot run
        warm_up(model, first, args.dtypes[0])
        summary, line = compare(args, model, diffusion, ar, first, text)
    return finish(args, summary, line)


if __name__ == "__main__":
    sys.exit(main())
