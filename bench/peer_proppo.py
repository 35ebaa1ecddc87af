"""Gradient variance and speed of proppo's TP/RP/LR (the TP authors' library) against tpx_ext.

    python bench/peer_proppo.py --proppo DIR [--horizons 10 30 100] [--batch 1000] [--reps 60]
        [--estimators rp lr tpx ...] [--warmup 20] [--seed 0] [--threads 1] [--out PATH]

The system is the one of proppo's own demo, `examples/rnn_demo.py` (default option 4): a
2-D sigmoid RNN s' = sigmoid(beta s W) + eps, eps ~ N(0, 0.001^2), W = [[-5, -25], [5, 25]],
beta = 2.4, s_0 = (0.35, 0.55) for every sample, loss 0.5 |1 - s_H|^2 summed over the two
coordinates and averaged over the batch. proppo's methods (RPProp, LRProp, TotalProp) run the
demo's loop as written there; tpx_ext's estimators (names from
`tpx_ext.experiments.gradvar.ESTIMATORS`) run the same system,
`tpx_ext.experiments.systems.SigmoidRNN` ("rnn-sigmoid"), through `policy_gradient`, whose
nodes get the sigmoid's derivative as `jacobian` (proppo's demo gives TP the per-sample
parameter, `ivw_target=expanded_beta`, in the same spirit). Both in
this one process, on the CPU, with --threads torch threads. The defaults take about a
minute on one core (most of it proppo's TP and everything at H = 100).

For every horizon H and method it takes --reps gradients with respect to beta (batch --batch
each) and prints:
- the variance of the gradient over the reps, with a 95% chi-square interval;
- the mean gradient with its standard error, as the gradient of the objective -loss (proppo
  minimises the loss and returns d loss / d beta: its sign is flipped so both sides agree);
- it/s: gradients per second of wall clock, the total time of the loop of --reps gradients
  (time.perf_counter around it; tpx_ext estimators with running statistics first take
  --warmup uncounted gradients, as `gradvar.measure` does; every method also takes one
  untimed gradient of H = 2 at the start, so one-off costs of the first call are not timed);
- the variance ratios of every other tpx_ext estimator to min(rp, lr) (tpx_ext's own rp and
  lr, which are always run) and to proppo's TP, with 95% F intervals (see `ratio_ci`).
tpx_ext's estimators share their noise (rep i of horizon H uses the same generator for all,
as in gradvar); proppo draws from torch's global generator, seeded once per (H, method)
from --seed, so its three methods share their noise among themselves and are independent of
tpx_ext's.

proppo's source is never part of this repository: clone it (`git clone
https://github.com/proppo/proppo`) and pass the clone (the directory that contains the
`proppo` package) as --proppo; the bench puts it on sys.path only to import it. Without it
the bench says so in one line and runs tpx_ext's estimators alone. It was checked against
proppo 40c9f23 (its last commit), written for torch 1.7; it runs unchanged under this
repository's torch, so nothing in it is patched.

--out PATH writes PATH.csv (one row per horizon and method, the columns in COLUMNS; mean is
d(-loss)/d beta) and PATH.json (the configuration, the interval rules and the rows).
"""

import argparse
import csv
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from tpx_ext.experiments import gradvar
from tpx_ext.experiments.systems import SYSTEMS, policy_gradient

# The demo's constants (examples/rnn_demo.py: --beta, make_weights('chaotic'),
# init_state('chaotic'), the scale 0.001 of make_manager's zero_mean_param).
BETA = 2.4
W = ((-5.0, -25.0), (5.0, 25.0))
S0 = (0.35, 0.55)
NOISE = 0.001

PROPPO_METHODS = ("RP", "LR", "TP")
COLUMNS = ("method", "source", "horizon", "batch", "reps", "mean", "variance", "var_ci_low",
           "var_ci_high", "it_per_s")
LEVEL = 0.95
INTERVALS = (
    "95% intervals assume normally distributed gradients (heavy tails, as RP's at long "
    "horizons, make them too narrow). Variance: chi-square with reps - 1 degrees of freedom. "
    "Ratios: F(reps - 1, reps - 1), the interval of two independent samples; exact for "
    "tpx_ext vs proppo (independent noise), conservative (too wide) for tpx_ext vs tpx_ext, "
    "whose estimators share their noise, and the choice of min(rp, lr) by the sample "
    "variances is not accounted for.")
