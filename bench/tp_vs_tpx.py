"""Peak memory and time of one tp and one tpx gradient as the policy grows.

    python bench/tp_vs_tpx.py [--widths 32 128 512] [--horizon 10] [--batch 64] [--device cuda]

The policy is an MLP with two hidden layers of the given width (P ~ width^2
parameters) on the chaotic rotor (tpx_ext.experiments.systems). tp forms
per-sample gradients with respect to the P parameters at every node (O(B x P)); tpx
weights the node's 2D distribution-parameter coordinates (O(B x 2D)), so its
cost is that of the plain backward pass (rp, shown for reference).

Memory: the peak extra memory of one gradient over the memory in use before
it. On CPU that is the peak resident set size (VmHWM, reset through
/proc/self/clear_refs) minus the resident size before; every (mode, width)
runs in a fresh process so that memory freed by an earlier run and kept by
the allocator does not hide a peak. On CUDA it is torch.cuda.max_memory_allocated.
Time: median of --repeats gradients (the first is the measured one) after a
warm-up gradient of horizon 1 and batch 2.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import tpx_ext
from tpx_ext.experiments.systems import ChaoticRotor, policy_gradient


class MLPPolicy(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, 1))
        self.log_std = nn.Parameter(torch.tensor([-0.5]))

    def forward(self, x):
        mu = self.net(x)
        return mu, self.log_std.exp().expand_as(mu)


def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) / 1024


def peak_extra_mib(run, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = _proc_status_mib("VmRSS")
    run()
    return _proc_status_mib("VmHWM") - before


def measure(mode: str, width: int, horizon: int, batch: int, repeats: int, device: str) -> dict:
    """One (mode, width) in this process: run it in a fresh one (see main)."""
    torch.manual_seed(0)
    policy = MLPPolicy(width).to(device)
    estimator, system = tpx_ext.Estimator(mode), ChaoticRotor()

    def gradient():
        policy.zero_grad(set_to_none=True)
        policy_gradient(estimator, policy, system, horizon, batch)

    def timed():
        start = time.perf_counter()
        gradient()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    policy_gradient(estimator, policy, system, 1, 2)  # load kernels without touching the peak
    policy.zero_grad(set_to_none=True)
    times = []
    memory = peak_extra_mib(lambda: times.append(timed()), device)
    times += [timed() for _ in range(repeats - 1)]
    params = sum(p.numel() for p in policy.parameters())
    return {"mode": mode, "width": width, "params": params, "peak_mib": memory,
            "ms": 1e3 * statistics.median(times)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[32, 128, 512],
                   help="1024 works too, but tp then takes ~90 s and ~2.7 GiB per gradient")
    p.add_argument("--modes", nargs="+", default=["rp", "tpx", "tp"], choices=tpx_ext.MODES)
    p.add_argument("--horizon", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--one", help=argparse.SUPPRESS)  # "mode,width": measure in this process
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.one:
        mode, width = a.one.split(",")
        print(json.dumps(measure(mode, int(width), a.horizon, a.batch, a.repeats, a.device)))
        return
    common = ["--horizon", str(a.horizon), "--batch", str(a.batch), "--repeats", str(a.repeats),
              "--device", a.device, "--threads", str(a.threads)]
    print(f"horizon {a.horizon}, batch {a.batch}, device {a.device}, {a.threads} thread(s)")
    print(f"{'width':>6} {'params':>9} {'mode':>4} {'peak MiB':>9} {'ms/grad':>9}")
    for width in a.widths:
        for mode in a.modes:
            out = subprocess.run([sys.executable, __file__, "--one", f"{mode},{width}", *common],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.splitlines()[-1])
            print(f"{width:>6} {r['params']:>9} {mode:>4} {r['peak_mib']:>9.1f} {r['ms']:>9.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
