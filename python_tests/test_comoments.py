"""tpx_ext.gaussian_tpx_comoments against its float64 reference
(tpx_ext.reference.gaussian_comoments).

Tolerances: the op reads every input as double (bfloat16/float16/float32 values
are exact in float64) and accumulates in float64, and the reference is run on the
same values converted to float64, so both compute the same numbers in different
orders: a covariance entry (a, b) must match to COV_RTOL relative to its scale
sqrt(var_a var_b) (rounding in sums of B products of the size of the deviations),
a bound to COV_RTOL relative; the non-finite pattern, the symmetry and the exact
zeros of constant columns must match exactly.
"""

import re

import pytest
import torch
from conftest import CUDA, DEVICES, random_gaussian_node

import tpx_ext
from tpx_ext import reference

COV_RTOL = 1e-12


def _node(B, D, dtype, device="cpu", seed=0):
    """random_gaussian_node with float64 advantages (any float dtype is allowed)."""
    d, eps, sigma, adv = random_gaussian_node(B, D, dtype, device, seed=seed)
    return d, eps, sigma, adv.double() * (1 + torch.arange(B, device=device) % 5)


def check(d, eps, sigma, adv, groups=2, ucb=0.0):
    """The op against the reference; returns (op result, reference result)."""
    got = tpx_ext.gaussian_tpx_comoments(d, eps, sigma, adv, groups=groups, ucb=ucb)
    cov, bound, finite = reference.gaussian_comoments(d.cpu(), eps.cpu(), sigma.cpu(), adv.cpu(),
                                                      groups, ucb)
    K = 2 * groups * d.shape[1]
    assert isinstance(got, tpx_ext.ComomentsResult)
    assert got.cov.shape == (K, K) and got.bound.shape == (K,) and got.finite.shape == (K,)
    assert got.cov.dtype == got.bound.dtype == torch.float64 and got.finite.dtype == torch.bool
    assert got.cov.device == d.device and got.bound.device == d.device and got.finite.device == d.device
    c, b, f = got.cov.cpu(), got.bound.cpu(), got.finite.cpu()
    assert torch.equal(f, finite), "finite columns differ"
    assert torch.equal(c, c.T), "cov must be exactly symmetric"
    assert not torch.isnan(c).any() and not torch.isnan(b).any()
    assert torch.equal(torch.isinf(c), torch.isinf(cov)) and torch.equal(torch.isinf(b), torch.isinf(bound))
    fin = torch.isfinite(cov)
    diag = torch.where(finite, cov.diagonal(), 0.0)
    scale = (diag[:, None] * diag[None, :]).sqrt()
    err = (c - cov).abs()
    bad = fin & ~(err <= COV_RTOL * scale)  # err == 0 where scale == 0 (constant columns)
    assert not bad.any(), f"cov off at {bad.nonzero()[:5].tolist()}: worst {(err[fin] / scale[fin]).max():.3g}"
    assert bool((c[~fin] == cov[~fin]).all())
    finb = torch.isfinite(bound)
    berr = (b[finb] - bound[finb]).abs()
    assert bool((berr <= COV_RTOL * bound[finb].abs()).all()), f"bound off by {berr.max():.3g}"
    return got, (cov, bound, finite)


# B = 1 and 2, and B not a multiple of the kernels' panels (32 rows on both backends).
SHAPES = [(1, 3), (2, 4), (33, 5), (513, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("groups", (1, 2))
@pytest.mark.parametrize("ucb", (0.0, 2.0))
@pytest.mark.parametrize("B,D", SHAPES)
def test_matches_reference(B, D, ucb, groups, dtype, device):
    node = _node(B, D, dtype, device, seed=B * 31 + D)
    got, (cov, bound, _) = check(*node, groups=groups, ucb=ucb)
    assert got.finite.all()
    if B >= 33 and ucb:  # the bounds must be above the variances, or this is the plain rule
        assert bool((bound > cov.diagonal()).all())


# A Dreamer latent node (D = 30: 2C = 120 with groups 2, 4 column tiles on CUDA), and a
# matrix of more than 256 columns (D = 70: 2C = 280).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,D,groups,dtype,ucb", [
    (2500, 30, 2, torch.float32, 2.0),
    (2500, 30, 1, torch.bfloat16, 2.0),
    (2500, 30, 2, torch.float64, 0.0),
    (301, 70, 2, torch.float32, 0.0),
], ids=str)
def test_large_nodes(B, D, groups, dtype, ucb, device):
    got, _ = check(*_node(B, D, dtype, device, seed=B + D), groups=groups, ucb=ucb)
    assert got.finite.all()


