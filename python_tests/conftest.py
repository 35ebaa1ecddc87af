"""Shared fixtures and tolerances for the tests.

Tolerances: the fused ops accumulate in float64 and round once to the input
dtype on output (on the CPU, bfloat16's combined gradient is computed in float:
errors of a few 2^-24 before that rounding, far below a bfloat16 ulp), so the
combined gradient must match the float64 reference
within one unit in the last place of the output dtype, relative to the size
of the two terms being mixed (|k g_lr| + |(1-k) g_rp|), plus the difference
between the op's weight and the reference's (checked on its own) times
|g_lr - g_rp|. Weights and variances are float64 from inputs that are exact
in float64, so they match to 1e-9 relative (only the summation order and
FMA contraction differ; a badly conditioned variance, e.g. two nearly equal
samples, loses more digits in both).
"""

import functools
import json
import os
import signal

import pytest
import torch

CUDA = torch.cuda.is_available()

# CPU always; CUDA only where a GPU is present (the only allowed skip).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device")),
]

GRAD_RTOL = {
    torch.float64: 1e-12,
    torch.float32: torch.finfo(torch.float32).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float16: torch.finfo(torch.float16).eps,
}
STAT_RTOL = 1e-9
K_ATOL = 4 * torch.finfo(torch.float64).eps


def assert_combined_close(got, ref, k, g_lr, g_rp, dtype, k_got=None):
    """|got - ref| <= rtol(dtype) (|k g_lr| + |(1-k) g_rp|) + (|k_got - k| + K_ATOL) |g_lr - g_rp|
    + tiny(dtype), where k is the reference weight and k_got the op's (default: k)."""
    got = got.double().cpu()
    ref, k = ref.cpu(), k.cpu()
    dk = K_ATOL + (torch.zeros_like(k) if k_got is None else torch.nan_to_num((k_got.cpu() - k).abs()))
    g_lr, g_rp = g_lr.double().cpu(), g_rp.double().cpu()
    zeroed = torch.isnan(k).expand_as(ref)
    kk = torch.nan_to_num(k, nan=0.5)
    scale = (kk * g_lr).abs() + ((1 - kk) * g_rp).abs()
    scale = torch.where(kk == 0, g_rp.abs(), torch.where(kk == 1, g_lr.abs(), scale))
    bound = GRAD_RTOL[dtype] * scale + dk * (g_lr - g_rp).abs() + torch.finfo(dtype).tiny
    bound = torch.nan_to_num(bound, nan=torch.inf)  # discarded non-finite terms (checked above)
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref)), "non-finite pattern differs"
    assert bool((got[zeroed] == 0).all()), "zeroed coordinates must be exactly 0"
    fin = torch.isfinite(ref)
    err = (got[fin] - ref[fin]).abs()
    worst = (err / bound[fin]).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"combined gradient off by {worst:.3g}x the {dtype} tolerance"


def assert_stats_close(got, ref, name):
    torch.testing.assert_close(
        got.cpu(), ref.cpu(), rtol=STAT_RTOL, atol=0.0, equal_nan=True, msg=lambda m: f"{name}: {m}"
    )


def random_pair(B, C, dtype=torch.float32, device="cpu", seed=0, spread=2.0):
    """Per-sample LR and RP gradients whose per-column scales differ by up to 10^(2*spread),
    so that the weights cover (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    scale_lr = 10 ** ((torch.rand(C, generator=gen, dtype=torch.float64) * 2 - 1) * spread)
    scale_rp = 10 ** ((torch.rand(C, generator=gen, dtype=torch.float64) * 2 - 1) * spread)
    g_lr = torch.randn(B, C, generator=gen, dtype=torch.float64) * scale_lr
    g_rp = (torch.randn(B, C, generator=gen, dtype=torch.float64) + 0.5) * scale_rp
    return g_lr.to(dtype).to(device), g_rp.to(dtype).to(device)


def random_gaussian_node(B, D, dtype=torch.float32, device="cpu", seed=0):
    """(d, eps, sigma, adv) for one Gaussian node, with varied scales per column."""
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    d = torch.randn(B, D, generator=gen, dtype=f64) * 10 ** (torch.rand(D, generator=gen, dtype=f64) * 4 - 2)
    eps = torch.randn(B, D, generator=gen, dtype=f64)
    sigma = torch.rand(B, D, generator=gen, dtype=f64) * 2 + 0.05
    adv = torch.randn(B, generator=gen, dtype=f64) * 3
    return tuple(t.to(dtype).to(device) for t in (d, eps, sigma)) + (adv.to(torch.float32).to(device),)


# Under mutation testing a mutant runs the tests that cover its function, except those that
# took longer than this (statistical grids, long training runs): a surviving mutant of the
# estimator core otherwise costs every slow test it reaches, about 40 s each. The trainer's
# mutants keep them, since only whole runs reach most of its code.
MUTATION_TEST_LIMIT_S = 5.0


@functools.lru_cache(maxsize=None)
def _recorded_durations(rootdir: str):
    """{test id: seconds} from mutmut's stats in `rootdir` (mutants/), read once per
    process; None where there are none."""
    try:
        with open(os.path.join(rootdir, "mutmut-stats.json")) as f:
            return json.load(f)["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return None


def pytest_collection_modifyitems(config, items):
    """Under mutation testing (`make mutation`; mutmut names the mutant in
    MUTANT_UNDER_TEST), run the mutant's tests fastest first, leaving out the slow ones
    (MUTATION_TEST_LIMIT_S). mutmut stops at the first failure, and lists a function's
    tests in no particular order, so a mutant that a quick test kills would otherwise often
    wait for the slow grids and training runs first."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    durations = _recorded_durations(str(config.rootpath)) if "__mutmut_" in mutant else None
    if durations is None:
        return
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
    if mutant.startswith("tpx_ext.dreamer.train."):
        return
    slow = [item for item in items if durations.get(item.nodeid, 0.0) > MUTATION_TEST_LIMIT_S]
    if slow and len(slow) < len(items):
        config.hook.pytest_deselected(items=slow)
        del items[len(items) - len(slow):]


# Under mutation testing a test may run this many times its recorded duration, and at least
# MUTATION_TIMEOUT_FLOOR_S, before it fails (below).
MUTATION_TIMEOUT_FACTOR, MUTATION_TIMEOUT_FLOOR_S = 10, 60.0


class MutantTimeout(Exception):
    """A test ran far past its recorded time under a mutant (an endless loop, say)."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Under mutation testing, a test that runs ten times its recorded duration (at least a
    minute of CPU time) fails: a mutant that makes the trainer loop forever is caught in a
    minute, as PIT and Stryker count timeouts, instead of at mutmut's CPU limit ten minutes
    later."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if "__mutmut_" not in mutant or not hasattr(signal, "setitimer"):
        yield
        return
    recorded = (_recorded_durations(str(item.config.rootpath)) or {}).get(item.nodeid, 0.0)
    limit = max(MUTATION_TIMEOUT_FLOOR_S, MUTATION_TIMEOUT_FACTOR * recorded)

    def timeout(signum, frame):
        raise MutantTimeout(f"{item.nodeid} ran over {limit:.3g} s under {mutant}")

    # The process's CPU time, not the wall clock: a worker paused (SIGSTOP) or starved by
    # other processes is not looping, and a wall-clock timer would count it as killed.
    previous = signal.signal(signal.SIGPROF, timeout)
    signal.setitimer(signal.ITIMER_PROF, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)