NOT_FOUND = ("proppo not found ({why}): running tpx_ext's estimators alone; to compare with "
             "TP, get it with `git clone https://github.com/proppo/proppo` and pass "
             "`--proppo <the clone>`.")


# ----------------------------------------------------------------------------- proppo
def load_proppo(path: Optional[str]):
    """The namespace of what the demo imports from proppo, or None (after printing NOT_FOUND)."""
    if path is None:
        print(NOT_FOUND.format(why="no --proppo given"))
        return None
    path = os.path.abspath(path)
    sys.path.insert(0, path)
    try:
        import proppo
        from proppo.propagators import LRProp, RPProp, TotalProp
        from proppo.utils import expand
    except Exception as e:  # ImportError, or an error inside proppo
        print(NOT_FOUND.format(why=f"cannot import it from {path}: {type(e).__name__}: {e}"))
        return None
    finally:
        sys.path.remove(path)  # the package keeps its own __path__ for later imports
    return argparse.Namespace(proppo=proppo, expand=expand, path=os.path.dirname(
        os.path.dirname(os.path.abspath(proppo.__file__))),
        props={"RP": RPProp, "LR": LRProp, "TP": TotalProp})


def proppo_seed(seed: int, horizon: int) -> int:
    return ((seed * 1009 + horizon) * 10_000_019 + 3_000_000) % 2**63


def proppo_gradients(pp, method: str, horizon: int, batch: int, reps: int, seed: int,
                     progress=None):
    """([reps] d loss / d beta as float64, seconds of the loop): proppo's examples/rnn_demo.py,
    option 4, with --grad-method `method`."""
    from torch.distributions.normal import Normal

    torch.manual_seed(proppo_seed(seed, horizon))
    # main(): parameters, the expanded beta, make_manager(expanded_beta, option=4, grad_method)
    weights = torch.tensor(W)
    beta = torch.Tensor([BETA])
    beta.requires_grad = True
    expanded_beta = pp.expand(beta, batch)
    zero_mean_param = lambda x: {'loc': torch.zeros_like(x), 'scale': NOISE}  # noqa: E731
    manager = pp.proppo.PropagationManager(default_propagator=pp.props[method](
        dist_class=Normal, dist_params=zero_mean_param, ivw_target=expanded_beta))
    grads = []
    start = time.perf_counter()
    for _ in range(reps):
        s = torch.tensor(S0).repeat([batch, 1])  # init_state('chaotic')
        for _step in range(horizon):
            s = torch.sigmoid(expanded_beta * torch.matmul(s, weights))  # sigmoid_layer
            s = manager.forward(s)
        batch_loss = (0.5 * (1.0 - s)**2).sum(dim=1, keepdim=True)
        manager.backward(batch_loss)
        grads.append(beta.grad.item())
        beta.grad.zero_()
        if progress is not None:
            progress.update(horizon)
    return torch.tensor(grads, dtype=torch.float64), time.perf_counter() - start


# ----------------------------------------------------------------------------- tpx_ext
def make_system():
    # The demo's constants passed explicitly, so both sides run the same system by construction.
    return SYSTEMS["rnn-sigmoid"](gain=BETA, W=W, noise=NOISE, start=S0)


def tpx_gradients(name: str, system, horizon: int, batch: int, reps: int, warmup: int, seed: int,
                  progress=None):
    """([reps] d(-loss) / d beta as float64, seconds of the loop) of estimator `name`."""
    policy = system.make_policy(0, torch.float32)  # an RNNCell: its only parameter is the gain
    estimator = gradvar.make_estimator(name)

    def one(gen):
        policy.zero_grad()
        policy_gradient(estimator, policy, system, horizon, batch, gen)
        if progress is not None:
            progress.update(horizon)
        return policy.gain.grad.item()

    if gradvar.has_history(estimator):
        for j in range(warmup):
            one(gradvar.rep_generator("cpu", seed, horizon, gradvar.WARMUP_OFFSET + j))
    start = time.perf_counter()
    grads = [one(gradvar.rep_generator("cpu", seed, horizon, i)) for i in range(reps)]
    return torch.tensor(grads, dtype=torch.float64), time.perf_counter() - start


