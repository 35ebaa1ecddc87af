"""Gradient variance, error, SNR and cost of each estimator mode versus the horizon.

    python -m tpx_ext.gradvar [--system rotor|linear] [--horizons 1 5 10 20 50 100] ...

For every horizon and mode it takes `reps` independent batch gradients of one
fixed policy on a toy system (`tpx_ext.systems`) and reports:
- variance: trace of the covariance of the batch gradient (over the reps);
- error: root mean square of |g - g_ref| over the reps, where g_ref is the exact
  gradient (linear system) or the mean of `ref_batches` fresh batch gradients of
  whichever of rp / lr, both exactly unbiased, has the lower variance there
  (its standard error is printed, so errors below it are not resolved);
- snr: |g_ref| / sqrt(variance);
- ms/grad: median wall time of one gradient (rollout + backward);
- nonfinite: fraction of the reps whose gradient had an inf or NaN.
It prints a table and writes <out>.csv and <out>.png.
"""

import argparse
import csv
import math
import time
from typing import Dict, List, Sequence

import torch

from .estimators import MODES, Estimator
from .systems import ChaoticRotor, GaussianPolicy, LinearGaussian, policy_gradient

COLUMNS = ("system", "horizon", "mode", "batch", "reps", "variance", "error", "snr", "ms_per_grad",
           "nonfinite", "reference", "ref_stderr")


def flat_grad(policy) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in policy.parameters()]).double().cpu()


def batch_gradients(estimator, policy, system, horizon, batch, reps, gen, progress=None):
    """([reps, P] float64 gradients, [reps] seconds)."""
    grads, secs = [], []
    for _ in range(reps):
        policy.zero_grad()
        start = time.perf_counter()
        policy_gradient(estimator, policy, system, horizon, batch, gen)
        secs.append(time.perf_counter() - start)
        grads.append(flat_grad(policy))
        if progress is not None:
            progress.update(1)
    return torch.stack(grads), torch.tensor(secs)


def trace_variance(grads: torch.Tensor) -> float:
    return grads.var(0).sum().item() if bool(torch.isfinite(grads).all()) else math.inf


def make_estimator(mode: str, rho: float, momentum: float) -> Estimator:
    return Estimator(mode, rho=rho if mode == "mix" else None,
                     momentum=momentum if mode == "tpx" else 0.0)


def run(system_name="rotor", horizons=(1, 5, 10, 20, 50, 100), modes=MODES, batch=32, reps=20,
        ref_batches=200, hidden=16, rho=0.5, momentum=0.0, seed=0, device="cpu",
        progress=True) -> List[Dict]:
    """One row per (horizon, mode), with the COLUMNS."""
    if system_name == "linear":  # exact gradient known; the policy must be linear
        system, hidden, in_features = LinearGaussian(), 0, 1
    elif system_name == "rotor":
        system, in_features = ChaoticRotor(), 2
    else:
        raise ValueError(f"unknown system {system_name!r}; valid: rotor, linear")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; valid modes: {', '.join(MODES)}")
    torch.manual_seed(seed)
    dtype = torch.float64 if system_name == "linear" else torch.float32
    policy = GaussianPolicy(in_features, hidden, dtype=dtype).to(device)

    ref_count = 0 if system_name == "linear" else ref_batches
    candidates = [m for m in ("rp", "lr") if m not in modes] if ref_count else []
    total = len(horizons) * ((len(modes) + len(candidates)) * reps + ref_count)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="grad", desc=f"gradvar {system_name}")
    rows = []
    for H in horizons:
        gen = torch.Generator(device).manual_seed(seed * 1000 + H)
        measured = {m: batch_gradients(make_estimator(m, rho, momentum), policy, system, H, batch,
                                       reps, gen, bar)
                    for m in list(modes) + candidates}
        if system_name == "linear":
            exact = torch.autograd.grad(system.expected_return(policy, H), list(policy.parameters()))
            g_ref, ref_name, ref_stderr = torch.cat([g.reshape(-1) for g in exact]).cpu(), "exact", 0.0
        else:
            ref_name = min(("rp", "lr"), key=lambda m: trace_variance(measured[m][0]))
            ref_grads, _ = batch_gradients(make_estimator(ref_name, rho, momentum), policy, system,
                                           H, batch, ref_count, gen, bar)
            g_ref = ref_grads.mean(0)
            ref_stderr = math.sqrt(trace_variance(ref_grads) / ref_count)
        for m in modes:
            grads, secs = measured[m]
            var = trace_variance(grads)
            rows.append({
                "system": system_name, "horizon": H, "mode": m, "batch": batch, "reps": reps,
                "variance": var,
                "error": ((grads - g_ref) ** 2).sum(1).mean().sqrt().item(),
                "snr": g_ref.norm().item() / math.sqrt(var) if var > 0 else math.inf,
                "ms_per_grad": 1e3 * secs.median().item(),
                "nonfinite": (~torch.isfinite(grads).all(1)).double().mean().item(),
                "reference": ref_name, "ref_stderr": ref_stderr,
            })
    if bar is not None:
        bar.close()
    return rows


def format_table(rows: Sequence[Dict]) -> str:
    lines = [f"{'H':>4} {'mode':>4} {'variance':>10} {'error':>10} {'snr':>9} {'ms/grad':>8} "
             f"{'nonfinite':>9}  reference (stderr)"]
    for r in rows:
        lines.append(f"{r['horizon']:>4} {r['mode']:>4} {r['variance']:>10.3g} {r['error']:>10.3g} "
                     f"{r['snr']:>9.3g} {r['ms_per_grad']:>8.2f} {r['nonfinite']:>9.2f}  "
                     f"{r['reference']} ({r['ref_stderr']:.3g})")
    return "\n".join(lines)


def write_csv(rows: Sequence[Dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: Sequence[Dict], path: str) -> None:
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
    axes[0, 0].legend()
    fig.suptitle(f"{rows[0]['system']}: batch {rows[0]['batch']}, {rows[0]['reps']} gradients per point")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(prog="python -m tpx_ext.gradvar", description=__doc__.split("\n\n")[0])
    p.add_argument("--system", default="rotor", choices=("rotor", "linear"))
    p.add_argument("--horizons", type=int, nargs="+", default=[1, 5, 10, 20, 50, 100])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=20, help="batch gradients per (horizon, mode)")
    p.add_argument("--ref-batches", type=int, default=200, help="batch gradients in the reference")
    p.add_argument("--hidden", type=int, default=16, help="policy hidden width (rotor)")
    p.add_argument("--rho", type=float, default=0.5, help="LR weight of mode mix")
    p.add_argument("--momentum", type=float, default=0.0, help="running-variance momentum of tpx")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: the tensors are tiny, threads only synchronise)")
    p.add_argument("--out", default="gradvar", help="writes OUT.csv and OUT.png")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = run(a.system, a.horizons, a.modes, a.batch, a.reps, a.ref_batches, a.hidden, a.rho,
               a.momentum, a.seed, a.device, not a.no_progress)
    print(format_table(rows))
    write_csv(rows, a.out + ".csv")
    plot(rows, a.out + ".png")
    print(f"wrote {a.out}.csv and {a.out}.png")
    return rows


if __name__ == "__main__":
    main()
