"""Optional dependencies. The library (ops, reference, estimators) needs torch and numpy only;
the Dreamer application (`tpx_ext.dreamer`: agent, trainer, environments, logging, plots)
needs the `dreamer` extra, the experiment tools (gradvar's plots and progress, the Ray
sweep) the `experiments` extra."""

import contextlib


@contextlib.contextmanager
def needs(extra: str):
    """Imports inside this block that fail for a missing package name the extra to install."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"{exc.name} is not installed: it comes with tpx_ext's {extra!r} extra. Install it "
            f"from the source checkout with: pip install --no-build-isolation '.[{extra}]'",
            name=exc.name,
        ) from exc
