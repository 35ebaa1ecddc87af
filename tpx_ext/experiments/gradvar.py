"""Gradient variance, error, SNR and cost of each estimator versus the horizon.

    python -m tpx_ext.gradvar [--system rotor|rnn|logistic|lorenz|pendulum|linear] ...
    python -m tpx_ext.gradvar --checkpoint runs/default --horizons 15 50 100 200
    python -m tpx_ext.gradvar --suite --out docs/results/gradvar_suite

For every horizon and estimator it takes `reps` independent batch gradients of
one fixed policy on a toy system (`tpx_ext.experiments.systems`), or of a trained Dreamer
agent's actor in its learned world model (`--checkpoint`: `batch` start states,
the posterior states of one replay batch, fixed across the reps; the noise is
the imagination's), and reports:
- variance: trace of the covariance of the batch gradient (over the reps);
- error: root mean square of |g - g_ref| over the reps, where g_ref is the exact
  gradient (linear system) or the mean of `ref_batches` fresh gradients of batch
  `ref_scale * batch` of whichever of rp / lr, both exactly unbiased, has the
  lower variance there (its standard error is printed, so errors below it are
  not resolved);
- snr: |g_ref| / sqrt(variance);
- cos: the cosine between the reps' mean gradient and g_ref: whether the estimator's mean
  points the way the gradient does (a biased estimator can have a small variance and
  error and still point elsewhere; the mean's own noise is variance / reps);
- norm: median |g| over the reps with a finite gradient (how the gradient's size grows with
  the horizon; NaN if none was finite);
- ms/grad: median wall time of one gradient (rollout + backward);
- nonfinite: fraction of the reps whose gradient had an inf or NaN.
Every estimator sees the same noise (rep i of horizon H draws from the same
seed for all of them), so their variances are compared on common random
numbers. An estimator with running statistics (tpx with momentum) first takes
`warmup` gradients, and its statistics keep updating through the reps, as in
training.

`--suite` runs every chaotic system at every horizon with every estimator in
`ESTIMATORS` (all tpx weight rules included) and writes OUT.csv, OUT.md (the
tables, with each tpx rule's variance relative to min(rp, lr) and to tp) and
OUT.png / OUT_ratio.png. Each (system, horizon) is cached in --cache after every
estimator, so an interrupted suite resumes where it stopped (--fresh recomputes).
Otherwise it prints a table and writes OUT.csv and OUT.png.
"""

import csv
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..estimators import MODES, Estimator
from ..estimators.modes import NAMES, parse
from ..cli import Parser
from ..extras import needs
from .systems import CHAOTIC, SYSTEMS, policy_gradient

COLUMNS = ("system", "horizon", "mode", "batch", "reps", "variance", "error", "snr", "cos", "norm",
           "ms_per_grad", "nonfinite", "reference", "ref_stderr")

# The estimators measured: every mode and named variant of the mode table
# (tpx_ext.estimators.modes; tpx-coord, tpx-paper, tpx-loo: docs/results/tpx_weight_rules.md).
# "mix" and "tpx" take --rho and --momentum.
ESTIMATORS = NAMES
BASIC = MODES  # the default of --modes outside the suite


def flat_grad(policy) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in policy.parameters()]).double().cpu()


def rep_generator(device, seed: int, horizon: int, index: int) -> torch.Generator:
    """The noise of one gradient: the same for every estimator (common random numbers)."""
    return torch.Generator(device).manual_seed((seed * 1009 + horizon) * 10_000_019 + index)


WARMUP_OFFSET, REFERENCE_OFFSET = 1_000_000, 2_000_000


def batch_gradients(grad_fn, policy, seeds, progress=None, steps: int = 1):
    """([len(seeds), P] float64 gradients of `policy`, [len(seeds)] seconds); grad_fn(gen)
    accumulates one gradient drawing its noise from `gen`, a generator per seed."""
    grads, secs = [], []
    for gen in seeds:
        policy.zero_grad()
        start = time.perf_counter()
        grad_fn(gen)
        secs.append(time.perf_counter() - start)
        grads.append(flat_grad(policy))
        if progress is not None:
            progress.update(steps)
    return torch.stack(grads), torch.tensor(secs)


def trace_variance(grads: torch.Tensor) -> float:
    return grads.var(0).sum().item() if bool(torch.isfinite(grads).all()) else math.inf


