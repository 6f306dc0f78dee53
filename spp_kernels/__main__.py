"""`python -m spp_kernels` runs the `spp` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
