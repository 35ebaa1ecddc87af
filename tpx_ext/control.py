"""`python -m tpx_ext.control`: policy optimisation through known noisy dynamics,
`tpx_ext.experiments.control`."""

from .experiments.control import main

if __name__ == "__main__":
    main()