@pytest.mark.parametrize("device", DEVICES)
def test_diagonal_is_the_coordinate_wise_variances(device):
    """groups = 2: the diagonal is gaussian_tpx_backward's var_lr then var_rp."""
    node = _node(300, 7, torch.float32, device, seed=1)
    got = tpx_ext.gaussian_tpx_comoments(*node)
    node_ref = tpx_ext.gaussian_tpx_backward(*node)
    var, want = got.cov.diagonal(), torch.cat([node_ref.var_lr, node_ref.var_rp])
    assert bool(((var - want).abs() <= 1e-9 * want).all())  # conftest's STAT_RTOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("ucb", (0.0, 2.0))
def test_nonfinite_columns(ucb, dtype, device):
    """inf in d: RP of mu_1 and sigma_1 not finite; NaN in eps: LR of mu_2 and sigma_2,
    and RP of sigma_2: their rows and columns 0 but for the diagonal, +inf, bound +inf."""
    B, D = 100, 4
    d, eps, sigma, adv = _node(B, D, dtype, "cpu", seed=2)
    d[40, 1] = float("inf")
    eps[99, 2] = float("nan")
    got, _ = check(d.to(device), eps.to(device), sigma.to(device), adv.to(device), ucb=ucb)
    GC = 2 * D
    bad = [2, D + 2, GC + 1, GC + D + 1, GC + D + 2]
    expect = torch.ones(2 * GC, dtype=torch.bool)
    expect[bad] = False
    assert torch.equal(got.finite.cpu(), expect)
    cov = got.cov.cpu()
    for a in bad:
        assert cov[a, a] == float("inf") and got.bound[a] == float("inf")
        others = torch.arange(2 * GC) != a
        assert (cov[a, others] == 0).all() and (cov[others, a] == 0).all()
    assert torch.isfinite(cov[expect][:, expect]).all() and (cov.diagonal()[expect] > 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_advantage_spoils_every_lr_column(device):
    d, eps, sigma, adv = _node(50, 3, torch.float32, device, seed=3)
    adv[7] = float("nan")
    got, _ = check(d, eps, sigma, adv, groups=1)
    assert got.finite.cpu().tolist() == [False] * 3 + [True] * 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_constant_columns_are_exactly_zero(dtype, device):
    """A constant d column (RP of mu_0, nonzero) and an eps column of zeros (LR of mu_1 and
    RP of sigma_1 are 0): their rows and columns of cov are exactly 0, variance and bound 0."""
    B, D = 257, 3
    d, eps, sigma, adv = _node(B, D, dtype, "cpu", seed=4)
    d[:, 0] = 1e20
    eps[:, 1] = 0.0
    got, _ = check(d.to(device), eps.to(device), sigma.to(device), adv.to(device), ucb=2.0)
    GC = 2 * D
    cov = got.cov.cpu()
    for a in (GC + 0, 1, GC + D + 1):
        assert (cov[a] == 0).all() and (cov[:, a] == 0).all() and got.bound[a] == 0
    assert got.finite.all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
def test_magnitudes_from_1e_minus30_to_1e30(dtype, device):
    """d and sigma scaled by 1e30 and 1e-30 per column (LR up to 1e30 / 1e-30 too): the
    products (1e60, 1e-60) fit in double; every column finite, entries accurate."""
    B, D = 600, 9
    d, eps, sigma, adv = _node(B, D, torch.float64, "cpu", seed=5)
    scales = torch.tensor([1e30, 1e-30, 1.0], dtype=torch.float64).repeat(3)
    d = d * scales
    sigma = sigma * scales.roll(1)
    d, eps, sigma = (t.to(dtype).to(device) for t in (d, eps, sigma))
    got, (cov, _, _) = check(d, eps, sigma, adv.to(device), ucb=2.0)
    assert got.finite.all() and torch.isfinite(got.cov).all()
    var = got.cov.diagonal().cpu()
    assert var.max() > 1e55 and var.min() < 1e-55


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ucb", (0.0, 2.0))
def test_one_and_two_rows(ucb, device):
    """B = 1: no spread, cov all 0 (a non-finite column still +inf); B = 2: the reference's."""
    d, eps, sigma, adv = _node(1, 4, torch.float32, device, seed=6)
    got, _ = check(d, eps, sigma, adv, ucb=ucb)
    assert (got.cov == 0).all() and (got.bound == 0).all() and got.finite.all()
    d[0, 3] = float("inf")
    got, _ = check(d, eps, sigma, adv, ucb=ucb)
    assert got.cov[8 + 3, 8 + 3] == float("inf") and not got.finite[8 + 3]
    check(*_node(2, 4, torch.float32, device, seed=7), ucb=ucb)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    d, eps, sigma, adv = _node(90, 7, torch.float32, device, seed=8)
    adv2 = torch.stack([adv.float(), adv.float()], 1)[:, 1]
    eps2 = torch.stack([eps, eps], 2)[:, :, 1]
    args = (d.t().contiguous().t(), eps2, sigma.t().contiguous().t(), adv2)
    assert not any(t.is_contiguous() for t in args)
    got, _ = check(*args, ucb=2.0)
    want = tpx_ext.gaussian_tpx_comoments(d, eps, sigma, adv2, ucb=2.0)
    assert torch.equal(got.cov, want.cov) and torch.equal(got.bound, want.bound)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups,ucb", [(1, 0.0), (2, 2.0)])
def test_opcheck(groups, ucb, device):
    node = _node(40, 3, torch.float32, device, seed=9)
    torch.library.opcheck(torch.ops.tpx_ext.gaussian_tpx_comoments.default, (*node, groups, ucb))


def test_errors_name_the_argument():
    d, eps, sigma, adv = _node(10, 3, torch.float32, seed=10)
    op = "gaussian_tpx_comoments: "
    value_errors = [
        ((d[0], eps, sigma, adv), {}, "d must be a 2-D tensor"),
        ((d, eps[:5], sigma, adv), {}, "eps must have the shape of d"),
        ((d, eps, sigma[:, :1], adv), {}, "sigma must have the shape of d"),
        ((d, eps, sigma, adv[:4]), {}, "adv must be a 1-D tensor of B = 10 elements"),
        ((d[:0], eps[:0], sigma[:0], adv[:0]), {}, "d must have B >= 1 rows"),
        ((d, eps, sigma, adv), {"groups": 0}, "groups must be 1 (the mu coordinates) or 2"),
        ((d, eps, sigma, adv), {"groups": 3}, "groups must be 1"),
        ((d, eps, sigma, adv), {"ucb": -1.0}, "ucb must be finite and >= 0"),
        ((d, eps, sigma, adv), {"ucb": float("inf")}, "ucb must be finite and >= 0"),
        ((d, eps, sigma, adv), {"ucb": float("nan")}, "ucb must be finite and >= 0"),
    ]
    for args, kw, msg in value_errors:
        with pytest.raises(ValueError, match=re.escape(op + msg)):
            tpx_ext.gaussian_tpx_comoments(*args, **kw)
    type_errors = [
        ((d, eps, sigma.double(), adv), "sigma has dtype Double but d has dtype Float"),
        ((d.long(), eps.long(), sigma.long(), adv), "d must be float32, float64"),
        ((d, eps, sigma, adv.long()), "adv must be a floating tensor"),
    ]
    for args, msg in type_errors:
        with pytest.raises(TypeError, match=re.escape(op + msg)):
            tpx_ext.gaussian_tpx_comoments(*args)


def test_sigma_is_not_checked():
    """Sigma's values are the caller's concern here: 0 gives non-finite LR columns."""
    d, eps, sigma, adv = _node(20, 2, torch.float32, seed=11)
    sigma[3, 0] = 0.0
    got, _ = check(d, eps, sigma, adv, groups=1)
    assert not got.finite[0] and got.finite[1:].all()


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_device_mismatch_is_named():
    d, eps, sigma, adv = _node(10, 3, torch.float32, seed=12)
    with pytest.raises(ValueError, match="gaussian_tpx_comoments: adv is on cpu but d is on cuda"):
        tpx_ext.gaussian_tpx_comoments(d.cuda(), eps.cuda(), sigma.cuda(), adv)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("B,D,groups", [(1, 1, 2), (33, 5, 1), (2500, 30, 2), (100003, 6, 2), (40, 70, 2)])
@pytest.mark.parametrize("ucb", (0.0, 2.0))
def test_cpu_and_cuda_agree(B, D, groups, ucb):
    node = _node(B, D, torch.float32, "cpu", seed=13)
    cpu = tpx_ext.gaussian_tpx_comoments(*node, groups=groups, ucb=ucb)
    gpu = tpx_ext.gaussian_tpx_comoments(*(t.cuda() for t in node), groups=groups, ucb=ucb)
    assert torch.equal(gpu.finite.cpu(), cpu.finite)
    diag = cpu.cov.diagonal()
    scale = (diag[:, None] * diag[None, :]).sqrt()
    assert bool(((gpu.cov.cpu() - cpu.cov).abs() <= 2 * COV_RTOL * scale).all())
    torch.testing.assert_close(gpu.bound.cpu(), cpu.bound, rtol=2 * COV_RTOL, atol=0)


@pytest.mark.parametrize("B", [3, 7, 33])
def test_reference_covariance_of_a_constant_column_is_exactly_zero(B):
    """Shifting by the first row makes a constant column exactly zero before the mean is
    taken; without it, the mean of B copies of 0.1 is not always 0.1 in float64 and the
    covariance comes out ~1e-30 instead of 0 (at B = 3, 7 and 33 with these values)."""
    x = torch.full((B, 1), 0.1, dtype=torch.float64)
    y = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e3
    y[:, 1] = 1 / 3
    assert torch.equal(reference.covariance(x, y), torch.zeros(1, 2, dtype=torch.float64))
    assert torch.equal(reference.covariance(y, x), torch.zeros(2, 1, dtype=torch.float64))
