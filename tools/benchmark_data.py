"""Time the data side of a training config alone: batches/s of its DataLoader, no model.

    python tools/benchmark_data.py --config configs/demo/overfit.py --root DIR --manifest overfit.jsonl \
        [--steps 40] [--repeats 3] [--num-workers N] [--cache-bytes B]

Builds `dataset` of the config (root and manifest of its innermost dataset replaced) and the trainer's
DataLoader (`build_dataloader`, batch size and workers of `train`), then times `--steps` batches after a
first one (which pays for worker start-up and filling the clip cache, reported on its own), `--repeats`
times, each with a fresh loader, and logs the median seconds per batch: wall clock, and the CPU time of
this process, which other jobs on a shared machine disturb far less (it misses the work of DataLoader
workers, so compare it only with --num-workers 0).
"""

import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import causalvdm.data  # noqa: E402,F401  (registers the datasets)
from causalvdm.cli.common import ArgumentParser, non_negative_int, one_line_errors, positive_int  # noqa: E402
from causalvdm.config import load_config, require  # noqa: E402
from causalvdm.data import StatefulSampler, build_dataloader, default_num_workers  # noqa: E402
from causalvdm.registry import DATASETS, ConfigError, build  # noqa: E402

log = logging.getLogger("benchmark_data")


def time_loader(dataset, batch_size: int, num_workers: int, steps: int, seed: int) -> tuple[float, float, float]:
    """(wall seconds of the first batch, median wall and CPU seconds per batch of the next `steps`), fresh loader."""
    sampler = StatefulSampler(len(dataset), 0, 1, seed)
    loader = iter(build_dataloader(dataset, batch_size, num_workers, sampler, seed))
    start = time.perf_counter()
    next(loader)
    first = time.perf_counter() - start
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        next(loader)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return first, statistics.median(wall), statistics.median(cpu)


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo/overfit.py")
    parser.add_argument("--root", required=True, help="data root of the innermost dataset")
    parser.add_argument("--manifest", default="overfit.jsonl")
    parser.add_argument("--steps", type=positive_int, default=40, help="batches timed per repeat (default 40)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--num-workers", type=non_negative_int, help="DataLoader workers (default: the config's "
                        "train.num_workers, else the machine's default)")
    parser.add_argument("--cache-bytes", type=non_negative_int, help="the dataset's cache_bytes (0: no cache; default: "
                        "the dataset's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with one_line_errors(ConfigError):  # these errors name the file
        cfg = load_config(args.config)
        inner, batch_size = require(cfg, "dataset", "train.batch_size")
    with one_line_errors(ConfigError, prefix=f"{args.config}: "):
        while "dataset" in inner:  # RepeatDataset and the like wrap the dataset that reads files
            inner = inner["dataset"]
        inner.update(root=args.root, manifest=args.manifest)
        if args.cache_bytes is not None:
            inner["cache_bytes"] = args.cache_bytes
        dataset = build(DATASETS, cfg.dataset, "dataset")
    workers = args.num_workers if args.num_workers is not None else cfg.train.get("num_workers")
    workers = default_num_workers() if workers is None else workers  # as the trainer picks them
    # The loader runs one epoch of full batches: a shorter one would end before the last timed step.
    if len(dataset) // batch_size < args.steps + 1:
        sys.exit(f"error: {args.config}: {len(dataset)} clips make {len(dataset) // batch_size} batches of "
                 f"{batch_size}; --steps {args.steps} needs {args.steps + 1}")

    runs = [time_loader(dataset, batch_size, workers, args.steps, seed=0) for _ in range(args.repeats)]
    first, wall, cpu = (statistics.median(r[k] for r in runs) for k in range(3))
    log.info("%s batch %d, %d workers: first batch %.4f s, then %.4f s/batch wall, %.4f s/batch CPU "
             "(medians of %d repeats; wall: %s)", Path(args.root) / args.manifest, batch_size, workers, first,
             wall, cpu, args.repeats, ", ".join(f"{r[1]:.4f}" for r in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
