"""Environment steps per second with --envs N: the trainer's EnvPool on state and pixel tasks.

    python bench/envs.py                   # walker_walk, state and pixels, N = 1 2 4
    python bench/envs.py --write           # also rewrite docs/BENCHMARKS.md's section

Each cell steps N environments with random actions (action repeat 2) for --steps agent
steps per environment after a warm-up episode start, and reports physics steps per second
summed over the environments (what the trainer's env_steps count) and the speed-up over
N = 1. The pool sizes are timed in alternation over --rounds rounds, medians reported. The
policy's forward pass is not included: this is the environment side of the trainer's loop.
"""

import argparse
import statistics
import time

import numpy as np

from tpx_ext.dreamer.env_pool import EnvPool
from tpx_ext.dreamer.envs import rendering_error

REPEAT = 2


def steps_per_second(pool: EnvPool, steps: int, rng) -> float:
    pool.reset()
    t0 = time.perf_counter()
    for _ in range(steps):
        pool.step(rng.uniform(-1, 1, (pool.n, pool.action_dim)))
    return pool.n * steps * REPEAT / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="walker_walk")
    p.add_argument("--envs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--obs", nargs="+", default=["state", "pixels"], choices=["state", "pixels"])
    p.add_argument("--steps", type=int, default=200, help="agent steps per environment per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--write", action="store_true", help="rewrite docs/BENCHMARKS.md's section")
    a = p.parse_args(argv)
    if min(a.envs) < 1 or a.steps < 1 or a.rounds < 1:
        p.error("--envs, --steps and --rounds must be >= 1")
    if "pixels" in a.obs and (why := rendering_error()) is not None:
        p.error(f"pixels need rendering: {why} (pass --obs state)")
    from common import machine_description, write_section

    rng = np.random.default_rng(0)
    rows = []
    for obs in a.obs:
        pools = {n: EnvPool(n, a.task, obs, REPEAT, seed=0, episode_length=2 * REPEAT * a.steps)
                 for n in a.envs}
        try:
            times = {n: [] for n in a.envs}
            for r in range(a.rounds):
                order = a.envs[r % len(a.envs):] + a.envs[:r % len(a.envs)]
                for n in order:
                    times[n].append(steps_per_second(pools[n], a.steps, rng))
                    print(f"{obs} envs {n} round {r + 1}: {times[n][-1]:.0f} env steps/s", flush=True)
        finally:
            for pool in pools.values():
                pool.close()
        base = statistics.median(times[min(a.envs)])
        for n in a.envs:
            med = statistics.median(times[n])
            rows.append(f"| {a.task} | {obs} | {n} | {med:.0f} | {med / base:.2f}x |")
    table = ("| task | obs | envs | env steps / s | vs fewest envs |\n|---|---|---|---|---|\n"
             + "\n".join(rows))
    print(table)
    if a.write:
        body = (f"Machine: {machine_description('cpu')}.\n\n{table}\n\nPhysics steps per second "
                f"summed over the environments (action repeat {REPEAT}, random actions, "
                f"{a.steps} agent steps per environment per round, median of {a.rounds} rounds).")
        print("wrote", write_section("bench/envs.py", argv, body))


if __name__ == "__main__":
    main()
