"""Gradient variance, error, SNR and cost of each estimator mode versus the horizon.

    python -m tpx_ext.gradvar [--system rotor|linear] [--horizons 1 5 10 20 50 100] ...
    python -m tpx_ext.gradvar --checkpoint runs/default --horizons 15 50 100 200

For every horizon and mode it takes `reps` independent batch gradients of one
fixed policy on a toy system (`tpx_ext.systems`), or of a trained Dreamer agent's
actor in its learned world model (`--checkpoint`: `batch` start states, the
posterior states of one replay batch, fixed across the reps; the noise is the
imagination's), and reports:
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


def batch_gradients(grad_fn, policy, reps, progress=None):
    """([reps, P] float64 gradients of `policy`, [reps] seconds); grad_fn() accumulates one."""
    grads, secs = [], []
    for _ in range(reps):
        policy.zero_grad()
        start = time.perf_counter()
        grad_fn()
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


def toy_problem(system_name: str, hidden: int, device):
    """(policy, grad_fn(estimator, horizon, batch, gen)) of a toy system."""
    if system_name == "linear":  # exact gradient known; the policy must be linear
        system, hidden, in_features = LinearGaussian(), 0, 1
    elif system_name == "rotor":
        system, in_features = ChaoticRotor(), 2
    else:
        raise ValueError(f"unknown system {system_name!r}; valid: rotor, linear")
    dtype = torch.float64 if system_name == "linear" else torch.float32
    policy = GaussianPolicy(in_features, hidden, dtype=dtype).to(device)

    def grad_fn(estimator, horizon, batch, gen):
        policy_gradient(estimator, policy, system, horizon, batch, gen)

    def exact(horizon):
        g = torch.autograd.grad(system.expected_return(policy, horizon), list(policy.parameters()))
        return torch.cat([x.reshape(-1) for x in g]).cpu()

    return policy, grad_fn, exact if system_name == "linear" else None


def dreamer_problem(run_dir: str, batch: int, seed: int, device):
    """(actor, grad_fn, None) of a trained agent: the actor gradient imagined from `batch`
    fixed start states (posterior states of one replay batch)."""
    from .train import load_run

    agent, replay, cfg = load_run(run_dir, device)
    replay.reseed(seed)
    data = replay.sample(max(1, -(-batch // cfg.seq_len)), cfg.seq_len)
    data = {k: torch.as_tensor(data[k], device=device) for k in ("obs", "action", "reward")}
    with torch.no_grad():
        post = agent.world_model.loss(data)[1]
    start = post.map(lambda x: x.reshape(-1, x.shape[-1])[:batch])
    behavior = agent.behavior

    def grad_fn(estimator, horizon, batch_, gen):
        with torch.random.fork_rng(devices=[device] if str(device).startswith("cuda") else []):
            torch.manual_seed(int(torch.randint(0, 2**62, (), generator=gen, device=gen.device)))
            behavior.actor_gradient(agent.world_model, start, estimator, horizon)

    return behavior.actor, grad_fn, None


def run(system_name="rotor", horizons=(1, 5, 10, 20, 50, 100), modes=MODES, batch=32, reps=20,
        ref_batches=200, hidden=16, rho=0.5, momentum=0.0, seed=0, device="cpu",
        progress=True, checkpoint=None) -> List[Dict]:
    """One row per (horizon, mode), with the COLUMNS. `checkpoint`: a Dreamer run directory
    (then system_name is ignored)."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; valid modes: {', '.join(MODES)}")
    if checkpoint is not None and "tp" in modes:
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
    total = len(horizons) * ((len(modes) + len(candidates)) * reps + ref_count)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="grad", desc=f"gradvar {system_name}")
    rows = []
    for H in horizons:
        gen = torch.Generator(device).manual_seed(seed * 1000 + H)

        def measure(mode, count):
            est = make_estimator(mode, rho, momentum)
            return batch_gradients(lambda: grad_fn(est, H, batch, gen), policy, count, bar)

        measured = {m: measure(m, reps) for m in list(modes) + candidates}
        if exact is not None:
            g_ref, ref_name, ref_stderr = exact(H), "exact", 0.0
        else:
            ref_name = min(("rp", "lr"), key=lambda m: trace_variance(measured[m][0]))
            ref_grads, _ = measure(ref_name, ref_count)
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
    p.add_argument("--checkpoint", metavar="RUN_DIR",
                   help="a Dreamer run directory: study its actor in its world model instead")
    p.add_argument("--horizons", type=int, nargs="+", default=[1, 5, 10, 20, 50, 100])
    p.add_argument("--modes", nargs="+", choices=MODES,
                   help="default: all (without tp for --checkpoint)")
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
    modes = a.modes or [m for m in MODES if not (a.checkpoint and m == "tp")]
    rows = run(a.system, a.horizons, modes, a.batch, a.reps, a.ref_batches, a.hidden, a.rho,
               a.momentum, a.seed, a.device, not a.no_progress, a.checkpoint)
    print(format_table(rows))
    write_csv(rows, a.out + ".csv")
    plot(rows, a.out + ".png")
    print(f"wrote {a.out}.csv and {a.out}.png")
    return rows


if __name__ == "__main__":
    main()
