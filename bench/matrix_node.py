"""Cost of one tpx node's backward with matrix weights (the default) against the
coordinate-wise fused op, and where the matrix path spends it.

    python bench/matrix_node.py            # print the table
    python bench/matrix_node.py --write    # also rewrite its section of docs/BENCHMARKS.md

Per size (B samples, D action or latent dimensions, C = 2D coordinates): the whole
`Node.combine` with `weights="matrix"` and with `weights="coordinate"` (both ucb = 2), and
the matrix path's parts: the fused co-moments op (`gaussian_tpx_comoments`, the joint
2C x 2C covariance), the C x C solve in float64 PyTorch (`matrix_weight`), and the per-sample
gradients and their combination (`per_sample_gradients`, `apply_matrix_weight`). Median of
`--rounds` rounds in which every variant is timed in alternation, one thread by default.
"""

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see bench/ops.py
import statistics
import time

import torch

import tpx_ext
from common import machine_description, write_section
from tpx_ext.estimators.node import Node, NodeStats, per_sample_gradients
from tpx_ext.estimators.weights import WeightRule, apply_matrix_weight, matrix_weight

# (B, D): the CPU default's action node, DreamerV1's 6-D action over 2500 start states, and
# its 30-D latent node (latent_nodes), and a larger batch.
SIZES = [(512, 1), (2500, 6), (2500, 30), (20000, 6)]


def node_inputs(B, D, device):
    gen = torch.Generator().manual_seed(0)
    d, eps = torch.randn(B, D, generator=gen), torch.randn(B, D, generator=gen)
    sigma, adv = torch.rand(B, D, generator=gen) + 0.5, torch.randn(B, generator=gen)
    return [t.to(device) for t in (d, eps, sigma, adv)]


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns, device, rounds, budget):
    for fn in fns.values():
        fn()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            reps, t0 = 0, time.perf_counter()
            while True:
                fn()
                sync(device)
                reps += 1
                if time.perf_counter() - t0 > budget / rounds / len(fns):
                    break
            samples[name].append((time.perf_counter() - t0) / reps)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timing per size")
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    head = ("| B | D | C | matrix node | coordinate node | matrix / coordinate | co-moments op "
            "| solve | per-sample + combine |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    print(f"Machine: {machine_description(args.device)}\n\n{head}")
    for B, D in SIZES:
        d, eps, sigma, adv = node_inputs(B, D, args.device)
        nodes = {w: Node(NodeStats("n", 0), None, None, WeightRule(weights=w), True, None, adv=adv)
                 for w in ("matrix", "coordinate")}
        r = tpx_ext.gaussian_tpx_comoments(d, eps, sigma, adv, 2)
        KL = matrix_weight(r.cov, r.bound, r.finite)
        t = timed({
            "matrix": lambda: nodes["matrix"].combine(d, eps, sigma),
            "coordinate": lambda: nodes["coordinate"].combine(d, eps, sigma),
            "comoments": lambda: tpx_ext.gaussian_tpx_comoments(d, eps, sigma, adv, 2),
            "solve": lambda: matrix_weight(r.cov, r.bound, r.finite),
            "combine": lambda: apply_matrix_weight(*per_sample_gradients(d, eps, sigma, adv, 2), KL, True),
        }, args.device, args.rounds, args.budget)
        line = (f"| {B} | {D} | {2 * D} | {t['matrix'] * 1e3:.3f} ms | {t['coordinate'] * 1e3:.3f} ms "
                f"| {t['matrix'] / t['coordinate']:.1f}x | {t['comoments'] * 1e3:.3f} ms "
                f"| {t['solve'] * 1e3:.3f} ms | {t['combine'] * 1e3:.3f} ms |")
        lines.append(line)
        print(line, flush=True)
    if args.write:
        body = f"Machine: {machine_description(args.device)}\n\n" + "\n".join(lines)
        print(f"wrote {write_section('bench/matrix_node.py', argv, body, args.device)}")


if __name__ == "__main__":
    main()
