"""`python -m tpx_ext.sweep`: grids of training runs through Ray, `tpx_ext.experiments.sweep`."""

import sys

from .experiments.sweep import main

if __name__ == "__main__":
    sys.exit(main())