def make_estimator(name: str, rho: float = 0.5, momentum: Optional[float] = None) -> Estimator:
    """The estimator called `name` (a mode or named variant); rho for mix, momentum for tpx."""
    mode, _ = parse(name)
    knobs = {"rho": rho} if mode == "mix" else {}
    if name == "tpx" and momentum is not None:
        knobs["momentum"] = momentum
    return Estimator.from_name(name, **knobs)


def mode_of(name: str) -> str:
    return parse(name)[0]


def has_history(estimator: Estimator) -> bool:
    return estimator.mode == "tpx" and estimator.momentum > 0


def toy_problem(system_name: str, hidden: int, device):
    """(policy, grad_fn(estimator, horizon, batch, gen), exact(horizon) or None) of a toy system."""
    if system_name not in SYSTEMS:
        raise ValueError(f"unknown system {system_name!r}; valid: {', '.join(SYSTEMS)}")
    system = SYSTEMS[system_name]()
    if system_name == "linear":  # exact gradient known; the policy must be linear
        policy = system.make_policy(0, torch.float64).to(device)
    else:
        policy = system.make_policy(hidden, torch.float32).to(device)

    def grad_fn(estimator, horizon, batch, gen):
        policy_gradient(estimator, policy, system, horizon, batch, gen)

    def exact(horizon):
        g = torch.autograd.grad(system.expected_return(policy, horizon), list(policy.parameters()))
        return torch.cat([x.reshape(-1) for x in g]).cpu()

    return policy, grad_fn, exact if system_name == "linear" else None


