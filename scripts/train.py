"""Train a causal ST-DiT; scripts/train.sh runs this under torchrun. The command line is causalvdm.cli.train:

    python scripts/train.py configs/demo/overfit.py --exp-name overfit_demo [--resume auto] [--cfg-options k=v ...]
"""

import sys

from causalvdm.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