# ----------------------------------------------------------------------------- statistics
def variance_ci(grads: torch.Tensor, level: float = LEVEL):
    """(sample variance, low, high): the chi-square interval; inf if a gradient is not finite."""
    from scipy.stats import chi2

    n = grads.numel()
    if not bool(torch.isfinite(grads).all()):
        return math.inf, math.inf, math.inf
    var = grads.var().item()
    alpha = 1 - level
    return (var, (n - 1) * var / chi2.ppf(1 - alpha / 2, n - 1),
            (n - 1) * var / chi2.ppf(alpha / 2, n - 1))


def ratio_ci(var_a: float, n_a: int, var_b: float, n_b: int, level: float = LEVEL):
    """(var_a / var_b, low, high): the F interval of the ratio of two variances from independent
    normal samples of sizes n_a and n_b (NaN where a variance is 0 or not finite)."""
    from scipy.stats import f

    if not (0 < var_a < math.inf and 0 < var_b < math.inf):
        return math.nan, math.nan, math.nan
    r, alpha = var_a / var_b, 1 - level
    return (r, r / f.ppf(1 - alpha / 2, n_a - 1, n_b - 1), r / f.ppf(alpha / 2, n_a - 1, n_b - 1))


def make_row(method, source, horizon, batch, grads, seconds) -> Dict:
    var, lo, hi = variance_ci(grads)
    return {"method": method, "source": source, "horizon": horizon, "batch": batch,
            "reps": grads.numel(), "mean": grads.mean().item(), "variance": var,
            "var_ci_low": lo, "var_ci_high": hi, "it_per_s": grads.numel() / seconds,
            "stderr": math.sqrt(var / grads.numel())}


# ----------------------------------------------------------------------------- tables
def label(r: Dict) -> str:
    return f"proppo {r['method']}" if r["source"] == "proppo" else r["method"]


def _g(x: float, digits: int = 3) -> str:
    return "-" if x is None or math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.{digits}g}")


def _e(x: float) -> str:
    return "-" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.2e}")


def _table(head: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])


def ratios(rows: Sequence[Dict]) -> List[Dict]:
    """Every tpx_ext estimator but rp and lr, per horizon: its variance over min(rp, lr) and
    over proppo's TP, with F intervals."""
    out = []
    for H in dict.fromkeys(r["horizon"] for r in rows):
        at = {label(r): r for r in rows if r["horizon"] == H}
        best = min(("rp", "lr"), key=lambda m: at[m]["variance"])
        for m, r in at.items():
            if r["source"] != "tpx_ext" or m in ("rp", "lr"):
                continue
            entry = {"horizon": H, "method": m, "best": best,
                     "vs_best": ratio_ci(r["variance"], r["reps"], at[best]["variance"],
                                         at[best]["reps"])}
            tp = at.get("proppo TP")
            entry["vs_tp"] = (ratio_ci(r["variance"], r["reps"], tp["variance"], tp["reps"])
                              if tp else None)
            out.append(entry)
    return out


