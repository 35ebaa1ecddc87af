"""End-to-end cost of the actor gradient estimators in Dreamer, measured side by side.

    python bench/train_step.py                      # CPU default agent, horizons 15 50 100 200
    python bench/train_step.py --write              # also rewrite docs/BENCHMARKS.md's section
    python bench/train_step.py --configs dmc_proprio --device cuda
    python bench/train_step.py --versus 1cf6c71 --write   # this tree's update vs an older commit's
    python bench/train_step.py --tricks --write   # dmc_vision updates with and without a trick

For every horizon, one agent per estimator (identical initial weights) takes the same
replay batch; "update" is one whole training update (world model, actor, critic) and
"actor" one actor-critic update alone from fixed start states. The estimators are timed in
alternation, one call each per round (rotating which goes first), so machine drift hits
them alike; the table shows medians and ratios to rp. On the CPU a call is timed with
perf_counter; on a GPU with CUDA events recorded around it after the queue has drained, so
the interval is the call's own from its first launch to its last kernel.

`--versus REV` instead times one whole update of this tree against the same update of
commit REV (extracted with `git archive` into a temporary directory, sharing this tree's
compiled op), each in its own one-thread process holding its agent, called in alternation;
at the `dmc_vision` sizes (50 x 50 pixel batch) and the CPU default, each with its own
default config. It also counts FLOPs per update (FlopCounterMode) and times this tree
without its channels_last convolutions and with the decoder's first layer computed by
torch's ConvTranspose2d instead of as a matrix product, to show what each is worth,
and once more in another process as a control: the spread between the two copies of the
same code is the resolution of the table.

`--tricks` times whole `dmc_vision` updates of agents that differ in one trick each (the
decoder's first layer run by torch's ConvTranspose2d, the RSSM step under torch.compile)
against this tree and a second agent of it, all in one one-thread process in alternation.
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


def make_batch(cfg, obs_shape, action_dim, seed=0):
    """A random replay batch [B, T, ...]: uint8 pixels for a 3-d obs_shape, else states."""
    rng = np.random.default_rng(seed)
    B, T = cfg.batch_size, cfg.seq_len
    obs = (rng.integers(0, 256, (B, T, *obs_shape), dtype=np.uint8) if len(obs_shape) == 3
           else rng.standard_normal((B, T, *obs_shape)).astype(np.float32))
    return {"obs": obs, "action": rng.uniform(-1, 1, (B, T, action_dim)).astype(np.float32),
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
        batch = batch or make_batch(cfg, (obs_dim,), action_dim)
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


# ------------------------------------------------------------------ --versus REV
# The child: builds one agent from the tree on its sys.path, then answers "time" (seconds of
# one update) and "flops" lines on stdin. Written against the API both trees share.
CHILD = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from tpx_ext.dreamer.configs import build
from tpx_ext.dreamer import Dreamer
presets, tricks = json.loads(sys.argv[1]), json.loads(sys.argv[2])
cfg = build(presets, {})
pixels = cfg.obs == "pixels"
obs_shape, A = ((3, 64, 64) if pixels else (5,)), (6 if pixels else 1)
torch.manual_seed(0)
agent = Dreamer(obs_shape, A, cfg, "cpu")
if "channels_first" in tricks:
    agent.world_model.to(memory_format=torch.contiguous_format)
if "transposed_first_layer" in tricks:  # the same layer and parameters, run by torch's own class
    agent.world_model.decoder.net[0].__class__ = torch.nn.ConvTranspose2d
rng = np.random.default_rng(0)
B, T = cfg.batch_size, cfg.seq_len
batch = {"obs": (rng.integers(0, 256, (B, T, *obs_shape), dtype=np.uint8) if pixels
                 else rng.standard_normal((B, T, *obs_shape)).astype(np.float32)),
         "action": rng.uniform(-1, 1, (B, T, A)).astype(np.float32),
         "reward": rng.random((B, T)).astype(np.float32),
         "discount": np.ones((B, T), np.float32), "is_first": np.zeros((B, T), bool)}
agent.update(batch)  # warm-up
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "flops":
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc:
            agent.update(batch)
        print(fc.get_total_flops(), flush=True)
    else:
        t0 = time.perf_counter()
        agent.update(batch)
        print(time.perf_counter() - t0, flush=True)
"""


