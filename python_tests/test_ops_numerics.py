"""The fused ops against the float64 reference (tpx_ext.reference).

Tolerances are stated in conftest.py: one ulp of the output dtype for the
combined gradient, 1e-9 relative for weights and variances.
"""

import itertools

import pytest
import torch
from conftest import (
    DEVICES,
    GRAD_RTOL,
    assert_combined_close,
    assert_stats_close,
    random_gaussian_node,
    random_pair,
)

import tpx_ext
from tpx_ext import reference

BATCHES = (1, 2, 3, 17, 2500, 100003)
COLUMNS = (1, 6, 60, 1000)
# The float64 reference of the full grid's largest cell (1e8 elements) needs
# ~10 GB; it has its own test below. Everything else runs in every dtype.
GRID = [(B, C) for B, C in itertools.product(BATCHES, COLUMNS) if B * C <= 10_000_000]
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_ivw(g_lr, g_rp, **kw):
    got = tpx_ext.ivw_combine(g_lr, g_rp, **kw)
    ref = reference.ivw_combine(g_lr.cpu(), g_rp.cpu(), **{k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()})
    assert got.g.dtype == g_lr.dtype and got.g.shape == g_lr.shape
    assert_stats_close(got.k, ref.k, "k")
    assert_stats_close(got.var_lr, ref.var_lr, "var_lr")
    assert_stats_close(got.var_rp, ref.var_rp, "var_rp")
    assert got.nonfinite.item() == ref.nonfinite.item()
    assert_combined_close(got.g, ref.g, ref.k, g_lr, g_rp, g_lr.dtype, got.k)
    return got, ref


def check_gaussian(d, eps, sigma, adv, **kw):
    got = tpx_ext.gaussian_tpx_backward(d, eps, sigma, adv, **kw)
    ref = reference.gaussian_tpx_backward(d.cpu(), eps.cpu(), sigma.cpu(), adv.cpu(), **kw)
    D = d.shape[1]
    g_lr, g_rp = reference.gaussian_per_sample(d.double(), eps.double(), sigma.double(), adv.double())
    assert_stats_close(got.k, ref.k, "k")
    assert_stats_close(got.var_lr, ref.var_lr, "var_lr")
    assert_stats_close(got.var_rp, ref.var_rp, "var_rp")
    assert got.nonfinite.item() == ref.nonfinite.item()
    assert_combined_close(got.grad_mu, ref.grad_mu, ref.k[:D], g_lr[:, :D], g_rp[:, :D], d.dtype,
                          got.k[:D])
    assert_combined_close(got.grad_sigma, ref.grad_sigma, ref.k[D:], g_lr[:, D:], g_rp[:, D:],
                          d.dtype, got.k[D:])
    return got, ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C", GRID)
