"""Learning curves from one or several runs to PNG.

    python -m tpx_ext.plot runs/a runs/b --out curves.png [--metrics eval_return train_return]

Runs whose label is the same (default label: "<estimator> H=<horizon>" from their
config.json) are one curve: the mean over the runs, with a band from their min to max,
on the steps all of them reached. Any scalar metric in metrics.jsonl can be plotted, one
panel per metric. `--profile k_action` plots a per-horizon-step metric instead (the TPX
weight on LR at every imagination step), averaged over the last `--last` fraction of each
run's training records.
"""

import json
import os
from collections import OrderedDict

import numpy as np

from ..cli import Parser
from ..extras import needs
from .logger import METRICS_FILE, read_metrics


def run_label(run_dir: str) -> str:
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return os.path.basename(os.path.normpath(run_dir))
    with open(path) as f:
        cfg = json.load(f)
    return f"{cfg['estimator']} H={cfg['horizon']}"


def curve(run_dir: str, metric: str):
    """(steps, values) of a scalar metric; the last record wins at a repeated step."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE} (is it a run directory?)")
    points = {}
    for r in read_metrics(path):
        if metric in r and isinstance(r[metric], (int, float)):
            points[r["step"]] = r[metric]
    if not points:
        raise ValueError(f"{run_dir}: metric {metric!r} was never logged")
    steps = np.array(sorted(points))
    return steps, np.array([points[s] for s in steps], dtype=float)


def plot(run_dirs, out: str, metrics=("eval_return", "train_return"), labels=None,
         title=None) -> str:
    with needs("dreamer"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    names = [labels[i] if labels else run_label(run) for i, run in enumerate(run_dirs)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.4 * len(metrics), 4.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        groups = OrderedDict()
        for name, run in zip(names, run_dirs):
            groups.setdefault(name, []).append(curve(run, metric))
        for label, curves in groups.items():
            end = min(s[-1] for s, _ in curves)
            steps = np.unique(np.concatenate([s[s <= end] for s, _ in curves]))
            ys = np.stack([np.interp(steps, s, v) for s, v in curves])
            n = len(curves)
            line, = ax.plot(steps, ys.mean(0), label=f"{label} ({n} run{'s' * (n > 1)})")
            if n > 1:
                ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def profile(run_dir: str, metric: str, last: float = 0.1) -> np.ndarray:
    """The mean over the last `last` fraction of a run's records of a list-valued metric."""
    path = os.path.join(run_dir, METRICS_FILE)
    rows = [r[metric] for r in read_metrics(path) if isinstance(r.get(metric), list)]
    if not rows:
        raise ValueError(f"{run_dir}: profile {metric!r} was never logged (rp runs have no "
                         "TPX weights)")
    keep = rows[-max(1, int(round(len(rows) * last))):]
    return np.nanmean(np.array(keep, dtype=float), axis=0)


def plot_profiles(run_dirs, out: str, metric: str = "k_action", last: float = 0.1, labels=None,
                  title=None, log: bool = False) -> str:
    with needs("dreamer"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    groups = OrderedDict()
    for i, run in enumerate(run_dirs):
        groups.setdefault(labels[i] if labels else run_label(run), []).append(profile(run, metric, last))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, profiles in groups.items():
        H = min(len(p) for p in profiles)
        ys = np.stack([p[:H] for p in profiles])
        line, = ax.plot(np.arange(H), ys.mean(0), label=f"{label} ({len(profiles)} runs)")
        if len(profiles) > 1:
            ax.fill_between(np.arange(H), ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("imagination step t")
    ax.set_ylabel(metric)
    if log:  # TPX weights span orders of magnitude over the horizon
        ax.set_yscale("log")
    ax.set_title(title or f"{metric}, mean over the last {last:.0%} of training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = Parser(prog="python -m tpx_ext.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    p.add_argument("--out", default="curves.png")
    p.add_argument("--metrics", nargs="+", default=["eval_return", "train_return"],
                   help="one panel each (any scalar in metrics.jsonl)")
    p.add_argument("--profile", metavar="METRIC",
                   help="plot a per-horizon-step metric (e.g. k_action) instead of curves")
    p.add_argument("--last", type=float, default=0.1,
                   help="--profile: fraction of the last training records averaged")
    p.add_argument("--log", action="store_true", help="--profile: logarithmic y axis")
    p.add_argument("--labels", nargs="+", help="one label per run (default from config.json)")
    p.add_argument("--title")
    a = p.parse_args(argv)
    if a.labels and len(a.labels) != len(a.runs):
        p.error(f"--labels: got {len(a.labels)} labels for {len(a.runs)} runs")
    with p.reporting(FileNotFoundError, ValueError):  # run directories and their metrics
        if a.profile:
            print(plot_profiles(a.runs, a.out, a.profile, a.last, a.labels, a.title, a.log))
        else:
            print(plot(a.runs, a.out, a.metrics, a.labels, a.title))


if __name__ == "__main__":
    main()
