"""Benchmark the hot call alone: one denoising call of a chunk against a full queue, per dtype, prefix and compile.

The command line lives in causalvdm/benchmarks/step.py; see --help.
"""

import sys

from causalvdm.benchmarks.step import main

if __name__ == "__main__":
    sys.exit(main())
