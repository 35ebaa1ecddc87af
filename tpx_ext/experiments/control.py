"""Policy optimisation through known noisy dynamics: the return each estimator learns.

    python -m tpx_ext.control --out docs/results/control --runs runs/control
    python -m tpx_ext.control --systems cartpole --horizons 25 50 --seeds 5 --iters 200

For every (system, horizon, estimator, seed) a policy (the system's `make_policy`; the
same initial parameters for every estimator of a seed) is trained by gradient ascent (Adam,
one learning rate for every estimator) on the expected return over `horizon` steps of a
differentiable simulator with process noise (`tpx_ext.experiments.systems`), one gradient
of batch `batch` per iteration. A gradient with an inf or NaN is not applied (and counted).

Every `eval_every` iterations the expected return per step (the mean reward, so horizons
compare) is estimated from `eval_batch` rollouts whose noise is the same for every run
(common random numbers), and for tpx and tp the training gradient's mean weight on LR of
each step's nodes is kept (TPX's weight on LR over the horizon).

Runs are resumable: each one writes RUNS/<run>/checkpoint.pt (policy, Adam, the noise
generator's state, metrics, compute time) and metrics.jsonl atomically every
`checkpoint_every` iterations; an interrupted run continues from its last checkpoint and
ends bit-identical to an uninterrupted one; a finished run is not rerun. `--workers` runs
that many runs at once (one thread each). Writes OUT.csv (every evaluation), OUT.md (final
returns: mean +- std over seeds, Welch's p against rp at the same horizon, compute) and
OUT.png (return against iteration, seed bands) and OUT_weights.png (tpx's weight on LR).
"""

import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..cli import Parser
from ..dreamer.atomic import atomic_write
from ..dreamer.checkpoint import safe_load
from .gradvar import ESTIMATORS, make_estimator
from .parallel import run_jobs
from .report import mean_std, plot_profiles, plot_seed_bands, welch_p
from .systems import SYSTEMS, policy_gradient

CONTROL_SYSTEMS = ("cartpole", "pendulum", "rotor")
# A short horizon where RP's gradient is usable and a long one where it explodes
# (docs/results/gradvar_suite_matrix.md; the cart-pole's in docs/RESULTS.md).
DEFAULT_HORIZONS = {"cartpole": (25, 50), "pendulum": (30, 100), "rotor": (10, 30)}
EVAL_SEED = 123_456_789
# `policy_gradient`'s node names, as the weight plots show them
NODE_LABELS = {"node0": "action", "latent": "next state"}


@dataclass(frozen=True)
class RunSpec:
    system: str
    horizon: int
    estimator: str
    seed: int
    iters: int
    batch: int
    lr: float
    hidden: int
    eval_every: int
    eval_batch: int
    checkpoint_every: int

    @property
    def name(self) -> str:
        return f"{self.system}-H{self.horizon}-{self.estimator}-s{self.seed}"


def expected_return(system, policy, horizon: int, batch: int, seed: int = EVAL_SEED) -> float:
    """Mean reward per step over `batch` rollouts of `horizon` steps, with noise fixed by
    `seed` (the global generator, which the simulators' own noise uses, is restored)."""
    like = next(policy.parameters())
    gen = torch.Generator(like.device).manual_seed(seed)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        s, total = system.initial(batch, like, gen), torch.zeros(batch, dtype=torch.float64)
        for _ in range(horizon):
            mu, sigma = policy(system.features(s))
            u = mu + sigma * torch.randn(mu.shape, generator=gen, dtype=mu.dtype).to(mu.device)
            s = system.step(s, torch.tanh(u) if system.squash else u)
            total += system.reward(s).double().cpu()
    return float(total.mean()) / horizon