def markdown(rows: Sequence[Dict], have_proppo: bool) -> str:
    horizons = list(dict.fromkeys(r["horizon"] for r in rows))
    names = list(dict.fromkeys(label(r) for r in rows))
    order = ([n for n in ("rp", "lr") if n in names] + [n for n in names if n.startswith("proppo ")]
             + [n for n in names if n not in ("rp", "lr") and not n.startswith("proppo ")])
    cell = {(r["horizon"], label(r)): r for r in rows}

    def grid(fmt):
        return [[str(H)] + [fmt(cell[H, n]) for n in order] for H in horizons]

    def ci(x, lo, hi):
        return f"{_g(x)} [{_g(lo, 2)}, {_g(hi, 2)}]"

    ratio_lines = []
    for e in ratios(rows):
        line = [str(e["horizon"]), e["method"], ci(*e["vs_best"]) + f" (vs {e['best']})"]
        line.append(ci(*e["vs_tp"]) if e["vs_tp"] else "-")
        ratio_lines.append(line)
    parts = [
        "Variance of d loss / d beta over the reps [95% interval]:", "",
        _table(["H"] + order, grid(lambda r: f"{_e(r['variance'])} [{_e(r['var_ci_low'])}, "
                                             f"{_e(r['var_ci_high'])}]")), "",
        "Variance ratios [95% interval]:", "",
        _table(["H", "estimator", "/ min(rp, lr) [95% CI]", "/ proppo TP [95% CI]"], ratio_lines),
        "", INTERVALS, "",
        "Mean d(-loss) / d beta +- standard error (proppo's sign flipped):", "",
        _table(["H"] + order, grid(lambda r: f"{r['mean']:.4g} +- {_g(r['stderr'], 2)}")), "",
        "Gradients per second (it/s, one thread unless --threads):", "",
        _table(["H"] + order, grid(lambda r: f"{r['it_per_s']:.3g}")),
    ]
    if not have_proppo:
        parts.append("\n(proppo not run: no proppo columns.)")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--proppo", metavar="DIR", help="directory containing the proppo package "
                   "(a clone of https://github.com/proppo/proppo)")
    p.add_argument("--horizons", type=int, nargs="+", default=[10, 30, 100])
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--estimators", nargs="+", default=["rp", "lr", "tpx"],
                   help=f"names in gradvar.ESTIMATORS ({', '.join(gradvar.ESTIMATORS)}); "
                        "rp and lr are always run")
    p.add_argument("--warmup", type=int, default=20,
                   help="uncounted gradients first, for estimators with running statistics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", metavar="PATH", help="write PATH.csv and PATH.json")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    unknown = [m for m in args.estimators if m not in gradvar.ESTIMATORS]
    if unknown:
        p.error(f"unknown estimators {unknown}; valid: {', '.join(gradvar.ESTIMATORS)}")
    if args.reps < 2:
        p.error("--reps must be at least 2 (a variance needs two gradients)")
    return args


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    estimators = list(dict.fromkeys(["rp", "lr"] + args.estimators))
    pp = load_proppo(args.proppo)
    methods = [("proppo", m) for m in PROPPO_METHODS] if pp else []
    methods += [("tpx_ext", m) for m in estimators]
    system = make_system()

    def run(source, method, H, reps, bar=None):
        if source == "proppo":
            return proppo_gradients(pp, method, H, args.batch, reps, args.seed, bar)
        return tpx_gradients(method, system, H, args.batch, reps, args.warmup, args.seed, bar)

    for source, method in methods:  # one-off costs of the first call, untimed
        run(source, method, 2, 2)

    from tqdm import tqdm

    hist = sum(gradvar.has_history(gradvar.make_estimator(m)) for m in estimators)
    total = sum(H * (args.reps * len(methods) + args.warmup * hist) for H in args.horizons)
    bar = tqdm(total=total, unit="step", desc="peer_proppo", disable=args.no_progress,
               file=sys.stderr)
    rows, begin = [], time.perf_counter()
    for H in args.horizons:
        for source, method in methods:
            bar.set_postfix_str(f"H={H} {source} {method}")
            grads, secs = run(source, method, H, args.reps, bar)
            if source == "proppo":
                grads = -grads  # d loss / d beta -> d(-loss) / d beta, tpx_ext's sign
            rows.append(make_row(method, source, H, args.batch, grads, secs))
    bar.close()
    elapsed = time.perf_counter() - begin

    print(f"\nproppo's rnn_demo system, batch {args.batch}, {args.reps} gradients per cell, "
          f"seed {args.seed}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
          + (f", proppo from {pp.path}" if pp else "") + "\n")
    print(markdown(rows, pp is not None))
    if args.out:
        stem = args.out[:-4] if args.out.endswith(".csv") else args.out
        os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
        with open(stem + ".csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        # The clone's location is this machine's, not the result's: recorded as a placeholder.
        clone = "PROPPO_CLONE"
        words = list(sys.argv[1:] if argv is None else argv)
        words = [clone if i and words[i - 1] == "--proppo" else w for i, w in enumerate(words)]
        config = {k: v for k, v in vars(args).items() if k != "no_progress"}
        config.update(proppo=clone if args.proppo else None)
        config.update(estimators=estimators, proppo_found=pp is not None,
                      torch=torch.__version__,
                      system={"beta": BETA, "W": W, "s0": S0, "noise": NOISE},
                      command=" ".join(["bench/peer_proppo.py"] + words),
                      intervals=INTERVALS, seconds=elapsed)
        with open(stem + ".json", "w") as fh:
            json.dump({"config": config, "rows": rows,
                       "ratios": [{**e, "vs_best": list(e["vs_best"]),
                                   "vs_tp": list(e["vs_tp"]) if e["vs_tp"] else None}
                                  for e in ratios(rows)]}, fh, indent=1)
        print(f"\nwrote {stem}.csv and {stem}.json")
    return rows


if __name__ == "__main__":
    main()
