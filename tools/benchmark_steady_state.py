"""Benchmark a long video in cache mode: the cost per chunk must stay flat and memory constant once the queue is full.

The command line lives in causalvdm/benchmarks/steady_state.py; see --help.
"""

import sys

from causalvdm.benchmarks.steady_state import main

if __name__ == "__main__":
    sys.exit(main())
