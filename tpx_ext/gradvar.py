"""`python -m tpx_ext.gradvar`: the gradient-quality tool, `tpx_ext.experiments.gradvar`."""

from .experiments.gradvar import main

if __name__ == "__main__":
    main()
