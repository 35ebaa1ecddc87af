"""`python -m tpx_ext`: the extension's build facts and a self-check of the fused ops.

Runs one Dreamer-sized TPX node (B=2500 samples, D=60) through the fused op
on every available device, compares it with the float64 reference and times
it. Exits non-zero if the op disagrees with the reference.
"""

import sys
import time

import torch

import tpx_ext
from tpx_ext import reference


def _check(device: str, B: int = 2500, D: int = 60) -> bool:
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(B, D, generator=gen) * 10 ** (torch.rand(D, generator=gen) * 4 - 2)
    eps = torch.randn(B, D, generator=gen)
    sigma = torch.rand(B, D, generator=gen) + 0.05
    adv = torch.randn(B, generator=gen)
    args = [t.to(device) for t in (d, eps, sigma, adv)]
    got = tpx_ext.gaussian_tpx_backward(*args)
    ref = reference.gaussian_tpx_backward(d, eps, sigma, adv)
    k_err = (got.k.cpu() - ref.k).abs().max().item()
    scale = ref.grad_mu.abs().clamp_min(1e-30)
    g_err = ((got.grad_mu.double().cpu() - ref.grad_mu).abs() / scale).max().item()
    ok = k_err < 1e-9 and g_err < 1e-6
    for _ in range(3):
        tpx_ext.gaussian_tpx_backward(*args)
    if device == "cuda":
        torch.cuda.synchronize()
    reps, t0 = 50, time.perf_counter()
    for _ in range(reps):
        tpx_ext.gaussian_tpx_backward(*args)
    if device == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / reps * 1e3
    print(f"  {device:5s} max|k - k_ref| = {k_err:.1e}  max rel. error of grad_mu = {g_err:.1e}"
          f"  {ms:.3f} ms/call  {'OK' if ok else 'MISMATCH'}")
    return ok


def describe_build(info) -> str:
    """The build facts of tpx_ext.build_info(), one per line."""
    none = "none"
    cuda = (f"compiled with CUDA {info.cuda_compiled_version} for {', '.join(info.cuda_archs)}; "
            f"runtime {info.cuda_runtime_version or none}, driver {info.cuda_driver_version or none}"
            if info.cuda_compiled else "not compiled")
    return "\n".join([
        f"  compiled against torch {info.torch_version} (running {torch.__version__}) by {info.compiler}",
        f"  CUDA kernels: {cuda}",
        f"  CPU kernels: {info.cpu_kernel_isa}, {info.cpu_threads} threads",
    ])


def main() -> int:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"tpx_ext | devices: {', '.join(devices)}")
    print(describe_build(tpx_ext.build_info()))
    print("self-check: gaussian_tpx_backward (B=2500, D=60, float32) vs the float64 reference")
    ok = all([_check(dev) for dev in devices])
    print("all checks passed" if ok else "SELF-CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
