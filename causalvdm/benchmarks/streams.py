"""Benchmark the stream engine: N concurrent streams in one batched call per tick against the same N streams made one
after another by separate generators.

    python tools/benchmark_streams.py --config configs/demo/captions.py --text --denoise-steps 3
    python tools/benchmark_streams.py --preset paper --streams 1,2,4,8,16 --cache-dtypes model,int8 --compile
    python tools/benchmark_streams.py --config configs/demo/captions.py --text --streams 16 --stagger 1 \
        --writes gather,span --no-sequential

For each count N of --streams, cache storage of --cache-dtypes, way of writing --writes and mode (eager, and compiled
with --compile: the engine's tick through torch.compile's default mode, without CUDA graphs, so no other mode is
taken), N streams open at once (or --stagger ticks apart, as viewers arrive, the ticks until the last opens untimed)
and run until each has --chunks chunks (after an untimed warm-up round on the same engine; the one-after-another
baseline starts with an untimed stream of one chunk). Printed per row: aggregate frames/s, chunk latency p50 / p95 over
every stream's chunks, time to first chunk (mean), the same N streams generated one after another (frames/s, p95 chunk
latency), the KV pool's MiB, peak memory, the model FLOP rate achieved and the FLOP-bound frames/s: the device's dense
peak over the model FLOPs of a frame (a GPU's from the table in utils/flops.py, elsewhere the rate of a large matrix
product measured first). The last line is
    streams_8_over_1=<r> p95_8_over_1=<q>
(aggregate frames/s at 8 streams over 1 stream, and their p95 chunk latencies; targets >= 3 and <= 3), eager, for
the first cache storage and the first of --writes.
"""

import itertools
import statistics
import time

import torch

from causalvdm.benchmarks.ar import (compiled_graphs, finish, make_generator, name_list, new_parser, print_load,
                                     resolve_args, setup, synchronize)
from causalvdm.cli.common import non_negative_int, one_line_errors, positive_int
from causalvdm.models.kv_quant import CACHE_DTYPES
from causalvdm.serving import StreamEngine
from causalvdm.utils.flops import device_peak_tflops, forward_flops
from causalvdm.utils.io import write_json
from causalvdm.utils.memory import peak_memory_mb, reset_peak_memory

STORAGE = ("model", *CACHE_DTYPES)
WRITES = {"auto": None, "gather": True, "span": False}  # --writes -> StreamEngine's gather_writes


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def flops_per_frame(model, engine: StreamEngine, text_tokens: int, rows: int) -> float:
    """Model FLOPs per generated frame of one stream: its rows' denoising calls and the commit, per chunk frame."""
    k, h, w = engine.chunk_size, engine.height, engine.width
    keys = engine.pool.padded_slots
    denoise = forward_flops(model, rows, k, h, w, keys, text_tokens, project_text=False)
    commit = forward_flops(model, rows, k, h, w, keys, text_tokens, project_text=False, head=False,
                           last_block_kv_only=True)
    return (engine.num_steps * denoise + commit) / k


