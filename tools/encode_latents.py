"""Encode every video of a dataset with the VAE once, so that training reads latents instead of pixels.

The command line lives in causalvdm/cli/encode_latents.py; see --help.
"""

import sys

from causalvdm.cli.encode_latents import main

if __name__ == "__main__":
    sys.exit(main())
