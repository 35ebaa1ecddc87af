"""Kernel microbenchmarks: the fused ops against the same math composed of eager PyTorch ops.

    python bench/ops.py                  # print the table
    python bench/ops.py --write          # also rewrite the results section of docs/BENCHMARKS.md
    python bench/ops.py --device cuda    # on the GPU (--write: the CUDA section)

Ops: ivw_combine and gaussian_tpx_backward (the coordinate-wise rule's backward), and
gaussian_tpx_comoments (the matrix rule's statistics, the default tpx's fused part; its
C x C solve is float64 PyTorch, timed with the whole node by bench/matrix_node.py).

Variants of every row: "fused" (the tpx_ext op with plain batch variances, ucb = 0, the
math the eager composition does; bench/cpu_paths.py times the ucb pass), "eager" (the same
math composed of eager PyTorch ops in the input dtype, where the co-moments op accumulates
in float64), "compiled" (that eager composition under
torch.compile, default inductor backend, compiled for each shape before timing) and
"reference f64" (tpx_ext.reference).

For every row: median time over many repeats after warm-up (CUDA: CUDA events),
the bytes the op must move (each input read once, each output written once),
the achieved bandwidth and the time relative to this machine's copy-bandwidth
floor (bytes / copy bandwidth, the copy bandwidth measured in the same run).
All variants of a row are timed in alternation, so drift hits them alike.
"""

import argparse
import os

# numpy's OpenBLAS server threads spin on this 2-core machine and steal the
# cores that torch's and the fused op's OpenMP threads wait for; no BLAS is timed here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import statistics
import time

import torch

import tpx_ext
from common import machine_description, write_section
from tpx_ext import reference



# --- the eager compositions (same dtype as the inputs) ------------------------

def eager_ivw(g_lr, g_rp):
    v_lr, v_rp = g_lr.var(0), g_rp.var(0)
    k = v_rp / (v_lr + v_rp)
    return k * g_lr + (1 - k) * g_rp, k


def eager_gaussian(d, eps, sigma, adv):
    a = adv[:, None]
    lr_mu, lr_sigma, rp_sigma = a * eps / sigma, a * (eps * eps - 1) / sigma, d * eps
    g_mu, k_mu = eager_ivw(lr_mu, d)
    g_sigma, k_sigma = eager_ivw(lr_sigma, rp_sigma)
    return g_mu, g_sigma, torch.cat([k_mu, k_sigma])


def eager_comoments(d, eps, sigma, adv):
    """The co-moments op's math with ucb = 0: the per-sample LR and RP gradients of mu and
    sigma formed as [B, 4D], then their covariance (bound = its diagonal)."""
    a = adv[:, None]
    z = torch.cat([a * eps / sigma, a * (eps * eps - 1) / sigma, d, d * eps], dim=1)
    zc = z - z.mean(0)
    cov = zc.T @ zc / (z.shape[0] - 1)
    return cov, cov.diagonal(), torch.isfinite(cov.diagonal())


def compiled(fn):
    """fn under torch.compile with static shapes: each new shape (and dtype) compiles its
    own graph on first call, which the warm-up of time_alternating triggers before timing."""
    import torch._dynamo

    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 256))
    return torch.compile(fn, dynamic=False)


compiled_ivw = compiled(eager_ivw)
compiled_gaussian = compiled(eager_gaussian)
compiled_comoments = compiled(eager_comoments)


# --- timing -------------------------------------------------------------------

def _timer(device):
    if device == "cuda":
        def run(fn, reps):
            start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            stop = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for a, b in zip(start, stop):
                a.record()
                fn()
                b.record()
            torch.cuda.synchronize()
            return [a.elapsed_time(b) * 1e-3 for a, b in zip(start, stop)]
    else:
        def run(fn, reps):
            out = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            return out
    return run


