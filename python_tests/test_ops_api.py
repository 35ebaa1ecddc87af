"""Op registration (opcheck, torch.compile), input validation and the build."""

import os
import re

import pytest
import torch
from conftest import CUDA, DEVICES, random_gaussian_node, random_pair

import tpx_ext
from tpx_ext import reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("running", (False, True))
def test_opcheck_ivw_combine(running, device):
    g_lr, g_rp = random_pair(33, 5, torch.float32, device, seed=1)
    run = list(tpx_ext.new_running_stats(5, device)) if running else [None, None]
    torch.library.opcheck(torch.ops.tpx_ext.ivw_combine.default, (g_lr, g_rp, *run, 0.5, None))
    torch.library.opcheck(torch.ops.tpx_ext.ivw_combine.default, (g_lr, g_rp, *run, 0.0, 0.25))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("running", (False, True))
def test_opcheck_gaussian_tpx_backward(running, device):
    node = random_gaussian_node(40, 3, torch.float32, device, seed=2)
    run = list(tpx_ext.new_running_stats(6, device)) if running else [None, None]
    torch.library.opcheck(
        torch.ops.tpx_ext.gaussian_tpx_backward.default, (*node, *run, 0.9, None, True)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    node = random_gaussian_node(64, 4, torch.float32, device, seed=3)
    run = tpx_ext.new_running_stats(8, device)
    run_eager = tuple(t.clone() for t in run)

    def step(d, eps, sigma, adv, run_lr, run_rp):
        r = tpx_ext.gaussian_tpx_backward(d * 2.0, eps, sigma, adv, run_lr, run_rp, momentum=0.5)
        return r.grad_mu + 1.0, r.grad_sigma, r.k

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # second call reads the running stats the first one wrote
        got = compiled(*node, *run)
        want = step(*node, *run_eager)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(run[0], run_eager[0], rtol=0, atol=0)


# --- bad input: every error names the argument -------------------------------

def _pair():
    return random_pair(10, 3, torch.float32, "cpu", seed=4)


def _node():
    return random_gaussian_node(10, 3, torch.float32, "cpu", seed=5)


IVW_ERRORS = [
    ("rank", lambda a, b: (a[0], b[0]), ValueError, "g_lr must be a 2-D tensor"),
    ("shape", lambda a, b: (a, b[:, :2]), ValueError, "g_rp must have the shape of g_lr"),
    ("empty", lambda a, b: (a[:0], b[:0]), ValueError, "g_lr must have B >= 1 rows"),
    ("dtype", lambda a, b: (a, b.double()), TypeError, "g_rp has dtype Double but g_lr has dtype Float"),
    ("int", lambda a, b: (a.long(), b.long()), TypeError, "g_lr must be float32, float64"),
]


@pytest.mark.parametrize("case", IVW_ERRORS, ids=[c[0] for c in IVW_ERRORS])
def test_ivw_combine_errors(case):
    _, make, exc, msg = case
    with pytest.raises(exc, match=re.escape(msg)):
        tpx_ext.ivw_combine(*make(*_pair()))


def test_option_errors():
    a, b = _pair()
    with pytest.raises(ValueError, match="running_var_lr must be a 1-D tensor of 3 elements"):
        tpx_ext.ivw_combine(a, b, torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match="running_var_rp must be a 1-D tensor of 3 elements"):
        tpx_ext.ivw_combine(a, b, torch.zeros(3), torch.zeros(3, 1))
    with pytest.raises(TypeError, match="running_var_lr must be float32 or float64"):
        tpx_ext.ivw_combine(a, b, torch.zeros(3, dtype=torch.int64), torch.zeros(3))
    with pytest.raises(ValueError, match="give both running_var_lr and running_var_rp"):
        tpx_ext.ivw_combine(a, b, torch.zeros(3), None)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        tpx_ext.ivw_combine(a, b, momentum=1.0)
    with pytest.raises(ValueError, match=r"fixed_weight must be in \[0, 1\]"):
        tpx_ext.ivw_combine(a, b, fixed_weight=-0.1)
    # A Gaussian node has 2D coordinates.
    with pytest.raises(ValueError, match="running_var_lr must be a 1-D tensor of 6 elements"):
        tpx_ext.gaussian_tpx_backward(*_node(), torch.zeros(3), torch.zeros(3))


def test_gaussian_errors():
    d, eps, sigma, adv = _node()
    cases = [
        ((d[0], eps, sigma, adv), "d must be a 2-D tensor"),
        ((d, eps[:5], sigma, adv), "eps must have the shape of d"),
        ((d, eps, sigma[:, :1], adv), "sigma must have the shape of d"),
        ((d, eps, sigma, adv[:4]), "adv must be a 1-D tensor of B = 10 elements"),
        ((d, eps, sigma, adv[:, None]), "adv must be a 1-D tensor"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=re.escape(msg)):
            tpx_ext.gaussian_tpx_backward(*args)
    with pytest.raises(TypeError, match="sigma has dtype Double but d has dtype Float"):
        tpx_ext.gaussian_tpx_backward(d, eps, sigma.double(), adv)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", (0.0, -1.0, float("nan"), float("inf")))
def test_sigma_must_be_positive_and_finite(bad, device):
    d, eps, sigma, adv = (t.to(device) for t in _node())
    sigma[4, 1] = bad
    run = tpx_ext.new_running_stats(6, device)
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        tpx_ext.gaussian_tpx_backward(d, eps, sigma, adv, *run)
    assert torch.isnan(run[0]).all(), "a rejected call must not touch the running stats"
    with pytest.raises(ValueError) as info:
        reference.gaussian_tpx_backward(d, eps, sigma, adv)
    assert str(info.value) == "gaussian_tpx_backward: sigma must be finite and > 0 everywhere"
    tpx_ext.gaussian_tpx_backward(d, eps, sigma, adv, check_sigma=False)  # opt-out runs


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_device_mismatch_names_the_argument():
    a, b = _pair()
    with pytest.raises(ValueError, match="g_rp is on cuda:0 but g_lr is on cpu"):
        tpx_ext.ivw_combine(a, b.cuda())
    d, eps, sigma, adv = (t.cuda() for t in _node())
    with pytest.raises(ValueError, match="adv is on cpu but d is on cuda:0"):
        tpx_ext.gaussian_tpx_backward(d, eps, sigma, adv.cpu())
    with pytest.raises(ValueError, match="running_var_lr is on cpu"):
        tpx_ext.ivw_combine(a.cuda(), b.cuda(), *tpx_ext.new_running_stats(3))


# --- build -------------------------------------------------------------------

def test_cuda_compiled_matches_the_build():
    """CI builds with TPX_FORCE_CUDA=1: the CUDA kernels must then be in the module."""
    assert isinstance(tpx_ext.cuda_compiled(), bool)
    if os.environ.get("TPX_FORCE_CUDA") == "1":
        assert tpx_ext.cuda_compiled()
    if CUDA:
        assert tpx_ext.cuda_compiled(), "a GPU is present but the CUDA kernels were not built"
        assert torch._C._dispatch_has_kernel_for_dispatch_key("tpx_ext::ivw_combine", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("tpx_ext::ivw_combine", "CPU")


# --- recycled CPU outputs (outputs of 1 MiB and more come from a cache of freed blocks) --

@pytest.mark.skipif(os.environ.get("TPX_CPU_CACHE_MB") == "0", reason="output cache turned off")
def test_cpu_outputs_are_recycled_only_once_freed():
    B, D = 40_000, 16  # 2.5 MiB per float32 output
    node = random_gaussian_node(B, D, torch.float32, "cpu", seed=30)
    ref = reference.gaussian_tpx_backward(*node)
    first = tpx_ext.gaussian_tpx_backward(*node)
    second = tpx_ext.gaussian_tpx_backward(*node)  # `first` alive: fresh blocks
    ptrs = {first.grad_mu.data_ptr(), first.grad_sigma.data_ptr()}
    assert not ptrs & {second.grad_mu.data_ptr(), second.grad_sigma.data_ptr()}
    for got in (first, second):
        torch.testing.assert_close(got.grad_mu, ref.grad_mu.float(), rtol=2e-7, atol=1e-30)
        torch.testing.assert_close(got.grad_sigma, ref.grad_sigma.float(), rtol=2e-7, atol=1e-30)
    first.grad_mu.fill_(float("nan"))  # garbage left in the blocks must not matter
    first.grad_sigma.fill_(float("nan"))
    del first
    third = tpx_ext.gaussian_tpx_backward(*node)
    assert {third.grad_mu.data_ptr(), third.grad_sigma.data_ptr()} == ptrs, "freed blocks reused"
    assert torch.equal(third.grad_mu, second.grad_mu) and torch.equal(third.grad_sigma, second.grad_sigma)
    g = tpx_ext.ivw_combine(*random_pair(B, 2 * D, torch.float32, "cpu", seed=31)).g
    g.resize_(2 * B, 2 * D).fill_(1.0)  # an ordinary resizable tensor
    assert g.sum().item() == 4 * B * D
    del g, second, third


def test_small_cpu_outputs_use_the_default_allocator():
    got = tpx_ext.ivw_combine(*random_pair(100, 8, torch.float32, "cpu", seed=32))
    assert got.g.untyped_storage().nbytes() == 100 * 8 * 4
    got.g.resize_(1000, 8)
