"""Benchmark autoregressive generation: the shared KV cache against the recompute baseline, dtypes, compile.

    python tools/benchmark_ar.py --config configs/bench/cpu_s2.py --frames 81 [--denoise-steps 10] [--json out.json]
    python tools/benchmark_ar.py --preset paper --dtype bfloat16 [--compile reduce-overhead] [--modes cache]
    python tools/benchmark_ar.py --preset paper --modes cache,recompute --recompute-frames 33
    python tools/benchmark_ar.py --config configs/bench/cpu_s2.py --forward 10 --dtype float32,bfloat16
    python tools/benchmark_ar.py --config configs/bench/cpu_s2.py --long 100 --denoise-steps 2

Every run uses random weights (every parameter seeded, scaled by --weight-scale), one seed and one first frame,
through AutoregressiveGenerator with the iddpm sampler, whose per-step work besides the model is a few
elementwise ops. `--preset paper` is the paper's setting: CausalSTDiT-XL/2 on 32x32 latents (256x256 video),
text conditioning with random T5-XXL-shaped embeddings (1, 120, 4096), 80 frames generated from 1 given,
chunks of 8, 25 cached frames, 100 steps.

Compare mode (default): both --modes, and per video the wall seconds, frames/s, first-chunk latency (prefill and
chunk 0), model TFLOP/s and MFU against the device's dense bf16 peak (a table of known GPUs, or --peak-tflops),
peak memory (CUDA: max allocated; CPU: the process's peak RSS, reset before each mode), the cache's bytes, then
the speed-up and its model-FLOP bound from the frame-pass count (recompute: S * sum(p_i + k); cache: S * sum(k),
plus one cache-write pass of the k new frames per chunk and the prefill pass of the given frames), and the
difference of the chunks generated before the first eviction. --recompute-frames stops the baseline early (its
cost grows with the context), and the speed-up is then taken over the prefill and the chunks both modes ran. A
warm-up video of two chunks runs first (with --compile it compiles there; its seconds are recorded). With
--compile the JSON counts the graphs dynamo compiled and the graphs inductor ran without CUDA graphs (target 0;
under reduce-overhead a skip is an error). The --json file is written as each warm-up and each video ends, so a
run stopped by a time limit keeps what it measured. Wall times on a shared machine are only as good as its idle
cores: the 1-minute load average before and after is printed beside them. Last line:
    speedup=<x> bound=<y> ratio=<x/y> frames=<F> chunk=<k> max_cond=<P> denoise_steps=<S>
(with one mode: mode=<m> seconds=<s> fps=<f> tflops=<t> mfu=<u> ...).

--forward N times the hot call alone: one denoising call of a chunk against a full queue, for every --dtype
listed (and eager and compiled with --compile), the variants interleaved N times so the machine's drift hits all
alike; per variant the median seconds, the ratio to the first variant, and the cache-vs-recompute agreement of
that call in that dtype (relative to the largest output). Last line:
    forward <variant>=<s> ... speedup_<variant>=<r> ...

--long N is its own run: N chunks in cache mode only, per-chunk wall time, CPU time of the process, minor
page faults (memory the allocator had to take from the kernel again) and RSS, the ratio of the slowest to
the fastest chunk (wall) once the queue is full and the RSS growth over those chunks. --control adds, after
each of those chunks, a replay of the first full-queue chunk from a copy of its cache with the same noise:
identical work every time, so its spread is the machine's. With --compile the recompilations after the queue
is full are counted (target 0). The last line is
    long_chunks=<N> slowest_over_fastest=<r> rss_growth_mb=<m> frames=<F> chunk=<k> max_cond=<P> denoise_steps=<S>
with control_slowest_over_fastest=<c> appended under --control and recompiles_when_full=<n> under --compile.
"""

import argparse
import copy
import logging
import os
import resource
import statistics
import sys
import time

import torch
from torch._dynamo.utils import counters

import causalvdm
from causalvdm.cli.common import (ArgumentParser, finite_float, non_negative_int, one_line_errors, positive_float,
                                  positive_int)
from causalvdm.config import AutoregressiveSettings, add_config_args, load_config, require
from causalvdm.models.spatial_prefix import spatial_context, spatial_prefix_frames
from causalvdm.models.pretrained import split_init_fields
from causalvdm.models.utils import randomize_weights
from causalvdm.registry import SCHEDULERS, ConfigError, build
from causalvdm.sampling import AutoregressiveGenerator
from causalvdm.sampling.generator import COMPILE_MODES
from causalvdm.utils.dtypes import DTYPES, resolve_dtype
from causalvdm.utils.flops import device_peak_tflops, forward_flops
from causalvdm.utils.io import write_json
from causalvdm.utils.memory import keep_freed_memory, peak_memory_mb, proc_status_mb, reset_peak_memory

