"""What the CPU op's optional paths cost or save: the output cache and the ucb pass.

    python bench/cpu_paths.py              # print the table
    python bench/cpu_paths.py --write      # also rewrite its section of docs/BENCHMARKS.md

gaussian_tpx_backward on the CPU, float32 and bfloat16 inputs, at node sizes from
Dreamer's (3000 x 20) to large batches:
- output cache: the op with its output cache (default, TPX_CPU_CACHE_MB=256) against
  without (TPX_CPU_CACHE_MB=0). The setting is read once per process, so each is timed
  in child processes, started afresh every round in alternating order: the process-to-
  process spread (fresh heaps, page placement) then averages out over the rounds instead
  of favouring one side.
- ucb: ucb = 2 (three passes over the batch) against ucb = 0 (two), timed in alternation
  within each child.
Per cell: the median over rounds of each child's median time.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see bench/ops.py

import torch

SIZES = ((3000, 20), (20000, 50), (100000, 12), (100000, 50), (1000000, 6))
DTYPES = ("float32", "bfloat16")
CONFIGS = {"cache": {}, "no cache": {"TPX_CPU_CACHE_MB": "0"}}


def child(reps_elements: float) -> dict:
    """{"dtype BxD ucbU": median ms} for every size, dtype and ucb, in this process."""
    import tpx_ext

    out = {}
    gen = torch.Generator().manual_seed(0)
    for name in DTYPES:
        dtype = getattr(torch, name)
        for B, D in SIZES:
            d, eps = (torch.randn(B, D, generator=gen).to(dtype) for _ in range(2))
            sigma = (torch.rand(B, D, generator=gen) + 0.3).to(dtype)
            adv = torch.randn(B, generator=gen)
            calls = {u: (lambda u=u: tpx_ext.gaussian_tpx_backward(d, eps, sigma, adv, ucb=u))
                     for u in (0.0, 2.0)}
            for fn in calls.values():  # warm-up
                fn(), fn()
            times = {u: [] for u in calls}
            for _ in range(max(5, int(reps_elements / (B * D)))):
                for u, fn in calls.items():
                    t0 = time.perf_counter()
                    fn()
                    times[u].append(time.perf_counter() - t0)
            for u, t in times.items():
                out[f"{name} {B}x{D} ucb{u:g}"] = 1e3 * statistics.median(t)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--elements", type=float, default=2e7,
                   help="elements timed per cell and child (repeats = this / (B x D), >= 5)")
    p.add_argument("--write", action="store_true", help="rewrite docs/BENCHMARKS.md's section")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.elements)))
        return
    if a.rounds < 1:
        p.error(f"--rounds must be >= 1, got {a.rounds}")
    from common import machine_description, write_section

    results = {name: {} for name in CONFIGS}
    names = list(CONFIGS)
    for r in range(a.rounds):
        for name in names[r % 2:] + names[:r % 2]:
            env = dict(os.environ, **CONFIGS[name])
            cmd = [sys.executable, __file__, "--child", "--elements", str(a.elements)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            for key, ms in json.loads(out.stdout).items():
                results[name].setdefault(key, []).append(ms)
        print(f"round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
    med = {n: {k: statistics.median(v) for k, v in res.items()} for n, res in results.items()}
    lines = ["| dtype | B x D | cache | no cache | no cache / cache | ucb 0 | ucb 2 | ucb 2 / ucb 0 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in DTYPES:
        for B, D in SIZES:
            c, n = (med[cfg][f"{name} {B}x{D} ucb0"] for cfg in ("cache", "no cache"))
            u2 = med["cache"][f"{name} {B}x{D} ucb2"]
            lines.append(f"| {name} | {B} x {D} | {c:.3f} ms | {n:.3f} ms | {n / c:.2f}x | "
                         f"{c:.3f} ms | {u2:.3f} ms | {u2 / c:.2f}x |")
    header = (f"Machine: {machine_description('cpu')}\n"
              f"{a.rounds} rounds of fresh child processes per setting, median of medians\n")
    print(header)
    print("\n".join(lines))
    if a.write:
        print(f"wrote {write_section('bench/cpu_paths.py', argv, header + chr(10) + chr(10).join(lines))}")


if __name__ == "__main__":
    main()
