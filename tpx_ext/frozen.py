"""`python -m tpx_ext.frozen`: behaviour learning in a trained run's frozen world model,
`tpx_ext.experiments.frozen`."""

from .experiments.frozen import main

if __name__ == "__main__":
    main()