log = logging.getLogger("benchmark_ar")

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that capture CUDA graphs

# Settings a preset stands for; flags given on the command line win.
PRESETS = {
    "paper": dict(config="configs/_base_/xl2_256.py", frames=81, denoise_steps=100, text=True),
}


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def frame_passes(n0: int, chunks: int, k: int, max_cond: int, steps: int) -> tuple[int, int]:
    """Frames through the model summed over a video -> (recompute, cache incl. prefill and commits)."""
    recompute = steps * sum(min(n0 + j * k, max_cond) + k for j in range(chunks))
    cache = steps * chunks * k + chunks * k + n0
    return recompute, cache


def video_flops(model, mode: str, n0: int, chunks: int, k: int, max_cond: int, steps: int, rows: int, h: int, w: int,
                text_tokens: int) -> int:
    """Model FLOPs of one video as AutoregressiveGenerator runs it (`rows`: batch rows of a call, 2B with guidance).

    cache: the prefill, per chunk `steps` calls on k frames against capacity + k keys and one cache write that
    stops at the last block's K/V, the caption projected once; recompute: per chunk `steps` calls on p + k frames.
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


def make_generator(args, model, diffusion, ar: AutoregressiveSettings, mode: str) -> AutoregressiveGenerator:
    """The iddpm generator of every run, with --denoise-steps, --cfg-scale, --compile and the config's settings."""
    return AutoregressiveGenerator(model, diffusion, "iddpm", args.denoise_steps, ar.chunk_size, ar.max_cond_frames,
                                   cfg_scale=args.cfg_scale, prefix_perturb_t=ar.prefix_perturb_t, mode=mode,
                                   compile=args.compile or False, sink_frames=ar.sink_frames)


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
    print(f"load average (1 min): {args.load_before:.2f} before, {os.getloadavg()[0]:.2f} after, {os.cpu_count()} cores")
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


def device_name(device: torch.device) -> str:
    """The GPU's name, or 'cpu'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    print(f"load average (1 min): {args.load_before:.2f} before, {os.getloadavg()[0]:.2f} after, {os.cpu_count()} cores")
    line = "forward " + " ".join(f"{label}={medians[label]:.4f}" for label in variants)
    line += "".join(f" speedup_{label}={medians[base] / medians[label]:.3f}" for label in list(variants)[1:])
    return summary, line


@torch.inference_mode()  # the copies are inference tensors like the live cache, so a compiled step takes them as is
def replay_chunk(gen: AutoregressiveGenerator, cache, noise: torch.Tensor) -> float:
    """Wall seconds to denoise and commit `noise` (B, C, k, h, w) against a copy of `cache`; gen's own cache is kept."""
    live, gen.cache = gen.cache, cache.clone()
    start = time.perf_counter()
    gen.commit(gen.denoise_chunk(noise, torch.Generator().manual_seed(0)))
    synchronize(noise.device)
    seconds = time.perf_counter() - start
    gen.cache = live
    return seconds

