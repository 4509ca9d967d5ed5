"""The caption demo's videos: plan which to generate, then report how close each came to the real shots.

The command line lives in causalvdm/cli/demo_videos.py; see --help.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from causalvdm.cli.demo_videos import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
