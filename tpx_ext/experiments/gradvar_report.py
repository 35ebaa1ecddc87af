"""The gradient-quality tables, markdown, CSV and plots of `python -m tpx_ext.gradvar`."""

import csv
import math
from typing import Dict, Sequence

from ..extras import needs
from .gradvar_measure import COLUMNS, mode_of

def ratio_tables(rows: Sequence[Dict]) -> Dict[str, Dict]:
    """{(system, H): {estimator: (var / min(var_rp, var_lr), var / var_tp or None)}}."""
    by_key: Dict = {}
    for r in rows:
        by_key.setdefault((r["system"], r["horizon"]), {})[r["mode"]] = r["variance"]
    out = {}
    for key, var in by_key.items():
        best = min(var["rp"], var["lr"])
        tp = var.get("tp")
        out[key] = {m: (v / best if best > 0 else math.nan,
                        v / tp if tp is not None and 0 < tp < math.inf else None)
                    for m, v in var.items()}
    return out


def _fmt_ratio(x, limit) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    text = f"{x:.2f}" if x < 100 else f"{x:.3g}"
    return f"**{text}**" if x > limit else text


def suite_markdown(rows: Sequence[Dict], command: str, config: Dict, seconds: float) -> str:
    ratios = ratio_tables(rows)
    names = list(dict.fromkeys(r["mode"] for r in rows))
    tpx_names = [m for m in names if mode_of(m) == "tpx"]
    lines = [
        "# Gradient-quality suite: tpx weight rules on chaotic systems", "",
        "Made with", "", "```", command, "```", "",
        "Configuration: " + ", ".join(f"{k} {v}" for k, v in config.items())
        + f". Compute time {seconds / 60:.1f} min (sum over the cached parts, one thread).", "",
        "Systems: `tpx_ext.experiments.systems` (their docstrings give the dynamics and Lyapunov "
        "exponents). Estimators: the mode table's modes and named variants (`tpx_ext.estimators.modes`). Every estimator sees the "
        "same noise; those with running statistics take the warm-up gradients first and keep "
        "updating.", "",
        "## Variance of each tpx rule relative to min(rp, lr)", "",
        "Bold: above the target 1.2.", "",
    ]

    def table(index, limit, keys, rp_over_lr=False):
        """limit(key): the ratio above which a cell is bold."""
        extra = " `rp` / `lr` |" if rp_over_lr else ""
        head = "| system | H |" + extra + " " + " | ".join(f"`{m}`" for m in tpx_names) + " |"
        out = [head, "|---|---:|" + "---:|" * (len(tpx_names) + bool(rp_over_lr))]
        for key in keys:
            cells = [_fmt_ratio(ratios[key][m][index], limit(key)) for m in tpx_names]
            first = f" {rp_lr[key]:.3g} |" if rp_over_lr else ""
            out.append(f"| {key[0]} | {key[1]} |{first} " + " | ".join(cells) + " |")
        return out

    keys = list(ratios)
    rp_lr = {key: ratios[key]["rp"][0] / ratios[key]["lr"][0] for key in keys}
    lines += table(0, lambda key: 1.2, keys)
    lines += ["", "## Variance of each tpx rule relative to tp", "",
              "Bold: above the target 1.5, which applies where RP fails (`rp` / `lr` > 10).", ""]
    lines += table(1, lambda key: 1.5 if rp_lr[key] > 10 else math.inf, keys, rp_over_lr=True)
    lines += ["", "## All estimators", "", "variance: trace of the covariance of the batch gradient "
              "over the reps; error: RMS distance to the reference (the mean of high-sample rp or lr "
              "gradients, its standard error in the last column); cos: cosine of the reps' mean "
              "gradient with the reference; ms/grad: median time of one "
              "gradient on one thread of a shared machine (noisy).", ""]
    for system in dict.fromkeys(r["system"] for r in rows):
        lines += [f"### {system}", "", "```", format_table([r for r in rows if r["system"] == system]),
                  "```", ""]
    return "\n".join(lines)


def format_table(rows: Sequence[Dict]) -> str:
    width = max([4] + [len(r["mode"]) for r in rows])
    lines = [f"{'H':>4} {'mode':>{width}} {'variance':>10} {'error':>10} {'snr':>9} {'cos':>6} {'norm':>10} "
             f"{'ms/grad':>8} {'nonfinite':>9}  reference (stderr)"]
    for r in rows:
        lines.append(f"{r['horizon']:>4} {r['mode']:>{width}} {r['variance']:>10.3g} "
                     f"{r['error']:>10.3g} {r['snr']:>9.3g} {r.get('cos', math.nan):>6.3f} "
                     f"{r.get('norm', math.nan):>10.3g} "
                     f"{r['ms_per_grad']:>8.2f} "
                     f"{r['nonfinite']:>9.2f}  {r['reference']} ({r['ref_stderr']:.3g})")
    return "\n".join(lines)


def write_csv(rows: Sequence[Dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: Sequence[Dict], path: str) -> None:
    with needs("experiments"):
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

    panels = (("variance", "gradient variance (trace)"), ("error", "RMS error vs reference"),
              ("snr", "signal-to-noise ratio"), ("ms_per_grad", "ms per gradient"))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, title) in zip(axes.flat, panels):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            pts = [(r["horizon"], r[key]) for r in rows
                   if r["mode"] == mode and 0 < r[key] < math.inf]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
        ax.set(xscale="log", yscale="log", xlabel="horizon", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{rows[0]['system']}: batch {rows[0]['batch']}, {rows[0]['reps']} gradients per point")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_suite(rows: Sequence[Dict], path: str, ratio_path: str) -> None:
    """Variance versus horizon per system (every estimator), and each tpx rule's variance
    relative to min(rp, lr) and to tp."""
    with needs("experiments"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r["system"] for r in rows))
    names = list(dict.fromkeys(r["mode"] for r in rows))
    styles = {m: ("-" if mode_of(m) != "tpx" else "--") for m in names}
    fig, axes = plt.subplots(1, len(systems), figsize=(4.2 * len(systems), 4.2), squeeze=False)
    for ax, system in zip(axes[0], systems):
        for m in names:
            pts = [(r["horizon"], r["variance"]) for r in rows
                   if r["system"] == system and r["mode"] == m and 0 < r["variance"] < math.inf]
            if pts:
                ax.plot(*zip(*pts), styles[m], marker="o", ms=3, label=m)
        ax.set(xscale="log", yscale="log", xlabel="horizon", title=f"{system}: variance")
        ax.grid(True, which="both", alpha=0.3)
    _save(plt, fig, axes, path)

    ratios = ratio_tables(rows)
    tpx_names = [m for m in names if mode_of(m) == "tpx"]
    fig, axes = plt.subplots(2, len(systems), figsize=(4.2 * len(systems), 7.5), squeeze=False)
    for col, system in enumerate(systems):
        for row_i, (index, limit, label) in enumerate(((0, 1.2, "var / min(rp, lr)"),
                                                       (1, 2.0, "var / tp"))):
            ax = axes[row_i, col]
            for m in tpx_names:
                pts = [(H, ratios[(s, H)][m][index]) for (s, H) in ratios if s == system
                       and ratios[(s, H)][m][index] is not None
                       and 0 < ratios[(s, H)][m][index] < math.inf]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=m)
            ax.axhline(limit, color="k", lw=0.8, ls=":")
            ax.set(xscale="log", yscale="log", xlabel="horizon", title=f"{system}: {label}")
            ax.grid(True, which="both", alpha=0.3)
    _save(plt, fig, axes, ratio_path)


def _save(plt, fig, axes, path: str) -> None:
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