class Child:
    def __init__(self, root, presets, tricks=()):
        import json
        import subprocess
        import sys

        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(presets),
                                      json.dumps(list(tricks))], cwd=str(root), env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the update child in {root} failed (see its stderr above)")

    def ask(self, what: str) -> float:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def versus(rev: str, rounds: int, setups) -> str:
    import shutil
    import subprocess
    import tempfile

    from common import ROOT

    old_root = tempfile.mkdtemp(prefix="tpx_versus_")
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", old_root], input=archive, check=True)
        for so in (ROOT / "tpx_ext").glob("_C*.so"):
            shutil.copy(so, os.path.join(old_root, "tpx_ext"))
        rows = []
        for label, presets in setups:
            arms = {f"{rev}": (old_root, ()), "this tree": (ROOT, ()),
                    "this tree, NCHW convolutions": (ROOT, ("channels_first",)),
                    "this tree, decoder's first layer a ConvTranspose2d": (
                        ROOT, ("transposed_first_layer",)),
                    # the same code in a fourth process: what placement alone moves a median
                    "this tree (control)": (ROOT, ())}
            if presets == []:  # no convolutions in the state-based CPU default
                del arms["this tree, NCHW convolutions"]
                del arms["this tree, decoder's first layer a ConvTranspose2d"]
            children = {name: Child(root, presets, tricks) for name, (root, tricks) in arms.items()}
            try:
                flops = {name: c.ask("flops") for name, c in children.items()}
                times = {name: [] for name in children}
                names = list(children)
                for r in range(rounds):
                    for name in names[r % len(names):] + names[:r % len(names)]:
                        times[name].append(children[name].ask("time"))
                    print(f"{label} round {r + 1}: " + ", ".join(
                        f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
            finally:
                for c in children.values():
                    c.close()
            base = statistics.median(times[rev])
            for name in names:
                med = statistics.median(times[name])
                rows.append(f"| {label} | {name} | {flops[name] / 1e9:.0f} | {med:.3f} s | "
                            f"{base / med:.2f}x |")
        return ("| setup | code | GFLOP / update | time / update | speed-up vs "
                f"{rev} |\n|---|---|---:|---:|---:|\n" + "\n".join(rows))
    finally:
        shutil.rmtree(old_root, ignore_errors=True)


# ------------------------------------------------------------------ --tricks
def tricks(rounds: int) -> str:
    """Whole `dmc_vision` updates of agents that differ in one trick each, in one process,
    one thread, in alternation (rotating which goes first). One process shares its
    allocator's state and placement, so this resolves smaller changes than --versus."""
    torch.set_num_threads(1)
    cfg = build(["dmc_vision"], {})
    obs_shape, A = (3, 64, 64), 6

    def agent(trick):
        torch.manual_seed(0)
        a = Dreamer(obs_shape, A, cfg, "cpu")
        if trick == "transposed_first_layer":  # the same layer and parameters, torch's own class
            a.world_model.decoder.net[0].__class__ = torch.nn.ConvTranspose2d
        if trick == "compiled_rssm_step":  # the step every imagined and filtered state takes
            rssm = a.world_model.rssm
            rssm.deter_step, rssm.prior = torch.compile(rssm.deter_step), torch.compile(rssm.prior)
        return a

    arms = {"this tree": agent(None),
            "decoder's first layer a ConvTranspose2d": agent("transposed_first_layer"),
            "RSSM step (deter_step, prior) torch.compile'd": agent("compiled_rssm_step"),
            "this tree (control: another agent)": agent(None)}
    batch = make_batch(cfg, obs_shape, A)
    for a in arms.values():  # twice: torch.compile compiles its backward at the first
        a.update(batch)
        a.update(batch)
    times = {name: [] for name in arms}
    names = list(arms)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            arms[name].update(batch)
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
    base = statistics.median(times["this tree"])
    rows = [f"| {name} | {statistics.median(t):.2f} s | {min(t):.2f} s | "
            f"{statistics.median(t) / base:.2f}x |" for name, t in times.items()]
    return ("| agent | time / update (median) | fastest | time vs this tree |\n"
            "|---|---:|---:|---:|\n" + "\n".join(rows))


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
    p.add_argument("--versus", metavar="REV",
                   help="time this tree's whole update against commit REV's (dmc_vision sizes "
                        "and the CPU default, one thread each)")
    p.add_argument("--tricks", action="store_true",
                   help="time whole dmc_vision updates with and without single tricks, in one "
                        "process (one thread)")
    a = p.parse_args(argv)
    if a.tricks or a.versus:  # CPU tables of their own
        if a.tricks:
            table, how = tricks(a.rounds), f"{a.rounds} rounds in alternation in one process"
        else:
            table = versus(a.versus, a.rounds, [("dmc_vision", ["dmc_vision"]), ("CPU default", [])])
            how = f"one thread per process, {a.rounds} rounds in alternation, median"
        print(table)
        if a.write:
            body = f"Machine: {machine_description('cpu')}; {how}.\n\n{table}"
            print("wrote", write_section("bench/train_step.py", argv, body,
                                         key="bench/train_step.py " + ("--tricks" if a.tricks else "--versus")))
        return
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
