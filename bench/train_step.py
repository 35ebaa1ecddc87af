"""End-to-end cost of the actor gradient estimators in Dreamer, measured side by side.

    python bench/train_step.py                      # CPU default agent, horizons 15 50 100 200
    python bench/train_step.py --write              # also rewrite docs/BENCHMARKS.md's section
    python bench/train_step.py --configs dmc_proprio --device cuda

For every horizon, one agent per estimator (identical initial weights) takes the same
replay batch; "update" is one whole training update (world model, actor, critic) and
"actor" one actor-critic update alone from fixed start states. The estimators are timed in
alternation, one call each per round (rotating which goes first), so machine drift hits
them alike; the table shows medians and ratios to rp. On the CPU a call is timed with
perf_counter; on a GPU with CUDA events recorded around it after the queue has drained, so
the interval is the call's own from its first launch to its last kernel.
"""

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see bench/ops.py
import statistics
import time

import numpy as np
import torch

from common import machine_description, write_section
from tpx_ext.dreamer.configs import build
from tpx_ext.dreamer import Dreamer

# Name -> config overrides. "tpx" is the default rule (matrix weights: each node's joint
# LR-RP covariance, a C x C solve); "tpx coord" the paper's coordinate-wise weights.
VARIANTS = {"rp": {"estimator": "rp"}, "tpx": {"estimator": "tpx"},
            "tpx coord": {"estimator": "tpx-coord"},
            "lr": {"estimator": "lr"}, "mix": {"estimator": "mix", "estimator_args.rho": 0.5}}
ESTIMATORS = tuple(VARIANTS)


def make_batch(cfg, obs_dim, action_dim, seed=0):
    rng = np.random.default_rng(seed)
    B, T = cfg.batch_size, cfg.seq_len
    return {"obs": rng.standard_normal((B, T, obs_dim)).astype(np.float32),
            "action": rng.uniform(-1, 1, (B, T, action_dim)).astype(np.float32),
            "reward": rng.random((B, T)).astype(np.float32)}


def timed(fn, device):
    """Seconds of one call of fn."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # earlier work must not land inside the interval
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) * 1e-3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_horizon(presets, horizon, device, rounds, obs_dim, action_dim):
    agents, starts = {}, {}
    batch = None
    for est in ESTIMATORS:
        cfg = build(presets, {**VARIANTS[est], "horizon": horizon})
        torch.manual_seed(0)
        agents[est] = Dreamer((obs_dim,), action_dim, cfg, device)
        batch = batch or make_batch(cfg, obs_dim, action_dim)
        data = {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
        with torch.no_grad():
            starts[est] = agents[est].world_model.loss(data)[1]
    calls = {
        "update": {e: (lambda e=e: agents[e].update(batch)) for e in ESTIMATORS},
        "actor": {e: (lambda e=e: agents[e].behavior.update(agents[e].world_model, starts[e]))
                  for e in ESTIMATORS},
    }
    times = {(kind, e): [] for kind in calls for e in ESTIMATORS}
    for kind, fns in calls.items():
        for fn in fns.values():  # warm-up
            fn()
        for r in range(rounds):
            order = ESTIMATORS[r % len(ESTIMATORS):] + ESTIMATORS[:r % len(ESTIMATORS)]
            for e in order:
                times[(kind, e)].append(timed(fns[e], device))
    return {key: statistics.median(v) for key, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=[], help="config presets (default: the CPU default)")
    p.add_argument("--horizons", type=int, nargs="+", default=[15, 50, 100, 200])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--obs_dim", type=int, default=5, help="state size (cartpole: 5)")
    p.add_argument("--action_dim", type=int, default=1, help="action size (cartpole: 1)")
    p.add_argument("--write", action="store_true",
                   help="rewrite docs/BENCHMARKS.md's section (the CUDA one for --device cuda)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device}: CUDA is not available to torch {torch.__version__}")
    if a.rounds < 1:
        p.error(f"--rounds must be >= 1, got {a.rounds}")
    cfg = build(a.configs, {})
    header = (f"Machine: {machine_description(device)}\n"
              f"Agent: presets {a.configs or ['(CPU default)']}, {cfg.batch_size}x{cfg.seq_len} = "
              f"{cfg.batch_size * cfg.seq_len} start states, deter {cfg.deter}, stoch {cfg.stoch}, "
              f"hidden {cfg.hidden}, obs {a.obs_dim}, actions {a.action_dim}; {a.rounds} rounds, median"
              f"{', CUDA events' if device.type == 'cuda' else ''}\n")
    lines = ["| H | what | " + " | ".join(ESTIMATORS) + " | " + " | ".join(f"{e} / rp" for e in ESTIMATORS[1:]) + " |",
             "|---:|---|" + "---:|" * (2 * len(ESTIMATORS) - 1)]
    print(header)
    print(lines[0], flush=True)
    for H in a.horizons:
        t = time_horizon(a.configs, H, device, a.rounds, a.obs_dim, a.action_dim)
        for kind in ("update", "actor"):
            ms = [t[(kind, e)] * 1e3 for e in ESTIMATORS]
            line = (f"| {H} | {kind} | " + " | ".join(f"{m:.1f} ms" for m in ms) + " | "
                    + " | ".join(f"{m / ms[0]:.2f}x" for m in ms[1:]) + " |")
            lines.append(line)
            print(line, flush=True)
    if a.write:
        path = write_section("bench/train_step.py", argv, header + "\n" + "\n".join(lines), device)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
