"""Sample long videos autoregressively through the shared KV cache; launched by scripts/sample.sh.

The command line lives in causalvdm/cli/sample.py (also installed as `causalvdm-sample`); see --help.
"""

import sys

from causalvdm.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
