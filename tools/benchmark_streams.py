"""Benchmark the stream engine: N concurrent streams batched per tick against the same streams one after another.

The command line lives in causalvdm/benchmarks/streams.py; see --help.
"""

import sys

from causalvdm.benchmarks.streams import main

if __name__ == "__main__":
    sys.exit(main())
