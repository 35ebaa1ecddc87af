"""How `python -m tpx_ext.gradvar` measures an estimator: batch gradients of one fixed policy
on common random numbers, a reference gradient, and the rows of variance, error, SNR, cos,
norm, time and non-finite share (their definitions: `tpx_ext.experiments.gradvar`); the
suite's resumable cache."""

import json
import math
import os
import time
from typing import Dict, List, Optional

import torch

from ..estimators import MODES, Estimator
from ..estimators.modes import NAMES, parse
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

    agent, replay, cfg, _ = load_run(run_dir, device)
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
