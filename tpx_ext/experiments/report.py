"""What the learning experiments (`control`, `frozen`) report alike: Welch's test against
rp, mean and spread over seeds, return curves with seed bands, weight profiles."""

import math
from typing import Dict, List, Sequence, Tuple

from ..extras import needs

# (title, {label: (x [N], y [seeds, N])}) for curves; (title, {label: y [N]}) for profiles
Panel = Tuple[str, Dict[str, Tuple[Sequence[float], Sequence[Sequence[float]]]]]


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p of Welch's t-test (NaN with fewer than two values a side or no spread)."""
    with needs("experiments"):
        from scipy import stats

    if len(a) < 2 or len(b) < 2 or (max(a) == min(a) and max(b) == min(b)):
        return math.nan
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def mean_std(xs: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def _pyplot():
    with needs("experiments"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    return plt


def _grid(plt, n: int, ncols: int, height: float):
    ncols = min(ncols, n)
    rows = -(-n // ncols)
    fig, axes = plt.subplots(rows, ncols, figsize=(4.2 * ncols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def plot_seed_bands(panels: List[Panel], path: str, xlabel: str, ylabel: str, ncols: int = 4) -> None:
    """One panel per cell (`ncols` to a row): the mean over seeds of each label's curve,
    band = min-max."""
    import numpy as np

    plt = _pyplot()
    fig, axes = _grid(plt, len(panels), ncols, 3.8)
    for ax, (title, curves) in zip(axes, panels):
        for i, (label, (x, ys)) in enumerate(curves.items()):
            ys = np.asarray(ys, dtype=float)
            ax.plot(x, ys.mean(0), color=f"C{i}", label=f"{label} ({len(ys)} seeds)")
            ax.fill_between(x, ys.min(0), ys.max(0), color=f"C{i}", alpha=0.2)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_profiles(panels: List[Tuple[str, Dict[str, Sequence[float]]]], path: str,
                  ylabel: str = "weight on LR", log: bool = False, ncols: int = 4) -> None:
    """One panel per cell (`ncols` to a row): each label's profile over the imagination or
    rollout steps (a weight on LR: the diagonal of tpx's matrix weight, which may leave
    [0, 1] a little)."""
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels), ncols, 3.6)
    for ax, (title, profiles) in zip(axes, panels):
        for i, (label, y) in enumerate(profiles.items()):
            ax.plot(range(len(y)), y, color=f"C{i}", label=label)
        ax.set(title=title, xlabel="step t", ylabel=ylabel)
        if log:  # symlog: a matrix weight's diagonal can dip below 0
            ax.set_yscale("symlog", linthresh=1e-6)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