def time_alternating(fns, device, budget_s=1.0, rounds=5):
    """Median seconds per call of each fn, timed in `rounds` rounds that alternate between them.

    Each variant gets about the same time per round (budget_s / rounds / len(fns)), so a
    slow variant (the float64 reference at 1e7 elements) runs once per round while a fast
    one repeats many times; every variant still has samples from every round.
    """
    run = _timer(device)
    probe = {}
    for name, fn in fns.items():
        fn()  # first call: torch.compile compiles here
        probe[name] = statistics.median(run(fn, 2))
    share = budget_s / rounds / len(fns)
    reps = {name: max(1, int(share / max(t, 1e-7))) for name, t in probe.items()}
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += run(fn, reps[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def copy_bandwidth(device, nbytes=256 << 20, budget_s=2.0):
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_alternating({"copy": lambda: dst.copy_(src)}, device, budget_s=budget_s)["copy"]
    return 2 * nbytes / t


# --- the table ----------------------------------------------------------------

SIZES = [(800, 1), (800, 12), (2500, 1), (2500, 12), (2500, 60), (100_000, 100), (1_000_000, 12)]
OPS = ("ivw_combine", "gaussian_tpx_backward", "gaussian_tpx_comoments")
VARIANTS = ("fused", "eager", "compiled", "reference f64")
# not timed unless asked for: the eager composition on float64 copies of the inputs, the
# precision the co-moments op accumulates in (--variants fused,eager,eager-f64)
EXTRA_VARIANTS = ("eager-f64",)


def rows(device, dtypes, sizes, ops, f64=False):
    """One dict per table row: the op's inputs bound into one callable per variant (with
    `f64`, also "eager-f64" on float64 copies of the inputs, made here, outside the timing)."""
    def double(tensors):
        return tuple(t.double() for t in tensors) if f64 else None

    for dtype in dtypes:
        for B, C in sizes:
            gen = torch.Generator().manual_seed(0)
            g_lr = torch.randn(B, C, generator=gen).to(dtype).to(device)
            g_rp = torch.randn(B, C, generator=gen).to(dtype).to(device)
            item = g_lr.element_size()
            pair = (g_lr, g_rp)
            ivw = dict(op="ivw_combine", B=B, C=C, dtype=dtype, bytes=3 * B * C * item + 24 * C,
                       fns={"fused": lambda a=pair: tpx_ext.ivw_combine(*a, ucb=0.0),
                            "eager": lambda a=pair: eager_ivw(*a),
                            "eager-f64": lambda a=double(pair): eager_ivw(*a),
                            "compiled": lambda a=pair: compiled_ivw(*a),
                            "reference f64": lambda a=pair: reference.ivw_combine(*a, ucb=0.0)})
            D = max(1, C // 2)  # a Gaussian node over D dims has C = 2D coordinates
            d, eps = (torch.randn(B, D, generator=gen).to(dtype).to(device) for _ in range(2))
            sigma = (torch.rand(B, D, generator=gen) + 0.1).to(dtype).to(device)
            adv = torch.randn(B, generator=gen).to(device)
            node = (d, eps, sigma, adv)
            gauss = dict(op="gaussian_tpx_backward", B=B, C=2 * D, dtype=dtype,
                         bytes=5 * B * D * item + 4 * B + 48 * D,
                         fns={"fused": lambda a=node: tpx_ext.gaussian_tpx_backward(*a, ucb=0.0),
                              "eager": lambda a=node: eager_gaussian(*a),
                              "eager-f64": lambda a=double(node): eager_gaussian(*a),
                              "compiled": lambda a=node: compiled_gaussian(*a),
                              "reference f64": lambda a=node: reference.gaussian_tpx_backward(*a, ucb=0.0)})
            K = 4 * D  # the co-moments' columns: [g_LR, g_RP] over mu and sigma
            comoments = dict(op="gaussian_tpx_comoments", B=B, C=2 * D, dtype=dtype,
                             bytes=3 * B * D * item + 4 * B + 8 * K * K + 9 * K,
                             fns={"fused": lambda a=node: tpx_ext.gaussian_tpx_comoments(*a, ucb=0.0),
                                  "eager": lambda a=node: eager_comoments(*a),
                                  "eager-f64": lambda a=double(node): eager_comoments(*a),
                                  "compiled": lambda a=node: compiled_comoments(*a),
                                  "reference f64": lambda a=node: reference.gaussian_comoments(*a, ucb=0.0)})
            yield from (row for row in (ivw, gauss, comoments) if row["op"] in ops)


def fmt_ms(t):
    return "-" if t is None else f"{t * 1e3:.3f} ms"


def fmt_ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.1f}x"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--quick", action="store_true", help="skip the largest sizes")
    p.add_argument("--sizes", default=None,
                   help="comma-separated BxC to run instead of the default sizes, e.g. 2500x60,100000x100")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated ops to run")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated variants to time (fused is always timed); also "
                        "eager-f64, the eager composition on float64 inputs (not by default)")
    p.add_argument("--budget", type=float, default=1.0,
                   help="seconds of timing per row, shared by its variants (default 1.0); "
                        "scripts/gpu_check.sh passes less to fit its time limit")
    p.add_argument("--write", action="store_true",
                   help="rewrite docs/BENCHMARKS.md's results section (the CUDA one for --device cuda)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available to torch {torch.__version__}")
    if not args.budget > 0:
        p.error(f"--budget must be > 0, got {args.budget}")
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    if args.sizes:
        sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    else:
        sizes = SIZES[:-1] if args.quick else SIZES  # quick: without 1e6 x 12
    known = VARIANTS + EXTRA_VARIANTS
    asked = [v for v in args.variants.split(",") if v]
    if unknown := [v for v in asked if v not in known]:
        p.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    variants = ["fused"] + [v for v in known[1:] if v in asked]
    shown = list(VARIANTS) + [v for v in EXTRA_VARIANTS if v in variants]  # "-" where not timed
    ratios = [v for v in shown if v not in ("fused", "reference f64")]

    bw = copy_bandwidth(args.device, budget_s=2 * args.budget)
    header = (f"Machine: {machine_description(args.device)}\n"
              f"Copy bandwidth (device {args.device}, 256 MiB, read + write): {bw / 1e9:.1f} GB/s\n"
              + ("Timed with CUDA events\n" if args.device.startswith("cuda") else ""))
    lines = ["| op | B | C | dtype | " + " | ".join(shown) + " | "
             + " | ".join(f"{v} / fused" for v in ratios) + " | fused GB/s | fused / copy floor |",
             "|---|---:|---:|---|" + "---:|" * (len(shown) + len(ratios) + 2)]
    print(header)
    print(lines[0])
    start = time.perf_counter()
    for row in rows(args.device, dtypes, sizes, args.ops.split(","), f64="eager-f64" in variants):
        t = time_alternating({v: row["fns"][v] for v in variants}, args.device, args.budget)
        floor = row["bytes"] / bw
        line = (f"| {row['op']} | {row['B']} | {row['C']} | {str(row['dtype']).removeprefix('torch.')} | "
                + " | ".join(fmt_ms(t.get(v)) for v in shown) + " | "
                + " | ".join(fmt_ratio(t.get(v), t["fused"]) for v in ratios)
                + f" | {row['bytes'] / t['fused'] / 1e9:.1f} | {t['fused'] / floor:.1f}x |")
        lines.append(line)
        print(line, flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")

    if args.write:
        path = write_section("bench/ops.py", argv, header + "\n" + "\n".join(lines), args.device)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
