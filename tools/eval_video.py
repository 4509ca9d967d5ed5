"""Evaluate generated videos against real ones: FVD, per-chunk FVD, PSNR, SSIM and frame statistics.

The command line lives in causalvdm/cli/eval_video.py; see --help.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from causalvdm.cli.eval_video import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
