"""Benchmark the shared KV cache against the recompute baseline over whole videos: the speed-up and its bound.

The command line lives in causalvdm/benchmarks/speedup.py; see --help.
"""

import sys

from causalvdm.benchmarks.speedup import main

if __name__ == "__main__":
    sys.exit(main())