def gemm_tflops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """The FLOP rate of a large matrix product on `device` in `dtype`: the practical peak where no table has one."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    a @ a  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def run_engine(engine: StreamEngine, streams: int, chunks: int, first, text, stagger: int = 0) -> dict:
    """Open `streams` streams, `stagger` ticks apart (0: at once), and tick until each has `chunks` chunks from when
    the last one opened -> figures of the round."""
    ids = []
    for i in range(streams):
        if i:
            for _ in range(stagger):
                engine.step()
        ids.append(engine.open(first, y=text[0], mask=text[1], seed=i))
    done = {sid: 0 for sid in ids}
    latencies = []
    synchronize(engine.device)
    start = time.perf_counter()
    while min(done.values()) < chunks:
        for chunk in engine.step():
            done[chunk.stream] += 1
            latencies.append(chunk.latency)
    synchronize(engine.device)
    wall = time.perf_counter() - start
    figures = engine.stats()
    first_chunk = statistics.mean(figures[sid]["first_chunk"] for sid in ids)
    frames = sum(done.values()) * engine.chunk_size
    for sid in ids:
        engine.close(sid)
    return dict(fps=frames / wall, p50=percentile(latencies, 0.5), p95=percentile(latencies, 0.95),
                first_chunk=first_chunk, wall=wall)


def run_sequential(args, model, diffusion, ar, streams: int, chunks: int, first, text) -> dict:
    """The same streams one after another, each by its own generator -> frames/s and p95 chunk latency.

    An untimed stream of one chunk goes first, as the engine's warm-up round does: the generator's first calls pay for
    kernel plans of its own shapes (on an H200 the first row's baseline ran at under half the later rows' speed)."""
    n0 = first.shape[2]
    for _ in make_generator(args, model, diffusion, ar, "cache").iter_chunks(first, n0 + ar.chunk_size, y=text[0],
                                                                             mask=text[1], seed=0):
        pass
    synchronize(first.device)
    latencies, frames = [], 0
    start = time.perf_counter()
    for seed in range(streams):
        gen = make_generator(args, model, diffusion, ar, "cache")
        for latents in gen.iter_chunks(first, n0 + chunks * ar.chunk_size, y=text[0], mask=text[1], seed=seed):
            frames += latents.shape[2]
        latencies += gen.chunk_times
    synchronize(first.device)
    return dict(fps=frames / (time.perf_counter() - start), p95=percentile(latencies, 0.95))


def main(argv=None) -> int:
    parser = new_parser(__doc__)
    parser.add_argument("--streams", type=lambda text: [positive_int(n) for n in text.split(",")],
                        default=[1, 2, 4, 8, 16], help="comma-separated stream counts (default 1,2,4,8,16)")
    parser.add_argument("--chunks", type=positive_int, default=4, help="chunks each stream makes per round (default 4)")
    parser.add_argument("--denoise-steps", type=positive_int, default=3, help="denoising steps per chunk (default 3, "
                        "a few-step student's)")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (default 1: "
                        "none; with --text and a scale != 1 each stream takes two rows)")
    parser.add_argument("--cache-dtypes", type=name_list(STORAGE), default=["model"], help="comma-separated KV "
                        "storage: model (the weights' dtype), int8, float8_e4m3fn (default model)")
    parser.add_argument("--dtype", default="auto", help="weights: float32, bfloat16 or auto (bf16 on CUDA)")
    parser.add_argument("--stagger", type=non_negative_int, default=0, help="ticks between one stream's opening and "
                        "the next's, as viewers arrive out of step (default 0: all at once)")
    parser.add_argument("--writes", type=name_list(WRITES), default=["auto"], help="comma-separated ways a cache "
                        "write of streams whose rows lie apart runs: gather (their rows copied together), span (every "
                        "row from the first writer's to the last's), auto (the engine's default: gather on the CPU, "
                        "span on a GPU) (default auto)")
    parser.add_argument("--no-sequential", action="store_true", help="skip the one-after-another baseline")
    args = parser.parse_args(argv)
    resolve_args(parser, args, [args.dtype])
    if args.compile not in (None, "default"):
        parser.error(f"--compile {args.compile}: the stream engine compiles its tick in torch.compile's default mode "
                     "(no CUDA graphs); give --compile without a mode")
    with one_line_errors():
        model, diffusion, ar, first, text = setup(args)
        model.to(getattr(torch, args.dtypes[0]))
        h, w = first.shape[-2:]
        text_tokens = model.model_max_length if text[0] is not None else 0
        rows_per_stream = 2 if text[0] is not None and args.cfg_scale != 1.0 else 1
        peak = device_peak_tflops(args.device)
        source = "the device table"
        if peak is None:
            peak, source = gemm_tflops(args.device, model.dtype), "a 2048^3 matrix product measured here"
        print(f"FLOP bound: {peak:.3f} TFLOP/s ({source})")
        modes = ["eager", "compiled"] if args.compile else ["eager"]
        results = []
        print(f"{'streams':>7} {'cache':>13} {'writes':>6} {'mode':>8} {'frames/s':>9} {'p50_s':>7} {'p95_s':>7} "
              f"{'first_s':>8} {'seq_fps':>8} {'seq_p95':>8} {'pool_mb':>8} {'peak_mb':>8} {'gflop/s':>8} "
              f"{'bound_fps':>9}")
        for storage, writes in itertools.product(args.cache_dtypes, args.writes):
            for mode in modes:
                for n in args.streams:
                    engine = StreamEngine(model, diffusion, None, latent_size=(h, w), max_rows=n * rows_per_stream,
                                          sampler="iddpm", num_steps=args.denoise_steps, chunk_size=ar.chunk_size,
                                          max_cond_frames=ar.max_cond_frames, cfg_scale=args.cfg_scale,
                                          prefix_perturb_t=ar.prefix_perturb_t, sink_frames=ar.sink_frames,
                                          cache_dtype=None if storage == "model" else storage,
                                          compile=mode == "compiled", gather_writes=WRITES[writes])
                    run_engine(engine, n, 1, first, text, args.stagger)  # warm-up: allocations, compilation
                    reset_peak_memory(args.device)
                    row = run_engine(engine, n, args.chunks, first, text, args.stagger)
                    row.update(streams=n, cache=storage, writes=writes, mode=mode, pool_mb=engine.pool.nbytes / 2**20,
                               peak_mb=peak_memory_mb(args.device))
                    per_frame = flops_per_frame(model, engine, text_tokens, rows_per_stream)
                    # Every tick runs all the pool's rows, so the work per frame is per stream as in a lone one.
                    row["gflops"] = row["fps"] * per_frame / 1e9
                    row["bound_fps"] = peak * 1e12 / per_frame
                    if not args.no_sequential and mode == "eager" and writes == args.writes[0]:
                        seq = run_sequential(args, model, diffusion, ar, n, args.chunks, first, text)
                        row.update(seq_fps=seq["fps"], seq_p95=seq["p95"])
                    results.append(row)
                    if args.json:  # after each row, so a run stopped by a timeout keeps what it measured
                        write_json(args.json, dict(rows=results))
                    baseline = f"{'-':>8} {'-':>8}"
                    if "seq_fps" in row:
                        baseline = f"{row['seq_fps']:8.2f} {row['seq_p95']:8.3f}"
                    print(f"{n:7d} {storage:>13} {writes:>6} {mode:>8} {row['fps']:9.2f} {row['p50']:7.3f} "
                          f"{row['p95']:7.3f} {row['first_chunk']:8.3f} {baseline} {row['pool_mb']:8.1f} "
                          f"{row['peak_mb']:8.0f} {row['gflops']:8.1f} {row['bound_fps']:9.1f}", flush=True)
        print_load(args)
    base = {r["streams"]: r for r in results
            if r["mode"] == "eager" and r["cache"] == args.cache_dtypes[0] and r["writes"] == args.writes[0]}
    summary = dict(rows=results, graphs=compiled_graphs() if args.compile else None)
    line = "streams_8_over_1=n/a p95_8_over_1=n/a (run with 1 and 8 in --streams)"
    if 1 in base and 8 in base:
        summary.update(streams_8_over_1=base[8]["fps"] / base[1]["fps"], p95_8_over_1=base[8]["p95"] / base[1]["p95"])
        line = f"streams_8_over_1={summary['streams_8_over_1']:.2f} p95_8_over_1={summary['p95_8_over_1']:.2f}"
    return finish(args, summary, line)
