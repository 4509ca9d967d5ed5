"""Convert an Open-Sora v1 STDiT-XL/2 or PixArt-alpha XL/2 checkpoint into a CausalSTDiT state dict (safetensors).

The command line lives in causalvdm/cli/convert_checkpoint.py; see --help.
"""

import sys

from causalvdm.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