def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (each recompilation adds one)."""
    return counters["stats"]["unique_graphs"]


def long_run(args, model, diffusion, ar, first, text) -> tuple[dict, str]:
    k, max_cond = ar.chunk_size, ar.max_cond_frames
    n0 = first.shape[2]
    frames = n0 + args.long * k
    gen = make_generator(args, model, diffusion, ar, "cache")
    full = [j for j in range(args.long) if n0 + j * k >= max_cond]  # chunks that start with the queue full
    if len(full) < 2:
        raise ValueError(f"--long {args.long} is too short: the queue of {max_cond} frames is full from chunk "
                         f"{-(-(max_cond - n0) // k)}, and the ratio needs two chunks after that")
    rss, cpu, faults, control, graphs = [], [], [], [], []
    reference = noise = None
    print(f"{'chunk':>5} {'cached':>6} {'seconds':>8} {'cpu_s':>7} {'faults':>7} {'rss_mb':>8}"
          + (f" {'control_s':>9}" if args.control else ""))
    clock, faulted = time.process_time(), minor_faults()
    for j, latents in enumerate(gen.iter_chunks(first, frames, *text, seed=args.seed)):
        cpu.append(time.process_time() - clock)
        faults.append(minor_faults() - faulted)
        graphs.append(compiled_graphs())
        if args.control and j == full[0]:  # the queue is full now and stays full
            with torch.inference_mode():
                reference = gen.cache.clone()
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(args.seed)).to(latents.device)
        if reference is not None:
            control.append(replay_chunk(gen, reference, noise))
        rss.append(proc_status_mb("VmRSS"))  # after the control's copy of the cache, so that does not count as growth
        print(f"{j:5d} {min(n0 + j * k, max_cond):6d} {gen.chunk_times[-1]:8.3f} {cpu[-1]:7.3f} {faults[-1]:7d} "
              f"{rss[-1]:8.1f}" + (f" {control[-1]:9.3f}" if reference is not None else ""), flush=True)
        clock, faulted = time.process_time(), minor_faults()
    times = [gen.chunk_times[j] for j in full]
    cpu_times = [cpu[j] for j in full]
    ratio = max(times) / min(times)
    growth = rss[-1] - rss[full[0]]
    print(f"load average (1 min): {args.load_before:.2f} before, {os.getloadavg()[0]:.2f} after, "
          f"{os.cpu_count()} cores")
    print(f"queue full from chunk {full[0]}: wall seconds min {min(times):.3f} median {statistics.median(times):.3f} "
          f"max {max(times):.3f}; CPU seconds min {min(cpu_times):.3f} median {statistics.median(cpu_times):.3f} "
          f"max {max(cpu_times):.3f} (slowest/fastest {max(cpu_times) / min(cpu_times):.3f}); "
          f"page faults {sum(faults[j] for j in full)}; RSS {rss[full[0]]:.1f} -> {rss[-1]:.1f} MB "
          f"(min {min(rss[full[0]:]):.1f}, max {max(rss[full[0]:]):.1f}); cache {gen.cache.nbytes / 2**20:.2f} MB")
    if control:
        print(f"control (chunk {full[0]} replayed {len(control)} times, identical work): wall seconds min "
              f"{min(control):.3f} median {statistics.median(control):.3f} max {max(control):.3f}")
    summary = dict(long_chunks=args.long, slowest_over_fastest=ratio, rss_growth_mb=growth, frames=frames, chunk=k,
                   max_cond=max_cond, denoise_steps=args.denoise_steps, chunk_times=gen.chunk_times, cpu_seconds=cpu,
                   cpu_slowest_over_fastest=max(cpu_times) / min(cpu_times), minor_faults=faults, rss_mb=rss,
                   cache_bytes=gen.cache.nbytes, device=str(first.device), threads=torch.get_num_threads())
    line = (f"long_chunks={args.long} slowest_over_fastest={ratio:.3f} rss_growth_mb={growth:.1f} frames={frames} "
            f"chunk={k} max_cond={max_cond} denoise_steps={args.denoise_steps}")
    if control:
        summary.update(control_seconds=control, control_slowest_over_fastest=max(control) / min(control))
        line += f" control_slowest_over_fastest={max(control) / min(control):.3f}"
    if args.compile:
        recompiles = graphs[-1] - graphs[full[0]]
        print(f"compiled graphs: {graphs[0]} after chunk 0, {graphs[full[0]]} when the queue was full, {graphs[-1]} "
              f"at the end: {recompiles} recompilations once the queue was full")
        summary.update(compiled_graphs=graphs, recompiles_when_full=recompiles)
        line += f" recompiles_when_full={recompiles}"
    return summary, line


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
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="config with `model`, `latent_size` (default 32 32), `autoregressive` and "
                        "optionally `diffusion` (default IDDPM); --preset gives one")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="paper: configs/_base_/xl2_256.py (XL/2, 32x32 "
                        "latents), --text, 81 frames, 100 steps; other flags still override")
    parser.add_argument("--frames", type=positive_int, help="frames of the video, the first one given (default 81)")
    parser.add_argument("--denoise-steps", type=positive_int, help="iddpm steps per chunk, S (default 10)")
    parser.add_argument("--modes", type=name_list(("recompute", "cache")), default="recompute,cache",
                        help="compare mode: which of recompute,cache to run, in this order (default both; the "
                        "speed-up needs both)")
    parser.add_argument("--recompute-frames", type=positive_int, help="compare mode: the recompute baseline "
                        "generates only this many frames (default and at most --frames), and the speed-up is taken "
                        "over the "
                        "chunks both modes ran: the baseline's cost grows with the context, so a short one fits a "
                        "time limit")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", type=name_list((*DTYPES, "auto")), default="auto", help="weights and KV cache: "
                        "float32, bfloat16, float16 or auto (bf16 on CUDA, fp32 on the CPU); --forward takes a "
                        "comma-separated list")
    parser.add_argument("--spatial-prefix", type=spatial_prefix_list, help="--forward: also time these spatial "
                        "prefixes, a comma-separated list of none, first_frame, prev_frames_N (default: the config's)")
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, help="torch.compile the "
                        "per-step model call (mode default; reduce-overhead adds CUDA graphs, so that a small chunk's "
                        "call does not wait on kernel launches, and on CUDA a run in which inductor skipped them "
                        "exits with an error); --forward then times eager and compiled side by side; the JSON gets "
                        "the counts of compiled graphs and CUDA-graph skips")
    parser.add_argument("--text", action="store_true", help="condition on random text embeddings shaped like the "
                        "text encoder's (1, model_max_length, caption_channels), all tokens valid")
    parser.add_argument("--cfg-scale", type=finite_float, default=1.0, help="classifier-free guidance with --text "
                        "(default 1: none; otherwise every call runs a batch of 2)")
    parser.add_argument("--peak-tflops", type=positive_float, help="the device's dense peak in TFLOP/s for the MFU "
                        "(default: the bf16 peak of a known GPU; none on a CPU)")
    parser.add_argument("--forward", type=positive_int, metavar="N", help="instead: time the hot call alone, N "
                        "interleaved repetitions per variant (--dtype list, eager and --compile)")
    parser.add_argument("--long", type=positive_int, metavar="N", help="instead: N chunks in cache mode, per-chunk "
                        "time and RSS")
    parser.add_argument("--control", action="store_true", help="with --long: after each full-queue chunk, time a "
                        "replay of the first one (identical work), to show the machine's own spread")
    parser.add_argument("--threads", type=positive_int, help="CPU threads of torch (default: torch's choice, one per "
                        "core); one thread leaves a core to the rest of the machine, so its interruptions stall no "
                        "barrier")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random weights and of the "
                        "sampling noise")
    parser.add_argument("--weight-scale", type=positive_float, default=0.25,
                        help="scale of the random weights (default 0.25; at 1 a 12-layer random model is chaotic: the "
                        "1e-6 round-off between the two equal computations grows to O(1) within a few chunks)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    args.config = args.config or preset.get("config")
    if args.config is None:
        parser.error("give --config or --preset")
    args.frames = args.frames or preset.get("frames", 81)
    if args.frames < 2:  # one frame is given, so a video of one frame generates nothing to time
        parser.error(f"argument --frames: must be >= 2 (the first frame is given), got {args.frames}")
    args.denoise_steps = args.denoise_steps or preset.get("denoise_steps", 10)
    args.recompute_frames = min(args.recompute_frames or args.frames, args.frames)
    if args.recompute_frames < 2:
        parser.error(f"argument --recompute-frames: must be >= 2 (the first frame is given), got "
                     f"{args.recompute_frames}")
    args.text = args.text or preset.get("text", False)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.dtypes = [str(resolve_dtype(name, args.device)).removeprefix("torch.") for name in args.dtype]
    if len(args.dtypes) > 1 and not args.forward:
        parser.error("a list of dtypes is for --forward; other runs take one")
    if args.spatial_prefix is not None and not args.forward:
        parser.error("--spatial-prefix is for --forward (other runs read model.spatial_prefix of the config)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
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
    args.spatial_prefixes = [model.spatial_prefix] if args.spatial_prefix is None else args.spatial_prefix
    device = args.device
    randomize_weights(model, seed=args.seed, scale=args.weight_scale).to(device).eval()
    h, w = cfg.get("latent_size", (32, 32))
    gen = torch.Generator().manual_seed(args.seed)
    first = torch.randn(1, model.in_channels, 1, h, w, generator=gen).to(device)
    text = (None, None)
    if args.text and model.caption_channels:
        text = (torch.randn(1, model.model_max_length, model.caption_channels, generator=gen).to(device),
                torch.ones(1, model.model_max_length, dtype=torch.bool, device=device))
    log.info("%s: %.1fM parameters, latents %dx%d, %s (%s), %s, %d threads, k=%d, max_cond=%d, S=%d, text %s, "
             "compile %s", cfg.model.type, sum(p.numel() for p in model.parameters()) / 1e6, h, w, device,
             device_name(device), ",".join(args.dtypes), torch.get_num_threads(), ar.chunk_size, ar.max_cond_frames,
             args.denoise_steps, "yes" if text[0] is not None else "no", args.compile or "no")
    args.load_before = os.getloadavg()[0]

    with one_line_errors(ValueError):  # a setting the config cannot run, e.g. --long too short to fill the queue
        if args.forward:
            summary, line = forward_bench(args, model, ar, first, text)
        else:
            model.to(DTYPES[args.dtypes[0]])
            with torch.inference_mode():  # warm-up: first-call allocations stay out of every timing
                model(first, torch.zeros(1, 1, dtype=torch.long, device=device))
            if args.long:
                summary, line = long_run(args, model, diffusion, ar, first, text)
            else:
                summary, line = compare(args, model, diffusion, ar, first, text)
    if args.json:
        write_json(args.json, summary)
    print(line)
    if args.compile in CUDA_GRAPH_MODES and args.device.type == "cuda" and summary.get("cudagraph_skips"):
        sys.exit(f"error: inductor ran {summary['cudagraph_skips']} compiled graph(s) without CUDA graphs under "
                 f"--compile {args.compile} (TORCH_LOGS=cudagraphs says why)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
