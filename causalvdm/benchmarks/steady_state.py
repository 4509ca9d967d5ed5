"""Benchmark a long video in cache mode: the cost per chunk must stay flat and memory constant once the queue is full.

    python tools/benchmark_steady_state.py --config configs/bench/cpu_s2.py --long 100 --denoise-steps 2
    python tools/benchmark_steady_state.py --config configs/bench/cpu_s2.py --long 100 --threads 1 --control

--long N chunks in cache mode only: per-chunk wall time, CPU time of the process, minor page faults (memory the
allocator had to take from the kernel again) and RSS, the ratio of the slowest to the fastest chunk (wall) once
the queue is full and the RSS growth over those chunks. --control adds, after each of those chunks, a replay of
the first full-queue chunk from a copy of its cache with the same noise: identical work every time, so its spread
is the machine's. With --compile the recompilations after the queue is full are counted (target 0). The last line
is
    long_chunks=<N> slowest_over_fastest=<r> rss_growth_mb=<m> frames=<F> chunk=<k> max_cond=<P> denoise_steps=<S>
with control_slowest_over_fastest=<c> appended under --control and recompiles_when_full=<n> under --compile.
"""

import argparse
import resource
import statistics
import sys
import time

import torch

from causalvdm.benchmarks.ar import (DTYPE_HELP, DTYPE_NAMES, compiled_graphs, finish, make_generator, new_parser,
                                     print_load, resolve_args, setup, synchronize, warm_up)
from causalvdm.cli.common import finite_float, one_line_errors, positive_int
from causalvdm.sampling import AutoregressiveGenerator
from causalvdm.utils.memory import proc_status_mb


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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


def long_run(args, model, diffusion, ar, first, text) -> tuple[dict, str]:
    """--long chunks in cache mode from `first` (1, C, n0, h, w) -> (the JSON summary, the last line)."""
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
    print_load(args)
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


def parse_args(argv=None) -> argparse.Namespace:
    """The flags of this benchmark and the shared ones, checked, with the preset's settings filled in."""
    parser = new_parser(__doc__)
    parser.add_argument("--long", type=positive_int, metavar="N", default=100, help="chunks to generate in cache "
                        "mode, per-chunk time and RSS (default 100)")
    parser.add_argument("--control", action="store_true", help="after each full-queue chunk, time a replay of the "
                        "first one (identical work), to show the machine's own spread")
    parser.add_argument("--denoise-steps", type=positive_int, help="iddpm steps per chunk, S (default 10)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help=DTYPE_HELP)
    parser.add_argument("--cfg-scale", type=finite_float, default=1.0, help="classifier-free guidance with --text "
                        "(default 1: none; otherwise every call runs a batch of 2)")
    args = parser.parse_args(argv)
    preset = resolve_args(parser, args, [args.dtype])
    args.denoise_steps = args.denoise_steps or preset.get("denoise_steps", 10)
    return args


def main(argv=None) -> int:
    """Run the long cache-mode video of `argv` (default: the command line) -> exit status."""
    args = parse_args(argv)
    model, diffusion, ar, first, text = setup(args)
    with one_line_errors(ValueError):  # e.g. --long too short to fill the queue
        warm_up(model, first, args.dtypes[0])
        summary, line = long_run(args, model, diffusion, ar, first, text)
    return finish(args, summary, line)


if __name__ == "__main__":
    sys.exit(main())
