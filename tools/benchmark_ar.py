"""Benchmark autoregressive generation: the shared KV cache against the recompute baseline.

    python tools/benchmark_ar.py --config configs/bench/cpu_s2.py --frames 81 [--denoise-steps 10] [--json out.json]
    python tools/benchmark_ar.py --config configs/bench/cpu_s2.py --long 100 --denoise-steps 2

Both modes run the same random weights (every parameter seeded, scaled by --weight-scale), seed and
first frame through AutoregressiveGenerator with the iddpm sampler, whose per-step work besides the
model is a few elementwise ops. Reported: per-chunk and total wall time, the speed-up, its model-FLOP
bound from the frame-pass count (recompute: S * sum(p_i + k); cache: S * sum(k), plus one cache-write
pass of the k new frames per chunk and the prefill pass of the given frames), peak memory (CUDA: max allocated; CPU: the
process's peak RSS, reset before each mode), the cache's bytes and the max difference of the chunks
generated before the first eviction. Wall times on a shared machine are only as good as its idle
cores: the 1-minute load average before and after each run is printed beside them. Last line:
    speedup=<x> bound=<y> ratio=<x/y> frames=<F> chunk=<k> max_cond=<P> denoise_steps=<S>

--long N is its own run: N chunks in cache mode only, per-chunk wall time, CPU time of the process, minor
page faults (memory the allocator had to take from the kernel again) and RSS, the ratio of the slowest to
the fastest chunk (wall) once the queue is full and the RSS growth over those chunks. --control adds, after
each of those chunks, a replay of the first full-queue chunk from a copy of its cache with the same noise:
identical work every time, so its spread is the machine's. The last line is
    long_chunks=<N> slowest_over_fastest=<r> rss_growth_mb=<m> frames=<F> chunk=<k> max_cond=<P> denoise_steps=<S>
with control_slowest_over_fastest=<c> appended under --control.
"""

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import causalvdm
from causalvdm.config import AutoregressiveSettings, add_config_args, load_config
from causalvdm.models.utils import randomize_weights
from causalvdm.registry import SCHEDULERS, ConfigError, build
from causalvdm.sampling import AutoregressiveGenerator
from causalvdm.utils.memory import keep_freed_memory, peak_memory_mb, proc_status_mb, reset_peak_memory

log = logging.getLogger("benchmark_ar")


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def frame_passes(n0: int, chunks: int, k: int, max_cond: int, steps: int) -> tuple[int, int]:
    """Frames through the model summed over a video -> (recompute, cache incl. prefill and commits)."""
    recompute = steps * sum(min(n0 + j * k, max_cond) + k for j in range(chunks))
    cache = steps * chunks * k + chunks * k + n0
    return recompute, cache


def make_generator(args, model, diffusion, ar: AutoregressiveSettings, mode: str) -> AutoregressiveGenerator:
    """The iddpm generator of both modes, with --denoise-steps and the config's autoregressive settings."""
    return AutoregressiveGenerator(model, diffusion, "iddpm", args.denoise_steps, ar.chunk_size, ar.max_cond_frames,
                                   prefix_perturb_t=ar.prefix_perturb_t, mode=mode)


def run(gen: AutoregressiveGenerator, first, num_frames: int, seed: int, compare_chunks: int) -> dict:
    """Generate one video -> timings, peak memory, cache bytes and the first `compare_chunks` chunks."""
    device = gen.device
    reset_peak_memory(device)
    start = time.perf_counter()
    kept = []
    for j, latents in enumerate(gen.iter_chunks(first, num_frames, seed=seed)):
        if j < compare_chunks:
            kept.append(latents.cpu())
    total = time.perf_counter() - start
    return dict(total=total, prefill=gen.prefill_time, chunk_times=list(gen.chunk_times),
                peak_mb=peak_memory_mb(device), cache_bytes=gen.cache.nbytes if gen.cache is not None else 0,
                chunks=kept)


def compare(args, model, diffusion, ar, first) -> dict:
    k, max_cond = ar.chunk_size, ar.max_cond_frames
    n0 = first.shape[2]
    results = {}
    for mode in ("recompute", "cache"):
        gen = make_generator(args, model, diffusion, ar, mode)
        chunks = gen.num_chunks(n0, args.frames)
        no_eviction = sum(1 for j in range(chunks) if n0 + j * k <= max_cond)
        log.info("%s: %d chunks ...", mode, chunks)
        results[mode] = run(gen, first, args.frames, args.seed, no_eviction)
        results[mode]["name"] = mode

    rec, cac = results["recompute"], results["cache"]
    print(f"{'chunk':>5} {'frames':>9} {'cond':>4} {'recompute_s':>11} {'cache_s':>8} {'speedup':>7}")
    for j, (tr, tc) in enumerate(zip(rec["chunk_times"], cac["chunk_times"])):
        lo = n0 + j * k
        print(f"{j:5d} {lo:4d}-{lo + k - 1:<4d} {min(lo, max_cond):4d} {tr:11.3f} {tc:8.3f} {tr / tc:7.2f}")
    passes_rec, passes_cache = frame_passes(n0, len(cac["chunk_times"]), k, max_cond, args.denoise_steps)
    bound = passes_rec / passes_cache
    speedup = rec["total"] / cac["total"]
    diffs = [(a - b).abs().max().item() for a, b in zip(rec["chunks"], cac["chunks"])]
    scale = max(a.abs().max().item() for a in rec["chunks"])
    print(f"recompute: total {rec['total']:.2f}s, peak memory {rec['peak_mb']:.0f} MB")
    print(f"cache:     total {cac['total']:.2f}s (prefill {cac['prefill']:.3f}s), peak memory {cac['peak_mb']:.0f} MB, "
          f"cache {cac['cache_bytes'] / 2**20:.2f} MB")
    print(f"frame passes: recompute {passes_rec} = S*sum(p_i + k); cache {passes_cache} = S*sum(k) + one cache-write "
          f"pass of k frames per chunk + the prefill pass of {n0} frame(s)")
    print(f"load average (1 min): {args.load_before:.2f} before, {os.getloadavg()[0]:.2f} after, "
          f"{os.cpu_count()} cores")
    print(f"max abs diff over the {len(diffs)} chunks before the first eviction: {max(diffs):.3e} "
          f"(largest |latent| {scale:.3g}, relative {max(diffs) / scale:.2e})")
    summary = dict(speedup=speedup, bound=bound, ratio=speedup / bound, frames=args.frames, chunk=k,
                   max_cond=max_cond, denoise_steps=args.denoise_steps, sampler="iddpm", device=str(first.device),
                   threads=torch.get_num_threads(), frame_passes=dict(recompute=passes_rec, cache=passes_cache),
                   max_abs_diff=max(diffs), max_rel_diff=max(diffs) / scale,
                   recompute={k_: v for k_, v in rec.items() if k_ != "chunks"},
                   cache={k_: v for k_, v in cac.items() if k_ != "chunks"})
    line = (f"speedup={speedup:.3f} bound={bound:.3f} ratio={speedup / bound:.3f} frames={args.frames} chunk={k} "
            f"max_cond={max_cond} denoise_steps={args.denoise_steps}")
    return summary, line


