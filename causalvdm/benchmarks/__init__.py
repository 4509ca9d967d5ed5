"""Benchmarks behind tools/benchmark_*.py: autoregressive generation (the shared module `ar` and one command line per
measure: `speedup`, `step`, `steady_state`) and training throughput (`train`). The top layer: nothing imports it."""