def dreamer_problem(run_dir: str, batch: int, seed: int, device):
    """(actor, grad_fn, None) of a trained agent: the actor gradient imagined from `batch`
    fixed start states (posterior states of one replay batch)."""
    from ..dreamer.train import load_run

    agent, replay, cfg = load_run(run_dir, device)
    replay.reseed(seed)
    data = replay.sample(max(1, -(-batch // cfg.seq_len)), cfg.seq_len)
    data = {k: torch.as_tensor(data[k], device=device) for k in ("obs", "action", "reward")}
    with torch.no_grad():
        post = agent.world_model.posterior(data)
    start = post.map(lambda x: x.reshape(-1, x.shape[-1])[:batch])
    behavior = agent.behavior

    def grad_fn(estimator, horizon, batch_, gen):
        with torch.random.fork_rng(devices=[device] if str(device).startswith("cuda") else []):
            torch.manual_seed(int(torch.randint(0, 2**62, (), generator=gen, device=gen.device)))
            behavior.actor_gradient(agent.world_model, start, estimator, horizon)

    return behavior.actor, grad_fn, None


def measure(grad_fn, policy, estimator: Estimator, horizon: int, batch: int, reps: int,
            warmup: int, seed: int, device, progress=None):
    """`reps` gradients of `estimator` (after `warmup` ones if it keeps running statistics)."""
    def fn(gen):
        grad_fn(estimator, horizon, batch, gen)

    if has_history(estimator) and warmup:
        seeds = (rep_generator(device, seed, horizon, WARMUP_OFFSET + j) for j in range(warmup))
        batch_gradients(fn, policy, seeds, progress, horizon)
    seeds = (rep_generator(device, seed, horizon, i) for i in range(reps))
    return batch_gradients(fn, policy, seeds, progress, horizon)


def reference(grad_fn, policy, name: str, horizon: int, batch: int, count: int, seed: int, device,
              progress=None, scale: int = 1):
    """(mean, standard error of its trace) of `count` gradients of batch scale * batch."""
    est = make_estimator(name)
    seeds = (rep_generator(device, seed, horizon, REFERENCE_OFFSET + j) for j in range(count))
    grads, _ = batch_gradients(lambda gen: grad_fn(est, horizon, batch * scale, gen), policy, seeds,
                               progress, horizon * scale)
    return grads.mean(0), math.sqrt(trace_variance(grads) / count)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = (a.norm() * b.norm()).item()
    return (a @ b).item() / den if den > 0 else math.nan


def row(system_name, horizon, name, batch, grads, secs, g_ref, ref_name, ref_stderr) -> Dict:
    var = trace_variance(grads)
    finite = torch.isfinite(grads).all(1)
    return {
        "system": system_name, "horizon": horizon, "mode": name, "batch": batch,
        "reps": grads.shape[0], "variance": var,
        "error": ((grads - g_ref) ** 2).sum(1).mean().sqrt().item(),
        "snr": g_ref.norm().item() / math.sqrt(var) if var > 0 else math.inf,
        "cos": cosine(grads[finite].mean(0), g_ref) if bool(finite.any()) else math.nan,
        "norm": grads[finite].norm(dim=1).median().item() if bool(finite.any()) else math.nan,
        "ms_per_grad": 1e3 * secs.median().item(),
        "nonfinite": (~finite).double().mean().item(),
        "reference": ref_name, "ref_stderr": ref_stderr,
    }


def run(system_name="rotor", horizons=(1, 5, 10, 20, 50, 100), modes=BASIC, batch=32, reps=20,
        ref_batches=200, hidden=16, rho=0.5, momentum=0.0, seed=0, device="cpu",
        progress=True, checkpoint=None, warmup=0, ref_scale=1) -> List[Dict]:
    """One row per (horizon, estimator), with the COLUMNS. `checkpoint`: a Dreamer run
    directory (then system_name is ignored). `modes`: names from ESTIMATORS."""
    unknown = [m for m in modes if m not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; valid modes: {', '.join(MODES)}; "
                         f"valid estimators: {', '.join(ESTIMATORS)}")
    if checkpoint is not None and any(mode_of(m) == "tp" for m in modes):
        raise ValueError("mode tp needs per-sample parameter gradients of a small toy policy; "
                         "leave it out with --checkpoint")
    torch.manual_seed(seed)
    if checkpoint is not None:
        policy, grad_fn, exact = dreamer_problem(checkpoint, batch, seed, device)
        system_name = f"dreamer:{checkpoint.rstrip('/')}"
    else:
        policy, grad_fn, exact = toy_problem(system_name, hidden, device)

    ref_count = 0 if exact is not None else ref_batches
    candidates = [m for m in ("rp", "lr") if m not in modes] if ref_count else []
    bar = None
    if progress:
        with needs("experiments"):
            from tqdm import tqdm

        per_h = sum(reps + (warmup if has_history(make_estimator(m, rho, momentum)) else 0)
                    for m in list(modes) + candidates) + ref_count * ref_scale
        bar = tqdm(total=per_h * sum(horizons), unit="step", desc=f"gradvar {system_name}")
    rows = []
    for H in horizons:
        measured = {m: measure(grad_fn, policy, make_estimator(m, rho, momentum), H, batch, reps,
                               warmup, seed, device, bar)
                    for m in list(modes) + candidates}
        if exact is not None:
            g_ref, ref_name, ref_stderr = exact(H), "exact", 0.0
        else:
            ref_name = min(("rp", "lr"), key=lambda m: trace_variance(measured[m][0]))
            g_ref, ref_stderr = reference(grad_fn, policy, ref_name, H, batch, ref_count, seed,
                                          device, bar, ref_scale)
        for m in modes:
            rows.append(row(system_name, H, m, batch, *measured[m], g_ref, ref_name, ref_stderr))
    if bar is not None:
        bar.close()
    return rows


# ----------------------------------------------------------------------------- suite
SUITE_HORIZONS = (1, 3, 10, 30, 100, 200)


def suite_estimators() -> List[str]:
    return list(ESTIMATORS)


def _part_path(cache: str, system_name: str, horizon: int) -> str:
    return os.path.join(cache, f"{system_name}_H{horizon}.json")


def _save_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def run_suite(systems=CHAOTIC, horizons=SUITE_HORIZONS, estimators=None, batch=128, reps=64,
              warmup=20, ref_batches=16, ref_scale=8, hidden=16, seed=0, device="cpu",
              cache="runs/gradvar_suite", fresh=False, progress=True):
    """(rows of every (system, horizon, estimator), seconds of compute behind them); each
    (system, horizon) is cached in `cache` (with its configuration) after every
    estimator, and reused."""
    estimators = list(estimators or suite_estimators())
    for required in ("rp", "lr"):  # the reference and the ratios need both
        if required not in estimators:
            estimators.insert(0, required)
    unknown = [m for m in estimators if m not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimators {unknown}; valid: {', '.join(ESTIMATORS)}")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; valid: {', '.join(SYSTEMS)}")
    os.makedirs(cache, exist_ok=True)
    config = {"batch": batch, "reps": reps, "warmup": warmup, "ref_batches": ref_batches,
              "ref_scale": ref_scale, "hidden": hidden, "seed": seed}

    parts = {}
    for name in systems:
        for H in horizons:
            path = _part_path(cache, name, H)
            part = None
            if not fresh and os.path.exists(path):
                with open(path) as f:
                    part = json.load(f)
                if part.get("config") != config:
                    part = None
            parts[(name, H)] = part or {"config": config, "rows": {}, "seconds": {}, "reference": None}

    def cost(name, H, part):
        n = 0
        for m in estimators:
            if m not in part["rows"]:
                n += reps + (warmup if has_history(make_estimator(m)) else 0)
        if part["reference"] is None and name != "linear":
            n += ref_batches * ref_scale
        return n * H

    bar = None
    if progress:
        with needs("experiments"):
            from tqdm import tqdm

        bar = tqdm(total=sum(cost(n, H, p) for (n, H), p in parts.items()), unit="step",
                   desc="gradvar suite", smoothing=0.02)
    for (name, H), part in parts.items():
        missing = [m for m in estimators if m not in part["rows"]]
        if not missing and part["reference"] is not None:
            continue
        if bar is not None:
            bar.set_postfix_str(f"{name} H={H}")
        torch.manual_seed(seed)
        policy, grad_fn, exact = toy_problem(name, hidden, device)
        path = _part_path(cache, name, H)
        pending = {}

        def timed_measure(m):
            start = time.perf_counter()
            out = measure(grad_fn, policy, make_estimator(m), H, batch, reps, warmup, seed, device, bar)
            return out, time.perf_counter() - start

        if part["reference"] is None:
            for m in ("rp", "lr"):
                pending[m] = timed_measure(m)
            start = time.perf_counter()
            if exact is not None:
                g_ref, ref_name, ref_stderr = exact(H), "exact", 0.0
            else:
                ref_name = min(("rp", "lr"), key=lambda m: trace_variance(pending[m][0][0]))
                g_ref, ref_stderr = reference(grad_fn, policy, ref_name, H, batch, ref_batches, seed,
                                              device, bar, ref_scale)
            part["reference"] = {"name": ref_name, "stderr": ref_stderr, "g": g_ref.tolist(),
                                 "seconds": time.perf_counter() - start}
        ref = part["reference"]
        g_ref = torch.tensor(ref["g"], dtype=torch.float64)
        for m in estimators:
            if m in part["rows"]:
                continue
            (grads, secs), elapsed = pending.pop(m) if m in pending else timed_measure(m)
            part["rows"][m] = row(name, H, m, batch, grads, secs, g_ref, ref["name"], ref["stderr"])
            part["seconds"][m] = elapsed
            _save_json(path, part)
        _save_json(path, part)
    if bar is not None:
        bar.close()

    rows, seconds = [], 0.0
    for (name, H), part in parts.items():
        rows += [part["rows"][m] for m in estimators]
        seconds += sum(part["seconds"][m] for m in estimators) + part["reference"]["seconds"]
    return rows, seconds


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
        "exponents). Estimators: `tpx_ext.experiments.gradvar.ESTIMATORS`. Every estimator sees the "
        "same noise; those with running statistics take the warm-up gradients first and keep "
        "updating.", "",
        "## Variance of each tpx rule relative to min(rp, lr)", "",
        "Bold: above the target 1.2.", "",
    ]

    def table(index, limit, keys):
        head = "| system | H | " + " | ".join(f"`{m}`" for m in tpx_names) + " |"
        out = [head, "|---|---:|" + "---:|" * len(tpx_names)]
        for key in keys:
            cells = [_fmt_ratio(ratios[key][m][index], limit) for m in tpx_names]
            out.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
        return out

    keys = list(ratios)
    lines += table(0, 1.2, keys)
    lines += ["", "## Variance of each tpx rule relative to tp", "", "Bold: above the target 2.", ""]
    lines += table(1, 2.0, keys)
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
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

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
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(ratio_path, dpi=110)
    plt.close(fig)


def main(argv=None) -> List[Dict]:
    p = Parser(prog="python -m tpx_ext.gradvar", description=__doc__.split("\n\n")[0])
    p.add_argument("--system", default="rotor", choices=list(SYSTEMS))
    p.add_argument("--checkpoint", metavar="RUN_DIR",
                   help="a Dreamer run directory: study its actor in its world model instead")
    p.add_argument("--suite", action="store_true",
                   help="every chaotic system, horizon and estimator (see --systems, --estimators)")
    p.add_argument("--systems", nargs="+", default=list(CHAOTIC), choices=list(SYSTEMS),
                   help="--suite: the systems")
    p.add_argument("--horizons", type=int, nargs="+",
                   help="default: 1 5 10 20 50 100 (--suite: 1 3 10 30 100 200)")
    p.add_argument("--modes", "--estimators", dest="modes", nargs="+", choices=list(ESTIMATORS),
                   help="estimators; default: the five modes (without tp for --checkpoint), "
                        "--suite: all of ESTIMATORS")
    p.add_argument("--batch", type=int, help="default 32 (--suite: 128)")
    p.add_argument("--reps", type=int, help="batch gradients per (horizon, mode); default 20 "
                                            "(--suite: 64)")
    p.add_argument("--warmup", type=int, help="gradients before the reps for estimators with "
                                              "running statistics; default 0 (--suite: 20)")
    p.add_argument("--ref-batches", type=int, help="gradients in the reference; default 200 "
                                                   "(--suite: 16)")
    p.add_argument("--ref-scale", type=int, help="batch of the reference gradients / --batch; "
                                                 "default 1 (--suite: 8)")
    p.add_argument("--hidden", type=int, default=16, help="policy hidden width")
    p.add_argument("--rho", type=float, default=0.5, help="LR weight of mode mix")
    p.add_argument("--momentum", type=float, help="running-variance momentum of tpx")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: the tensors are tiny, threads only synchronise)")
    p.add_argument("--out", default="gradvar", help="writes OUT.csv and OUT.png (--suite: OUT.md "
                                                    "and OUT_ratio.png too)")
    p.add_argument("--cache", default="runs/gradvar_suite", help="--suite: the resumable parts")
    p.add_argument("--fresh", action="store_true", help="--suite: ignore cached parts")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    def pick(value, default, suite_default):
        return value if value is not None else (suite_default if a.suite else default)

    horizons = pick(a.horizons, [1, 5, 10, 20, 50, 100], list(SUITE_HORIZONS))
    batch, reps = pick(a.batch, 32, 128), pick(a.reps, 20, 64)
    warmup, ref_batches, ref_scale = pick(a.warmup, 0, 20), pick(a.ref_batches, 200, 16), pick(a.ref_scale, 1, 8)
    for name, value in (("batch", batch), ("reps", reps), ("ref-batches", ref_batches),
                        ("ref-scale", ref_scale), ("hidden", a.hidden), ("threads", a.threads)):
        if value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    if warmup < 0 or min(horizons) < 1:
        p.error(f"--warmup must be >= 0 and --horizons >= 1, got {warmup} and {horizons}")
    if a.checkpoint is not None:
        from ..dreamer import checkpoint

        if not checkpoint.exists(a.checkpoint):
            p.error(f"--checkpoint: {a.checkpoint} holds no Dreamer run (no "
                    f"{checkpoint.CHECKPOINT_FILE})")
        if a.suite or "tp" in (a.modes or []):
            p.error("--checkpoint takes no --suite and no tp (its per-sample parameter "
                    "gradients, B x P, do not fit a Dreamer actor)")
    with p.reporting(ValueError):  # rho and momentum, checked by the mode table
        for m in a.modes or BASIC:
            make_estimator(m, a.rho, a.momentum)
    torch.set_num_threads(a.threads)
    out_dir = os.path.dirname(a.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    if a.suite:
        rows, seconds = run_suite(a.systems, horizons, a.modes, batch, reps, warmup, ref_batches, ref_scale,
                         a.hidden, a.seed, a.device, a.cache, a.fresh, not a.no_progress)
        config = {"batch": batch, "reps": reps, "warm-up": warmup,
                  "reference": f"{ref_batches} x batch {ref_scale * batch}", "policy hidden": a.hidden,
                  "seed": a.seed}
        command = "python -m tpx_ext.gradvar " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(a.out + ".md", "w") as f:
            f.write(suite_markdown(rows, command, config, seconds) + "\n")
        write_csv(rows, a.out + ".csv")
        plot_suite(rows, a.out + ".png", a.out + "_ratio.png")
        print(f"wrote {a.out}.md, {a.out}.csv, {a.out}.png and {a.out}_ratio.png "
              f"({seconds / 60:.1f} min of compute)")
        return rows
    modes = a.modes or [m for m in BASIC if not (a.checkpoint and m == "tp")]
    with p.reporting(FileNotFoundError, ValueError):  # a run directory missing a file, or foreign
        rows = run(a.system, horizons, modes, batch, reps, ref_batches, a.hidden, a.rho,
                   a.momentum if a.momentum is not None else 0.0, a.seed, a.device,
                   not a.no_progress, a.checkpoint, warmup, ref_scale)
    print(format_table(rows))
    write_csv(rows, a.out + ".csv")
    plot(rows, a.out + ".png")
    print(f"wrote {a.out}.csv and {a.out}.png")
    return rows


if __name__ == "__main__":
    main()