def replay_chunk(gen: AutoregressiveGenerator, cache, noise: torch.Tensor) -> float:
    """Wall seconds to denoise and commit `noise` (B, C, k, h, w) against a copy of `cache`; gen's own cache is kept."""
    live, gen.cache = gen.cache, cache.clone()
    start = time.perf_counter()
    gen.commit(gen.denoise_chunk(noise, torch.Generator().manual_seed(0)))
    if noise.device.type == "cuda":
        torch.cuda.synchronize(noise.device)
    seconds = time.perf_counter() - start
    gen.cache = live
    return seconds


def long_run(args, model, diffusion, ar, first) -> tuple[dict, str]:
    k, max_cond = ar.chunk_size, ar.max_cond_frames
    n0 = first.shape[2]
    frames = n0 + args.long * k
    gen = make_generator(args, model, diffusion, ar, "cache")
    full = [j for j in range(args.long) if n0 + j * k >= max_cond]  # chunks that start with the queue full
    if len(full) < 2:
        raise ValueError(f"--long {args.long} is too short: the queue of {max_cond} frames is full from chunk "
                         f"{-(-(max_cond - n0) // k)}, and the ratio needs two chunks after that")
    rss, cpu, faults, control = [], [], [], []
    reference = noise = None
    print(f"{'chunk':>5} {'cached':>6} {'seconds':>8} {'cpu_s':>7} {'faults':>7} {'rss_mb':>8}"
          + (f" {'control_s':>9}" if args.control else ""))
    clock, faulted = time.process_time(), minor_faults()
    for j, latents in enumerate(gen.iter_chunks(first, frames, seed=args.seed)):
        cpu.append(time.process_time() - clock)
        faults.append(minor_faults() - faulted)
        if args.control and j == full[0]:  # the queue is full now and stays full
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
    return summary, line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config with `model`, `latent_size` (default 32 32), "
                        "`autoregressive` and optionally `diffusion` (default IDDPM)")
    parser.add_argument("--frames", type=int, default=81, help="frames of the video, the first one given (default 81)")
    parser.add_argument("--denoise-steps", type=int, default=10, help="iddpm steps per chunk, S (default 10)")
    parser.add_argument("--long", type=int, metavar="N", help="instead: N chunks in cache mode, per-chunk time and RSS")
    parser.add_argument("--control", action="store_true", help="with --long: after each full-queue chunk, time a "
                        "replay of the first one (identical work), to show the machine's own spread")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice, one per core); "
                        "one thread leaves a core to the rest of the machine, so its interruptions stall no barrier")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the sampling noise")
    parser.add_argument("--weight-scale", type=float, default=0.25,
                        help="scale of the random weights (default 0.25; at 1 a 12-layer random model is chaotic: the "
                        "1e-6 round-off between the two equal computations grows to O(1) within a few chunks)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        cfg = load_config(args.config, args.cfg_options)
        model_cfg = dict(cfg.model)
        model_cfg.pop("from_pretrained", None)
        model = causalvdm.build_model(model_cfg)
        diffusion = build(SCHEDULERS, cfg.get("diffusion") or dict(type="IDDPM"), "diffusion")
        ar = AutoregressiveSettings.from_cfg(cfg.get("autoregressive"))
    except ConfigError as err:
        sys.exit(f"error: {args.config}: {err}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    randomize_weights(model, seed=args.seed, scale=args.weight_scale).to(device).eval()
    h, w = cfg.get("latent_size", (32, 32))
    first = torch.randn(1, model.in_channels, 1, h, w, generator=torch.Generator().manual_seed(args.seed)).to(device)
    log.info("%s: %.1fM parameters, latents %dx%d, %s, %d threads, k=%d, max_cond=%d, S=%d",
             cfg.model.type, sum(p.numel() for p in model.parameters()) / 1e6, h, w, device,
             torch.get_num_threads(), ar.chunk_size, ar.max_cond_frames, args.denoise_steps)
    args.load_before = os.getloadavg()[0]
    with torch.inference_mode():  # warm-up: first-call allocations stay out of both timings
        model(first, torch.zeros(1, 1, dtype=torch.long, device=device))

    try:
        summary, line = long_run(args, model, diffusion, ar, first) if args.long else compare(args, model, diffusion,
                                                                                                 ar, first)
    except ValueError as err:
        sys.exit(f"error: {err}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
