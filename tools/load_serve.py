"""Load a running live server with N websocket viewers: frames/s per viewer, p95 frame interval, dropped frames.

The command line lives in causalvdm/benchmarks/serve_load.py; see --help.
"""

import sys

from causalvdm.benchmarks.serve_load import main

if __name__ == "__main__":
    sys.exit(main())