def lr_weights(stats) -> Dict[str, List[float]]:
    """Node name -> the mean weight on LR of that name's node at each step (NaN: none)."""
    out: Dict[str, Dict[int, float]] = {}
    for st in stats:
        if st.k is not None:
            out.setdefault(st.name, {})[st.step] = float(torch.nanmean(st.k.double()))
    return {name: [by_step.get(t, math.nan) for t in range(max(by_step) + 1)]
            for name, by_step in out.items()}


def _new_state(spec: RunSpec):
    system = SYSTEMS[spec.system]()
    torch.manual_seed(spec.seed)  # the initial policy: the same for every estimator
    policy = system.make_policy(spec.hidden, torch.float32)
    opt = torch.optim.Adam(policy.parameters(), lr=spec.lr, maximize=True)
    gen = torch.Generator().manual_seed(1_000_003 * spec.seed + spec.horizon)
    return system, policy, opt, gen


def train_run(spec: RunSpec, run_dir: str, log_every: int = 0, stop_after: Optional[int] = None) -> Dict:
    """Train one run to `spec.iters` (from its checkpoint in run_dir, if any); returns the
    run's record (spec, metrics, seconds, nonfinite). `stop_after`: stop (checkpointed)
    after that many iterations of this call, as an interruption would."""
    os.makedirs(run_dir, exist_ok=True)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    system, policy, opt, gen = _new_state(spec)
    estimator = make_estimator(spec.estimator)
    record = {"spec": asdict(spec), "metrics": [], "seconds": 0.0, "nonfinite": 0, "iteration": 0}
    if os.path.exists(ckpt_path):
        ckpt = safe_load(ckpt_path)
        if ckpt["record"]["spec"] != asdict(spec):
            raise ValueError(f"{run_dir} holds a run with other settings "
                             f"({ckpt['record']['spec']}); use another --runs directory")
        policy.load_state_dict(ckpt["policy"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        estimator.running_stats = ckpt["running_stats"]
        record = ckpt["record"]

    def checkpoint():
        state = {"policy": policy.state_dict(), "optimizer": opt.state_dict(),
                 "generator": gen.get_state(), "running_stats": estimator.running_stats,
                 "record": record}
        atomic_write(ckpt_path, lambda f: torch.save(state, f))
        lines = "".join(json.dumps(m) + "\n" for m in record["metrics"])
        atomic_write(os.path.join(run_dir, "metrics.jsonl"), lambda f: f.write(lines.encode()))

    if record["iteration"] == 0 and not record["metrics"]:
        record["metrics"].append({"iteration": 0, "return": expected_return(
            system, policy, spec.horizon, spec.eval_batch)})
    done_here = 0
    while record["iteration"] < spec.iters:
        if stop_after is not None and done_here >= stop_after:
            break
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        stats = policy_gradient(estimator, policy, system, spec.horizon, spec.batch, gen)
        finite = all(bool(torch.isfinite(p.grad).all()) for p in policy.parameters())
        if finite:
            opt.step()
        else:
            record["nonfinite"] += 1
        record["iteration"] += 1
        done_here += 1
        it = record["iteration"]
        if it % spec.eval_every == 0 or it == spec.iters:
            m = {"iteration": it, "return": expected_return(system, policy, spec.horizon,
                                                            spec.eval_batch)}
            weights = lr_weights(stats)
            if weights:
                m["lr_weight"] = weights
            record["metrics"].append(m)
        record["seconds"] += time.perf_counter() - t0
        if it % spec.checkpoint_every == 0 or it == spec.iters:
            checkpoint()
        if log_every and (it % log_every == 0 or it == spec.iters):
            print(f"[{spec.name}] it {it}/{spec.iters} return/step "
                  f"{record['metrics'][-1]['return']:.4f} ({record['seconds'] / it:.2f} s/it)",
                  flush=True)
    if done_here and record["iteration"] % spec.checkpoint_every:
        checkpoint()
    return record


def _worker(job: Tuple[RunSpec, str, int]) -> Dict:
    spec, run_dir, log_every = job
    torch.set_num_threads(1)
    return train_run(spec, run_dir, log_every)


def run_all(specs: Sequence[RunSpec], runs: str, workers: int = 1, log_every: int = 50) -> List[Dict]:
    jobs = [(s, os.path.join(runs, s.name), log_every) for s in specs]
    print(f"{len(jobs)} runs in {runs} ({workers} at once)", flush=True)
    return run_jobs(_worker, jobs, workers, lambda rec: RunSpec(**rec["spec"]).name)


# ------------------------------------------------------------------------- reports
def rows(records: Sequence[Dict]) -> List[Dict]:
    out = []
    for rec in records:
        s = rec["spec"]
        for m in rec["metrics"]:
            out.append({"system": s["system"], "horizon": s["horizon"], "estimator": s["estimator"],
                        "seed": s["seed"], "iteration": m["iteration"], "return": m["return"]})
    return out


def write_csv(records: Sequence[Dict], path: str) -> None:
    data = rows(records)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(data[0]))
        w.writeheader()
        w.writerows(data)


def summary(records: Sequence[Dict]) -> List[Dict]:
    """One row per (system, horizon, estimator): final return over seeds, p against rp."""
    groups: Dict[Tuple, List[Dict]] = {}
    for rec in records:
        s = rec["spec"]
        groups.setdefault((s["system"], s["horizon"], s["estimator"]), []).append(rec)
    out = []
    for (system, horizon, est), recs in groups.items():
        finals = [r["metrics"][-1]["return"] for r in recs]
        rp = groups.get((system, horizon, "rp"), [])
        mean, std = mean_std(finals)
        out.append({
            "system": system, "horizon": horizon, "estimator": est, "seeds": len(recs),
            "initial": sum(r["metrics"][0]["return"] for r in recs) / len(recs),
            "final_mean": mean, "final_std": std,
            "p_vs_rp": welch_p(finals, [r["metrics"][-1]["return"] for r in rp]) if est != "rp" else math.nan,
            "nonfinite": sum(r["nonfinite"] for r in recs),
            "seconds_per_run": sum(r["seconds"] for r in recs) / len(recs),
        })
    return out


def markdown(records: Sequence[Dict], command: str) -> str:
    spec = records[0]["spec"]
    lines = ["# Policy optimisation through known noisy dynamics", "", "```bash", command, "```", "",
             f"Batch {spec['batch']}, {spec['iters']} iterations of Adam (lr {spec['lr']}, "
             f"maximising), policy hidden width {spec['hidden']}, evaluation: mean reward per "
             f"step over {spec['eval_batch']} rollouts with common noise. Final: the last "
             f"evaluation. p: Welch's t-test against rp at the same horizon (two-sided). "
             f"nonfinite: gradients with an inf or NaN (not applied), summed over seeds. "
             f"Compute: mean wall time per run, one thread.", "",
             "| system | H | estimator | seeds | initial | final (mean +- std) | p vs rp | nonfinite | s/run |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary(records):
        p = "" if math.isnan(r["p_vs_rp"]) else f"{r['p_vs_rp']:.2g}"
        lines.append(f"| {r['system']} | {r['horizon']} | {r['estimator']} | {r['seeds']} | "
                     f"{r['initial']:.3f} | {r['final_mean']:.3f} +- {r['final_std']:.3f} | {p} | "
                     f"{r['nonfinite']} | {r['seconds_per_run']:.0f} |")
    return "\n".join(lines)


def _cells(records):
    return sorted({(r["spec"]["system"], r["spec"]["horizon"]) for r in records},
                  key=lambda c: (CONTROL_SYSTEMS.index(c[0]) if c[0] in CONTROL_SYSTEMS else 99, c[1]))


def plot(records: Sequence[Dict], path: str, weights_path: str) -> None:
    """Return against iteration (seed bands) per (system, horizon); tpx's weight on LR over
    the horizon, per node name (mean over the evaluations of the last quarter and seeds)."""
    import numpy as np

    names = list(dict.fromkeys(r["spec"]["estimator"] for r in records))
    panels, profiles = [], []
    for system, horizon in _cells(records):
        curves = {}
        for est in names:
            recs = [r for r in records if (r["spec"]["system"], r["spec"]["horizon"],
                                           r["spec"]["estimator"]) == (system, horizon, est)]
            if recs:
                n = min(len(r["metrics"]) for r in recs)
                curves[est] = ([m["iteration"] for m in recs[0]["metrics"][:n]],
                               [[m["return"] for m in r["metrics"][:n]] for r in recs])
        panels.append((f"{system}, H = {horizon}", curves))
        late = [m["lr_weight"] for r in records if (r["spec"]["system"], r["spec"]["horizon"],
                                                    r["spec"]["estimator"]) == (system, horizon, "tpx")
                for m in r["metrics"] if "lr_weight" in m and m["iteration"] > 0.75 * r["spec"]["iters"]]
        nodes = sorted({n for w in late for n in w})
        if nodes:
            profiles.append((f"tpx, {system}, H = {horizon}", {
                NODE_LABELS.get(n, n): np.nanmean(np.array([w[n] for w in late if n in w], dtype=float), axis=0)
                for n in nodes}))
    ncols = max(len({c[1] for c in _cells(records) if c[0] == s}) for s in {c[0] for c in _cells(records)})
    plot_seed_bands(panels, path, "iteration", "return per step", ncols)
    if profiles:
        plot_profiles(profiles, weights_path, ncols=ncols)


def main(argv=None) -> List[Dict]:
    p = Parser(prog="python -m tpx_ext.control", description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", nargs="+", default=list(CONTROL_SYSTEMS), choices=list(SYSTEMS))
    p.add_argument("--horizons", type=int, nargs="+",
                   help="for every system; default: each system's short and long horizon "
                        + ", ".join(f"{s} {h[0]} {h[1]}" for s, h in DEFAULT_HORIZONS.items()))
    p.add_argument("--estimators", nargs="+", default=["rp", "lr", "tp", "tpx"], choices=list(ESTIMATORS))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate, every estimator")
    p.add_argument("--hidden", type=int, default=16, help="policy hidden width (0: linear)")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--workers", type=int, default=1, help="runs at once, one thread each")
    p.add_argument("--runs", default="runs/control", help="the resumable runs")
    p.add_argument("--out", default="control", help="writes OUT.csv, OUT.md, OUT.png, OUT_weights.png")
    p.add_argument("--log-every", type=int, default=50, help="progress line every N iterations (0: none)")
    a = p.parse_args(argv)
    for name in a.systems:
        if a.horizons is None and name not in DEFAULT_HORIZONS:
            p.error(f"system {name!r} has no default horizons; pass --horizons")
    for name, value in (("iters", a.iters), ("batch", a.batch), ("seeds", a.seeds),
                        ("eval-every", a.eval_every), ("eval-batch", a.eval_batch),
                        ("checkpoint-every", a.checkpoint_every), ("workers", a.workers)):
        if value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    if not a.lr > 0:
        p.error(f"--lr must be > 0, got {a.lr}")
    specs = [RunSpec(system, H, est, seed, a.iters, a.batch, a.lr, a.hidden, a.eval_every,
                     a.eval_batch, a.checkpoint_every)
             for system in a.systems for H in (a.horizons or DEFAULT_HORIZONS[system])
             for seed in range(a.seeds) for est in a.estimators]
    records = run_all(specs, a.runs, a.workers, a.log_every)
    out_dir = os.path.dirname(a.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    command = "python -m tpx_ext.control " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(a.out + ".md", "w") as f:
        f.write(markdown(records, command) + "\n")
    write_csv(records, a.out + ".csv")
    plot(records, a.out + ".png", a.out + "_weights.png")
    print(markdown(records, command))
    print(f"wrote {a.out}.md, {a.out}.csv, {a.out}.png and {a.out}_weights.png")
    return records


if __name__ == "__main__":
    main()