def test_ivw_combine_grid(B, C, dtype, device):
    g_lr, g_rp = random_pair(B, C, dtype, device, seed=B * 7919 + C)
    check_ivw(g_lr, g_rp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C", GRID)
def test_gaussian_grid(B, C, dtype, device):
    check_gaussian(*random_gaussian_node(B, C, dtype, device, seed=B * 7919 + C))


# ucb > 0 (the variances' upper bounds, pass 1b): a grid that crosses the CPU kernel's
# block, panel and chunk boundaries and the CUDA row chunks.
UCB_GRID = [(B, C) for B, C in itertools.product((1, 2, 17, 2500, 100003), (1, 6, 60))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("B,C", UCB_GRID)
def test_ucb_grid(B, C, dtype, device):
    g_lr, g_rp = random_pair(B, C, dtype, device, seed=B * 31 + C)
    g_rp = g_rp * (1 + 9 * (torch.arange(B, device=device) % 17 == 0))[:, None].to(dtype)  # tails
    got, ref = check_ivw(g_lr, g_rp, ucb=2.0)
    if 17 <= B <= 2500:  # the bounds must move k (by ~2 sqrt(excess / B)), or this is the plain rule
        plain = reference.ivw_combine(g_lr.cpu(), g_rp.cpu(), ucb=0.0)
        assert bool(((ref.k - plain.k).abs() > 1e-2 * plain.k).any())
    check_gaussian(*random_gaussian_node(B, C, dtype, device, seed=B * 31 + C), ucb=1.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("buffer_dtype", (torch.float64, torch.float32), ids=str)
def test_ucb_running_statistics_average_the_bounds(buffer_dtype, device):
    run = [torch.full((6,), float("nan"), dtype=buffer_dtype, device=device) for _ in range(2)]
    ref_run = [torch.full((6,), float("nan"), dtype=torch.float64) for _ in range(2)]
    for call in range(3):
        g_lr, g_rp = random_pair(300, 6, torch.float32, device, seed=call)
        g_rp[call, 2] = float("inf")  # RP of column 2 non-finite: its running value is kept
        got = tpx_ext.ivw_combine(g_lr, g_rp, *run, momentum=0.7, ucb=2.0)
        want = reference.ivw_combine(g_lr.cpu(), g_rp.cpu(), *ref_run, momentum=0.7, ucb=2.0)
        if buffer_dtype == torch.float32:  # the op starts the next call from the float values
            ref_run = [r.float().double() for r in ref_run]
        assert_stats_close(got.k, want.k, "k")
        assert_stats_close(got.var_rp, want.var_rp, "var_rp")
        for got, want in zip(run, ref_run):
            torch.testing.assert_close(got.cpu().double(), want, equal_nan=True,
                                       rtol=1e-9 if buffer_dtype == torch.float64 else 1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_ucb_with_nonfinite_and_constant_columns(device):
    g_lr, g_rp = random_pair(64, 5, torch.float64, device, seed=5)
    g_lr[3, 0] = float("nan")  # LR bad: k 0
    g_rp[7, 1] = float("inf")  # RP bad: k 1
    g_lr[9, 2] = g_rp[9, 2] = float("inf")  # both: k NaN, zeroed
    g_rp[:, 3] = 2.5  # RP constant: variance 0, k 0
    got, _ = check_ivw(g_lr, g_rp, ucb=2.0)
    assert got.k[0] == 0 and got.k[1] == 1 and torch.isnan(got.k[2]) and got.k[3] == 0
    assert int(got.nonfinite) == 1


@pytest.mark.parametrize("ucb", (-1.0, float("inf"), float("nan")))
def test_ucb_must_be_finite_and_nonnegative(ucb):
    g = torch.randn(8, 3)
    with pytest.raises(ValueError, match="ucb"):
        tpx_ext.ivw_combine(g, g, ucb=ucb)


@pytest.mark.parametrize("device", DEVICES)
def test_largest_grid_cell(device):
    """B = 100003, C = 1000: 1e8 elements per tensor. Columns are independent, so
    the first and the last block of columns (the highest flat indices) are checked
    against the reference, which would need ~10 GB for all of them at once."""
    B, C, block = 100003, 1000, 125
    gen = torch.Generator().manual_seed(5)
    g_lr = torch.randn(B, C, generator=gen) * torch.rand(C, generator=gen)
    g_rp = torch.randn(B, C, generator=gen) + 0.5
    got = tpx_ext.ivw_combine(g_lr.to(device), g_rp.to(device))
    g = got.g.cpu()
    for c0 in (0, C - block):
        cols = slice(c0, c0 + block)
        ref = reference.ivw_combine(g_lr[:, cols], g_rp[:, cols])
        assert_stats_close(got.k[cols], ref.k, "k")
        assert_stats_close(got.var_lr[cols], ref.var_lr, "var_lr")
        assert_combined_close(g[:, cols], ref.g, ref.k, g_lr[:, cols], g_rp[:, cols], torch.float32,
                              got.k[cols])


@pytest.mark.parametrize("device", DEVICES)
def test_weights_cover_the_unit_interval(device):
    # Guards against a grid that only ever exercises k ~ 0 or k ~ 1.
    got, _ = check_ivw(*random_pair(2500, 60, torch.float32, device, seed=1))
    assert got.k.min() < 0.05 and got.k.max() > 0.95 and ((got.k > 0.2) & (got.k < 0.8)).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
def test_magnitudes_from_1e_minus30_to_1e30(dtype, device):
    """Exploding RP gradients (1e30) and vanishing ones (1e-30) keep finite, exact variances."""
    B, C = 2500, 61
    g_lr, g_rp = random_pair(B, C, torch.float64, "cpu", seed=2, spread=0.5)
    exps = torch.linspace(-30, 30, C, dtype=torch.float64)
    g_rp = g_rp * 10**exps  # RP from 1e-30 to 1e30 across columns
    g_lr = g_lr * 10 ** exps.flip(0)  # LR the other way round
    got, ref = check_ivw(g_lr.to(dtype).to(device), g_rp.to(dtype).to(device))
    assert torch.isfinite(got.var_lr).all() and torch.isfinite(got.var_rp).all()
    assert (got.var_rp[-1] > 1e55) and (got.var_rp[0] < 1e-55)
    # Where RP explodes, the weight goes to LR, and vice versa.
    assert got.k[-1] > 1 - 1e-12 and got.k[0] < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_exploding_downstream_gradient(device):
    d, eps, sigma, adv = random_gaussian_node(2500, 12, torch.float32, device, seed=3)
    d = d * 1e30
    got, _ = check_gaussian(d, eps, sigma, adv)
    assert torch.isfinite(got.var_rp).all() and (got.k > 0.999).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
def test_nonfinite_rows(dtype, device):
    """A non-finite sample gives its estimator +inf variance there; both bad -> 0, counted."""
    B, C = 300, 8
    g_lr, g_rp = random_pair(B, C, dtype, "cpu", seed=4)
    g_lr[5, 0] = float("inf")  # LR bad in column 0 -> all RP
    g_rp[7, 1] = float("nan")  # RP bad in column 1 -> all LR
    g_lr[9, 2] = float("-inf")
    g_rp[11, 2] = float("nan")  # both bad in column 2 -> zeroed
    g_lr[13, 3] = g_rp[13, 3] = float("nan")  # both bad in the same row
    g_lr[:, 4] = float("inf")  # whole column
    got, ref = check_ivw(g_lr.to(device), g_rp.to(device))
    k = got.k.cpu()
    assert k[0] == 0 and k[1] == 1 and k[4] == 0
    assert torch.isnan(k[2]) and torch.isnan(k[3])
    assert got.nonfinite.item() == 2
    g = got.g.cpu()
    assert torch.equal(g[:, 0], g_rp[:, 0]) and torch.equal(g[:, 1], g_lr[:, 1])
    assert (g[:, 2:4] == 0).all() and torch.isfinite(g[:, 5:]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_nonfinite_advantage_and_downstream(device):
    d, eps, sigma, adv = random_gaussian_node(64, 4, torch.float32, "cpu", seed=5)
    adv[3] = float("nan")  # LR of every coordinate non-finite
    d[10, 1] = float("inf")  # RP of mu_1 and sigma_1 non-finite too
    got, _ = check_gaussian(d.to(device), eps.to(device), sigma.to(device), adv.to(device))
    assert got.nonfinite.item() == 2  # mu_1 and sigma_1
    assert (got.grad_mu[:, 1] == 0).all() and (got.grad_sigma[:, 1] == 0).all()
    assert torch.equal(got.grad_mu[:, 0].cpu(), d[:, 0])  # RP only


@pytest.mark.parametrize("device", DEVICES)
def test_zero_variance_columns(device):
    B = 50
    g_lr, g_rp = random_pair(B, 4, torch.float32, "cpu", seed=6)
    g_lr[:, 0] = 0.1  # LR constant -> all LR
    g_rp[:, 1] = -3.0  # RP constant -> all RP
    g_lr[:, 2], g_rp[:, 2] = 2.5, 7.0  # both constant -> 0.5
    got, _ = check_ivw(g_lr.to(device), g_rp.to(device))
    k = got.k.cpu()
    assert k[0] == 1 and k[1] == 0 and k[2] == 0.5
    assert got.var_lr[0] == 0 and got.var_rp[1] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_single_row_batch_has_no_spread(device):
    got, _ = check_ivw(*random_pair(1, 5, torch.float32, device, seed=7))
    assert (got.var_lr == 0).all() and (got.k == 0.5).all()


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    g_lr, g_rp = random_pair(120, 34, torch.float32, device, seed=8)
    lr_t = g_lr.t().contiguous().t()  # column-major view
    rp_s = torch.cat([g_rp, g_rp], 1)[:, ::2]  # strided view
    assert not lr_t.is_contiguous() and not rp_s.is_contiguous()
    check_ivw(lr_t, rp_s)
    d, eps, sigma, adv = random_gaussian_node(90, 7, torch.float32, device, seed=9)
    adv2 = torch.stack([adv, adv], 1)[:, 1]
    check_gaussian(d.t().contiguous().t(), eps[:, :], sigma.t().contiguous().t(), adv2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", (0.0, 0.9))
@pytest.mark.parametrize("buffer_dtype", (torch.float64, torch.float32), ids=str)
def test_running_statistics_over_calls(momentum, buffer_dtype, device):
    """EMA of the variances over several calls; NaN buffers start empty; a non-finite
    batch leaves the running value of that estimator untouched."""
    C = 6
    run_lr, run_rp = (t.to(buffer_dtype).to(device) for t in tpx_ext.new_running_stats(C))
    ref_lr, ref_rp = tpx_ext.new_running_stats(C)
    for call in range(4):
        g_lr, g_rp = random_pair(200, C, torch.float32, "cpu", seed=100 + call)
        if call == 2:
            g_rp[3, 1] = float("inf")
        got = tpx_ext.ivw_combine(g_lr.to(device), g_rp.to(device), run_lr, run_rp, momentum)
        ref = reference.ivw_combine(g_lr, g_rp, ref_lr, ref_rp, momentum)
        # float32 buffers round the stored EMA; their weights follow within float32 precision.
        rtol = 1e-9 if buffer_dtype == torch.float64 else 1e-6
        torch.testing.assert_close(run_lr.double().cpu(), ref_lr, rtol=rtol, atol=0)
        torch.testing.assert_close(run_rp.double().cpu(), ref_rp, rtol=rtol, atol=0)
        torch.testing.assert_close(got.k.cpu(), ref.k, rtol=rtol, atol=1e-12)
    assert torch.isfinite(run_rp).all()


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_running_statistics(device):
    run = tpx_ext.new_running_stats(2 * 5, device)
    ref_run = tpx_ext.new_running_stats(2 * 5)
    for call in range(3):
        node = random_gaussian_node(128, 5, torch.float32, device, seed=200 + call)
        got = tpx_ext.gaussian_tpx_backward(*node, *run, momentum=0.5)
        ref = reference.gaussian_tpx_backward(*(t.cpu() for t in node), *ref_run, momentum=0.5)
        assert_stats_close(got.k, ref.k, "k")
        assert_stats_close(run[0], ref_run[0], "running_var_lr")
        assert_stats_close(run[1], ref_run[1], "running_var_rp")


@pytest.mark.parametrize("device", DEVICES)
def test_the_reference_takes_the_ops_defaults(device):
    """Running buffers given, every other argument left to its default, over three calls
    (the first call fills the buffers whatever the momentum; later ones show it)."""
    run, ref_run = tpx_ext.new_running_stats(2 * 5, device), tpx_ext.new_running_stats(2 * 5)
    ivw_run, ivw_ref_run = tpx_ext.new_running_stats(7, device), tpx_ext.new_running_stats(7)
    for call in range(3):
        node = random_gaussian_node(128, 5, torch.float32, device, seed=300 + call)
        got = tpx_ext.gaussian_tpx_backward(*node, *run)
        ref = reference.gaussian_tpx_backward(*(t.cpu() for t in node), *ref_run)
        assert_stats_close(got.k, ref.k, "k")
        assert_stats_close(run[1], ref_run[1], "running_var_rp")
        g_lr, g_rp = random_pair(64, 7, torch.float32, device, seed=310 + call)
        got = tpx_ext.ivw_combine(g_lr, g_rp, *ivw_run)
        ref = reference.ivw_combine(g_lr.cpu(), g_rp.cpu(), *ivw_ref_run)
        assert_stats_close(got.k, ref.k, "k")
        assert_stats_close(ivw_run[0], ivw_ref_run[0], "running_var_lr")


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_weight_reproduces_each_estimator_exactly(device):
    g_lr, g_rp = random_pair(300, 9, torch.float32, device, seed=10)
    g_lr[4, 2] = float("inf")  # must not leak into the pure-RP result
    assert torch.equal(tpx_ext.ivw_combine(g_lr, g_rp, fixed_weight=0.0).g, g_rp)
    rp_bad = g_rp.clone()
    rp_bad[6, 3] = float("nan")
    assert torch.equal(tpx_ext.ivw_combine(g_lr, rp_bad, fixed_weight=1.0).g, g_lr)
    got = tpx_ext.ivw_combine(g_lr, g_rp, fixed_weight=0.3)
    assert (got.k == 0.3).all()
    ref = reference.ivw_combine(g_lr.cpu(), g_rp.cpu(), fixed_weight=0.3)
    assert_combined_close(got.g, ref.g, ref.k, g_lr, g_rp, torch.float32)
    d, eps, sigma, adv = random_gaussian_node(100, 3, torch.float32, device, seed=11)
    rp = tpx_ext.gaussian_tpx_backward(d, eps, sigma, adv, fixed_weight=0.0)
    assert torch.equal(rp.grad_mu, d) and torch.equal(rp.grad_sigma, d * eps)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_error_within_twice_eager_bfloat16(device):
    """Flash-attention criterion: the fused op's bf16 error against float64 is at most
    twice that of the same math composed from eager PyTorch ops in bf16."""
    g_lr, g_rp = random_pair(2500, 60, torch.bfloat16, device, seed=12, spread=1.0)
    ref = reference.ivw_combine(g_lr.cpu(), g_rp.cpu())
    v_lr, v_rp = g_lr.var(0), g_rp.var(0)  # eager bf16 composition
    k = v_rp / (v_lr + v_rp)
    eager = k * g_lr + (1 - k) * g_rp
    fused = tpx_ext.ivw_combine(g_lr, g_rp).g
    err_fused = (fused.double().cpu() - ref.g).abs().max()
    err_eager = (eager.double().cpu() - ref.g).abs().max()
    assert err_fused <= 2 * err_eager, (err_fused, err_eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("B,C", [(1, 1), (17, 60), (2500, 12), (2500, 60), (100003, 6), (3, 1000)])
@pytest.mark.parametrize("ucb", (0.0, 2.0))
def test_cpu_and_cuda_agree(B, C, ucb):
    node = random_gaussian_node(B, C, torch.float32, "cpu", seed=13)
    cpu = tpx_ext.gaussian_tpx_backward(*node, ucb=ucb)
    gpu = tpx_ext.gaussian_tpx_backward(*(t.cuda() for t in node), ucb=ucb)
    for name, a, b in zip(cpu._fields, cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-6 if a.dtype == torch.float32 else 1e-9,
                                   atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")


# --- the float reciprocal of sigma (CPU: float-valued inputs divide by sigma through
# the float reciprocal refined by a Newton step in double, and by plain division where
# sigma is outside [2^-126, 2^126)) ---------------------------------------------------

SIGMA_EXTREMES = {
    torch.float32: [1.4e-45, 1e-40, 1.1754942e-38, 1.1754944e-38, 2.5e-38, 1e-20, 0.3, 7.0,
                    1e20, 8.5e37, 8.6e37, 1e38, 3.4e38],
    torch.bfloat16: [1e-40, 1.2e-38, 0.3, 7.0, 1e37, 8.5e37, 3.3e38],
    torch.float16: [6e-8, 1e-5, 0.3, 7.0, 1000.0, 65504.0],
}


def _sigma_node(B, D, dtype, seed):
    """A Gaussian node whose sigma has ordinary values with extremes mixed in: a few
    single entries (in different rows, columns and blocks) and whole columns."""
    d, eps, sigma, adv = random_gaussian_node(B, D, torch.float64, "cpu", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    extremes = torch.tensor(SIGMA_EXTREMES[dtype], dtype=torch.float64)
    rows = torch.randint(0, B, (40,), generator=gen)
    cols = torch.randint(0, D, (40,), generator=gen)
    sigma[rows, cols] = extremes[torch.arange(40) % len(extremes)]
    sigma[:, 0] = extremes[0]  # one column tiny, one huge
    sigma[:, D - 1] = extremes[-1]
    return d.to(dtype), eps.to(dtype), sigma.to(dtype), adv


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("B,D", [(3, 5), (257, 7), (3001, 13)])
def test_gaussian_sigma_magnitudes(B, D, dtype):
    """Subnormal, near the reciprocal's range limits and huge sigma: the same statistics
    and combined gradients as the float64 reference (one output ulp, 1e-9 for k)."""
    d, eps, sigma, adv = _sigma_node(B, D, dtype, seed=B + D)
    assert bool((sigma > 0).all() and torch.isfinite(sigma).all())
    check_gaussian(d, eps, sigma, adv)
    # A fixed weight passes LR gradients of up to ~1e46 through, beyond float32.
    _check_against_rounded_reference(d, eps, sigma, adv, dtype, fixed_weight=0.3)


def _check_against_rounded_reference(d, eps, sigma, adv, dtype, **kw):
    """The op against the float64 reference rounded to dtype (so that overflow to inf in
    dtype is expected, not an error): same non-finite pattern, 2 ulp elsewhere."""
    got = tpx_ext.gaussian_tpx_backward(d, eps, sigma, adv, **kw)
    ref = reference.gaussian_tpx_backward(d, eps, sigma, adv, **kw)
    assert_stats_close(got.k, ref.k, "k")
    assert_stats_close(got.var_lr, ref.var_lr, "var_lr")
    assert_stats_close(got.var_rp, ref.var_rp, "var_rp")
    assert got.nonfinite.item() == ref.nonfinite.item()
    for name in ("grad_mu", "grad_sigma"):
        a, b = getattr(got, name).double(), getattr(ref, name).to(dtype).double()
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        assert torch.equal(a[torch.isinf(a)], b[torch.isinf(a)]), name
        assert torch.equal(torch.isinf(a), torch.isinf(b)), name
        fin = torch.isfinite(b)
        torch.testing.assert_close(a[fin], b[fin], rtol=2 * GRAD_RTOL[dtype], atol=1e-30)


def test_gaussian_reciprocal_is_accurate():
    """Ordinary sigma (the fast path throughout): LR statistics to 1e-12, not just 1e-9."""
    d, eps, sigma, adv = random_gaussian_node(2500, 30, torch.float32, "cpu", seed=21)
    got = tpx_ext.gaussian_tpx_backward(d, eps, sigma, adv)
    ref = reference.gaussian_tpx_backward(d, eps, sigma, adv)
    torch.testing.assert_close(got.var_lr, ref.var_lr, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.k, ref.k, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("bad", (0.0, -0.0, float("inf"), float("-inf"), float("nan"), -2.0))
def test_gaussian_unchecked_invalid_sigma(bad, dtype):
    """check_sigma=False: an invalid sigma is used as it is, as the float64 reference
    does (a / 0 = inf, a / inf = 0, NaN stays NaN); with a fixed weight its inf/NaN
    reaches the output, with the inverse-variance weight the other estimator takes over."""
    B, D = 600, 6
    d, eps, sigma, adv = random_gaussian_node(B, D, dtype, "cpu", seed=22)
    sigma[17, 2] = bad
    sigma[:, 4] = bad  # a whole column
    for kw in ({"ucb": 0.0}, {"fixed_weight": 0.3}):
        _check_against_rounded_reference(d, eps, sigma, adv, dtype, check_sigma=False, **kw)


# On the CPU, pass 2 of bfloat16 inputs computes in float (csrc/cpu/tpx_cpu_kernels.inc, "Pass 2
# in float") and falls back to double per panel or per call; each fallback must give the
# float64 reference's result within the same tolerance.


@pytest.mark.parametrize("B,C", [(3001, 50), (100003, 6), (64, 1)])
def test_bfloat16_float_path_matches_reference(B, C):
    """Ordinary bf16 inputs (the float path throughout; C = 50 leaves 4 lanes per block to
    the one-lane code): the contract of every dtype, one bf16 ulp."""
    check_ivw(*random_pair(B, C, torch.bfloat16, seed=30))
    check_gaussian(*random_gaussian_node(B, C, torch.bfloat16, seed=31))


def test_bfloat16_float_overflow_falls_back_to_double():
    """d * eps beyond the float range, where (1 - k) d eps is not: the panel is computed
    again in double, so those rows stay finite (in float they would be inf)."""
    d, eps, sigma, adv = random_gaussian_node(3000, 6, torch.float64, seed=32)
    d[1000:1010] = 1e30
    eps[1000:1010] = 1e10 * eps[1000:1010].sign()
    d, eps, sigma = (t.to(torch.bfloat16) for t in (d, eps, sigma))
    got = tpx_ext.gaussian_tpx_backward(d, eps, sigma, adv, fixed_weight=0.999)
    assert torch.isfinite(got.grad_sigma[1000:1010].float()).all()
    _check_against_rounded_reference(d, eps, sigma, adv, torch.bfloat16, fixed_weight=0.999)


def test_bfloat16_weights_below_float_range_fall_back_to_double():
    """k = 3e-45 is a subnormal float (7% off): such weights send the call to the double
    path. The LR term dominates the output, so those 7% would show against the reference
    rounded to bf16 (2 ulp)."""
    g_lr, g_rp = random_pair(2500, 6, torch.float64, seed=33)
    g_lr, g_rp = (g_lr * 1e30).to(torch.bfloat16), (g_rp * 1e-20).to(torch.bfloat16)
    got = tpx_ext.ivw_combine(g_lr, g_rp, fixed_weight=3e-45)
    ref = reference.ivw_combine(g_lr, g_rp, fixed_weight=3e-45)
    torch.testing.assert_close(got.g.double(), ref.g.to(torch.bfloat16).double(),
                               rtol=2 * GRAD_RTOL[torch.bfloat16], atol=0)


def test_bfloat16_advantages_beyond_float_range_fall_back_to_double():
    """Advantages of ~1e-44 are subnormal floats (a few % off), sigma = 2^-59 within the
    float path's range: the chunk takes the double path."""
    d, eps, sigma, adv = random_gaussian_node(2500, 6, torch.bfloat16, seed=34)
    adv = adv.double() * 1e-44
    sigma = torch.full_like(sigma, 2.0**-59)
    _check_against_rounded_reference(d, eps, sigma, adv, torch.bfloat16, fixed_weight=1.0)


def test_bfloat16_sigma_beyond_float_range_falls_back_to_double():
    """sigma = 2^120 in some rows (one panel): A / sigma = 2^-170 underflows float, so that
    panel is computed in double (the others in float); LR = A eps / sigma ~ 2^-110 survives."""
    d, eps, sigma, adv = random_gaussian_node(2500, 6, torch.float64, seed=35)
    gen = torch.Generator().manual_seed(35)
    adv = 2.0**-50 * (1 + torch.rand(2500, generator=gen, dtype=torch.float64))
    sigma[100:110] = 2.0**120
    eps[100:110] = 2.0**60 * eps[100:110]
    d, eps, sigma = (t.to(torch.bfloat16) for t in (d, eps, sigma))
    got = tpx_ext.gaussian_tpx_backward(d, eps, sigma, adv, fixed_weight=1.0)
    assert (got.grad_mu[100:110] != 0).all()
    _check_against_rounded_reference(d, eps, sigma, adv, torch.bfloat16, fixed_weight=1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_a_constant_column_has_exactly_zero_variance(device):
    """Both the op and the float64 reference shift the data by their first row before the
    two-pass variance, so a constant column has variance exactly 0 even where its mean
    rounds (three 0.2s sum to 0.6000000000000001): without the shift it would be ~1e-33,
    and the coordinate's weight would follow rounding noise instead of being 0.5."""
    x = torch.full((3, 2), 0.2, dtype=torch.float64)
    x[:, 1] = torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64)
    var = reference.batch_variance(x)
    assert var[0].item() == 0.0 and var[1].item() > 0
    centred = x - x.mean(0)  # the unshifted formula does not give 0 here
    assert (centred[:, 0] ** 2).sum().item() > 0
    out = tpx_ext.ivw_combine(x.to(device), x.to(device), ucb=0.0)
    assert out.var_lr[0].item() == 0.0 and out.k[0].item() == 0.5
