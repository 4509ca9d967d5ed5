"""Check that chunk-by-chunk generation through the shared KV cache computes what the model would compute without it.

The command line lives in causalvdm/cli/verify_cache.py; see --help.
"""

import sys

from causalvdm.cli.verify_cache import main

if __name__ == "__main__":
    sys.exit(main())
