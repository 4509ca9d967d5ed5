"""Benchmark training throughput of the clean-prefix objective on synthetic data (also under torchrun).

The command line lives in causalvdm/benchmarks/train.py; see --help.
"""

import sys

from causalvdm.benchmarks.train import main

if __name__ == "__main__":
    sys.exit(main())
