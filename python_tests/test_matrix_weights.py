"""The matrix weight rule of tpx (tpx_ext.estimators.weights): the solve against closed forms
and optimality conditions in float64, its edge cases, and the fused node against the reference.

Tolerances: the solve runs in float64 on covariances scaled to unit diagonal, so closed forms
agree to ~1e-12 relative for condition numbers up to ~1e3 (the cases below)."""

import math

import pytest
import torch

from tpx_ext import Estimator, reference
from tpx_ext.estimators.weights import (apply_matrix_weight, loo_matrix_combine, matrix_weight,
                                        pinv_and_null, pinv_weights)


def joint(g_lr, g_rp, ucb=0.0):
    """(cov, bound, finite) of z = [g_LR, g_RP] from the float64 reference."""
    return reference.joint_covariance(g_lr, g_rp, ucb)


def correlated_pair(B=400, C=4, seed=0):
    """LR and RP samples of one mean, correlated across coordinates and with each other."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(B, 1, generator=gen, dtype=torch.float64)
    mix = torch.randn(C, C, generator=gen, dtype=torch.float64)
    g_rp = common * torch.linspace(1, 2, C, dtype=torch.float64) + 0.3 * torch.randn(B, C, generator=gen, dtype=torch.float64) @ mix
    g_lr = g_rp + 2.0 * torch.randn(B, C, generator=gen, dtype=torch.float64) @ mix.T + 0.5 * common
    return g_lr, g_rp


def K_of(*args, **kw):
    """The weight on LR, K, of `matrix_weight`, which also returns L = I - K formed on its own."""
    K, L = matrix_weight(*args, **kw)
    K0, L0 = torch.nan_to_num(K), torch.nan_to_num(L)  # NaN: both estimators non-finite
    err = K0 + L0 - torch.eye(K.shape[0], dtype=K.dtype)
    err = torch.where(torch.isnan(K), 0.0, err)
    assert bool((err.abs() <= 1e-9 * (1 + K0.abs() + L0.abs())).all()), err
    return K


def combine(g_lr, g_rp, K):
    return apply_matrix_weight(g_lr, g_rp, torch.stack([K, torch.eye(K.shape[0], dtype=K.dtype) - K]))


def blocks(cov):
    C = cov.shape[0] // 2
    return cov[:C, :C], cov[C:, C:], cov[:C, C:]


def test_scalar_case_is_the_closed_form_with_the_cross_covariance():
    g_lr, g_rp = correlated_pair(C=1)
    cov, bound, finite = joint(g_lr, g_rp)
    v_lr, v_rp, c = cov[0, 0], cov[1, 1], cov[0, 1]
    K = K_of(cov, bound, finite)
    assert float(K[0, 0]) == pytest.approx(float((v_rp - c) / (v_lr + v_rp - 2 * c)), rel=1e-12)


def test_without_cross_terms_it_is_the_coordinate_wise_rule():
    """Diagonal blocks and no LR-RP covariance: K = diag(v_rp / (v_lr + v_rp))."""
    v_lr = torch.tensor([1.0, 4.0, 1e-6, 3.0], dtype=torch.float64)
    v_rp = torch.tensor([2.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    cov = torch.diag(torch.cat([v_lr, v_rp]))
    K = K_of(cov, cov.diagonal(), torch.ones(8, dtype=torch.bool))
    torch.testing.assert_close(K, torch.diag(v_rp / (v_lr + v_rp)), rtol=1e-12, atol=1e-15)


def test_the_weight_minimises_the_covariance_of_the_combination():
    """First-order condition K M = S_RP - X^T, and any perturbation of K raises the
    covariance of the combined samples in the Loewner order (its change is PSD)."""
    g_lr, g_rp = correlated_pair(C=4)
    cov, bound, finite = joint(g_lr, g_rp)
    S_lr, S_rp, X = blocks(cov)
    M = S_lr + S_rp - X - X.T
    K = K_of(cov, bound, finite)
    torch.testing.assert_close(K @ M, S_rp - X.T, rtol=1e-10, atol=1e-10)

    def comb_cov(K_):
        g = combine(g_lr, g_rp, K_)
        return reference.covariance(g, g)

    base = comb_cov(K)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        E = 0.1 * torch.randn(4, 4, generator=gen, dtype=torch.float64)
        assert torch.linalg.eigvalsh(comb_cov(K + E) - base).min() > -1e-10


def test_the_weight_follows_a_change_of_scale_of_each_coordinate():
    """K(D cov D) = D K D^-1 for a diagonal D (a coordinate in other units), and a common
    factor from 1e-30 to 1e30 leaves K unchanged: no overflow, no loss of precision."""
    g_lr, g_rp = correlated_pair(C=3)
    cov, bound, finite = joint(g_lr, g_rp)
    K = K_of(cov, bound, finite)
    for s in (1e-30, 1e30):
        torch.testing.assert_close(K_of(cov * s * s, bound * s * s, finite), K,
                                   rtol=1e-10, atol=1e-12)
    d = torch.tensor([1e-20, 1.0, 1e20], dtype=torch.float64)
    dd = torch.cat([d, d])
    Ks = K_of(cov * dd[:, None] * dd[None, :], bound * dd * dd, finite)
    torch.testing.assert_close(Ks, d[:, None] * K / d[None, :], rtol=1e-9, atol=1e-12)
    g = combine(g_lr * d * 1e15, g_rp * d * 1e15, Ks)
    torch.testing.assert_close(g / (d * 1e15), combine(g_lr, g_rp, K), rtol=1e-9, atol=1e-9)


def test_singular_and_zero_covariances_stay_finite():
    """Two identical coordinates (rank deficient), a coordinate with no variance, and an
    all-zero covariance: K is finite, solves K M = A on M's range, and takes 0.5 on its
    null space (both estimators exact there), as the coordinate-wise rule does."""
    g_lr, g_rp = correlated_pair(C=3)
    g_lr = torch.cat([g_lr, g_lr[:, :1]], dim=1)  # coordinate 3 copies coordinate 0
    g_rp = torch.cat([g_rp, g_rp[:, :1]], dim=1)
    g_lr[:, 2] = 1.5
    g_rp[:, 2] = 1.5  # both constant: zero variance
    cov, bound, finite = joint(g_lr, g_rp)
    K = K_of(cov, bound, finite)
    assert bool(torch.isfinite(K).all())
    S_lr, S_rp, X = blocks(cov)
    M = S_lr + S_rp - X - X.T
    torch.testing.assert_close(K @ M, S_rp - X.T, rtol=1e-9, atol=1e-9)
    assert float(K[2, 2]) == 0.5 and float(K[2, [0, 1, 3]].abs().max()) == 0.0
    # the combination is the same for the copies, so the copies' gradients stay equal
    g = combine(g_lr, g_rp, K)
    torch.testing.assert_close(g[:, 0], g[:, 3], rtol=1e-9, atol=1e-9)
    zero = torch.zeros(8, 8, dtype=torch.float64)
    torch.testing.assert_close(K_of(zero, zero.diagonal(), torch.ones(8, dtype=torch.bool)),
                               0.5 * torch.eye(4, dtype=torch.float64))
    ones = torch.ones(2, 2, dtype=torch.float64)
    assert all(bool(torch.isfinite(w).all()) for w in pinv_weights(ones, 0 * ones, ones))


def test_nonfinite_coordinates_take_the_other_estimator_or_zero():
    g_lr, g_rp = correlated_pair(C=4)
    g_lr[5, 0] = float("nan")  # LR bad: k 0, RP's gradient
    g_rp[7, 1] = float("inf")  # RP bad: k 1, LR's gradient
    g_lr[9, 2] = g_rp[9, 2] = float("inf")  # both: k NaN, gradient 0
    cov, bound, finite = joint(g_lr, g_rp)
    K = K_of(cov, bound, finite)
    assert float(K[0, 0]) == 0 and float(K[1, 1]) == 1 and math.isnan(float(K[2, 2]))
    off = torch.nan_to_num(K) - torch.diag(torch.nan_to_num(K.diagonal()))
    assert float(off[:, :3].abs().max()) == 0 and float(off[:3, :].abs().max()) == 0
    g = combine(g_lr, g_rp, K)
    assert bool(torch.isfinite(g).all())
    torch.testing.assert_close(g[:, 0], torch.where(torch.isfinite(g_rp[:, 0]), g_rp[:, 0], 0.0))
    torch.testing.assert_close(g[:, 1], torch.where(torch.isfinite(g_lr[:, 1]), g_lr[:, 1], 0.0))
    assert float(g[:, 2].abs().max()) == 0
    # coordinate 3 alone: the scalar closed form on its own samples
    c3 = joint(g_lr[:, 3:], g_rp[:, 3:])
    torch.testing.assert_close(K[3, 3], K_of(*c3)[0, 0], rtol=1e-12, atol=0)


def test_upper_bounds_raise_the_diagonal_only():
    """ucb > 0: each variance is raised to its bound, the covariances between coordinates
    are kept (cov -> cov + diag(bound - var)); a heavy-tailed RP moves K toward LR."""
    g_lr, g_rp = correlated_pair(B=256, C=2)
    g_rp[::17] *= 10  # tails
    cov, bound0, finite = joint(g_lr, g_rp)
    _, bound2, _ = joint(g_lr, g_rp, ucb=2.0)
    assert bool((bound2 > 1.05 * bound0).all())
    K2 = K_of(cov, bound2, finite)
    raised = cov + torch.diag(bound2 - cov.diagonal())
    torch.testing.assert_close(K2, K_of(raised, raised.diagonal(), finite), rtol=1e-12, atol=1e-14)
    assert float(K2.diagonal().min()) > float(K_of(cov, bound0, finite).diagonal().min())


def test_running_averages_of_the_three_blocks():
    running = torch.full((3, 2, 2), float("nan"), dtype=torch.float64)
    covs = []
    for seed in range(3):
        g_lr, g_rp = correlated_pair(B=200, C=2, seed=seed)
        cov, bound, finite = joint(g_lr, g_rp)
        covs.append(torch.stack(blocks(cov)))
        K = K_of(cov, bound, finite, running, momentum=0.5)
    want = 0.5 * (0.5 * covs[0] + 0.5 * covs[1]) + 0.5 * covs[2]
    torch.testing.assert_close(running, want, rtol=1e-12, atol=0)
    S_lr, S_rp, X = want
    torch.testing.assert_close(K @ (S_lr + S_rp - X - X.T), S_rp - X.T, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ the node
from tpx_ext.estimators.node import Node, NodeStats  # noqa: E402
from tpx_ext.estimators.weights import WeightRule  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def node_inputs(B, D, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(B, D, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, D, dtype=torch.float64)
    eps = torch.randn(B, D, generator=gen, dtype=torch.float64)
    sigma = torch.rand(B, D, generator=gen, dtype=torch.float64) + 0.5
    adv = torch.randn(B, generator=gen, dtype=torch.float64) + d[:, 0] * eps[:, 0]  # LR-RP correlated
    return [t.to(dtype=dtype, device=device) for t in (d, eps, sigma)] + [adv.to(device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("needs_sigma", (True, False))
def test_node_matches_the_reference(needs_sigma, dtype, device):
    """A tpx node's backward (fused co-moments, float64 solve) against
    reference.matrix_tpx_backward on the same inputs, over three calls with running averages
    (momentum 0.5) and ucb 2: combined gradients within 1e-6 relative (float32 output: a few
    ulp) or 1e-12 (float64); without a sigma gradient the sigma coordinates are left out."""
    B, D = 300, 3
    C = (2 if needs_sigma else 1) * D
    rule = WeightRule(momentum=0.5, ucb=2.0, weights="matrix")
    running = torch.full((3, C, C), float("nan"), dtype=torch.float64, device=device)
    ref_running = running.cpu().clone()
    for call in range(3):
        d, eps, sigma, adv = node_inputs(B, D, dtype, device, seed=call)
        node = Node(NodeStats("n", 0), None, running, rule, True, None, adv=adv)
        g_mu, g_sigma = node.combine(d, eps, sigma, needs_sigma)
        r_mu, r_sigma, K, cov = reference.matrix_tpx_backward(
            *(t.cpu() for t in (d, eps, sigma, adv)), ref_running, 0.5, 2.0, 2 if needs_sigma else 1)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_mu.cpu().double(), r_mu, **tol)
        if needs_sigma:
            torch.testing.assert_close(g_sigma.cpu().double(), r_sigma, **tol)
        else:
            assert g_sigma is None
        torch.testing.assert_close(node.stats.k.cpu(), K.diagonal(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(running.cpu(), ref_running, rtol=1e-9, atol=0)
    assert g_mu.dtype == dtype and node.stats.k.shape == (C,)


def test_node_refuses_a_bad_sigma():
    d, eps, sigma, adv = node_inputs(8, 2, torch.float64, "cpu")
    sigma[1, 1] = 0.0
    node = Node(NodeStats("n", 0), None, None, WeightRule(weights="matrix"), True, None, adv=adv)
    with pytest.raises(ValueError, match=r"^tpx node: sigma must be finite and > 0 everywhere "
                       r"\(found an entry <= 0, inf or NaN\); pass check_sigma=False to skip "
                       r"this check$"):
        node.combine(d, eps, sigma)


def test_matrix_weights_hold_where_coordinate_weights_fail():
    """proppo's demo (rnn-sigmoid, a rank-one map) at H = 30, batch 128, 48 gradients on the
    suite's common noise: the default tpx stays below rp's variance, where the coordinate-wise
    weights, with or without the bounds, are several times worse than rp (suite: 0.35x against
    4.42x and 3.70x, docs/results/gradvar_matrix_rules.md). With 48 gradients a variance ratio
    of independent Gaussian gradients is off by more than 2x with probability < 1e-3; the
    margins below are 2.9x and 2.2x, and the seeds are fixed."""
    from tpx_ext.experiments import gradvar

    torch.set_num_threads(1)
    rows = gradvar.run("rnn-sigmoid", horizons=(30,), modes=("rp", "lr", "tpx", "tpx-coord", "tpx-paper"),
                       batch=128, reps=48, ref_batches=2, progress=False)
    var = {r["mode"]: r["variance"] for r in rows}
    assert var["rp"] < var["lr"]
    assert var["tpx"] < 1.0 * var["rp"], var
    assert var["tpx-coord"] > 2.0 * var["rp"] and var["tpx-paper"] > 2.0 * var["rp"], var


def test_one_default_per_knob():
    """Each knob's default lives in the mode table (tpx_ext.estimators.modes.KNOBS; ucb's is
    tpx_ext.ops.DEFAULT_UCB, which the op schemas repeat): the op schemas, the Python
    wrappers, the float64 reference, the Estimator, its weight rule and the Dreamer config
    all read it."""
    import dataclasses
    import inspect

    import tpx_ext
    from tpx_ext.dreamer import configs
    from tpx_ext.estimators.modes import KNOBS
    from tpx_ext.estimators.weights import WeightRule

    ucb = KNOBS["ucb"].default
    for op in ("ivw_combine", "gaussian_tpx_backward"):
        schema = getattr(torch.ops.tpx_ext, op).default._schema
        (arg,) = [a for a in schema.arguments if a.name == "ucb"]
        assert arg.default_value == ucb, op
        for fn in (getattr(tpx_ext, op), getattr(reference, op)):
            assert inspect.signature(fn).parameters["ucb"].default == ucb
    assert inspect.signature(tpx_ext.gaussian_tpx_comoments).parameters["ucb"].default == ucb
    defaults = {k: KNOBS[k].default for k in ("weights", "ucb", "momentum")}
    assert tpx_ext.Estimator("tpx").knobs == defaults
    assert {f.name: f.default for f in dataclasses.fields(WeightRule)} == defaults
    assert configs.estimator_knobs(configs.Config()) == defaults
    assert configs.Config().estimator_args == {}  # the config holds no default of its own


def test_leave_one_out_baseline():
    """baseline="leave-one-out": A_i = G_i - mean_{j != i} G_j, with the objective's own
    returns; refused for a batch of one and for other strings."""
    import tpx_ext

    mu = torch.zeros(4, 1, dtype=torch.float64, requires_grad=True)
    graph = tpx_ext.Estimator("lr").graph()
    x = graph.sample(mu, torch.ones_like(mu), 0, baseline="leave-one-out",
                     eps=torch.tensor([[0.5], [-1.0], [2.0], [0.1]], dtype=torch.float64))
    G = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    graph.add_objective(G + 0 * x[:, 0], 0)
    (stats,) = graph.backward()
    torch.testing.assert_close(stats.adv, G - (G.sum() - G) / 3)
    with pytest.raises(ValueError, match="leave-one-out"):
        tpx_ext.Estimator("lr").graph().sample(mu[:1], torch.ones_like(mu[:1]), 0,
                                               baseline="leave-one-out")
    with pytest.raises(ValueError, match="leave-one-out"):
        tpx_ext.Estimator("lr").graph().sample(mu, torch.ones_like(mu), 0, baseline="mean")


# ------------------------------------------------------------- leave-one-out matrix weights
@pytest.mark.parametrize("B, C, ucb, scale", [
    (40, 4, 2.0, 1.0), (40, 4, 0.0, 1.0),   # correlated, with and without the bounds
    (12, 4, 2.0, 1e30),                      # RP 1e30 times LR
    (6, 4, 0.0, 1.0),                        # B <= C + 1: removing a sample loses rank
    (3, 2, 2.0, 1.0),                        # the smallest batch with leave-one-out weights
])
def test_loo_weights_match_the_sample_by_sample_reference(B, C, ucb, scale):
    """Sherman-Morrison's O(B C^2) leave-one-out combination against the reference that
    forms every sample's covariance of the other B - 1 and solves it (1e-9 relative)."""
    g_lr, g_rp = correlated_pair(B, C, seed=B)
    g_rp = g_rp * scale
    g_rp[:, -1] = 2 * g_rp[:, 0]  # a rank-deficient RP block
    cov, bound, _ = joint(g_lr, g_rp, ucb)
    got = loo_matrix_combine(g_lr, g_rp, cov, bound)
    ref = reference.loo_matrix_combine(g_lr, g_rp, ucb)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())


def test_loo_weights_of_two_samples_are_the_batchs():
    """With B = 2 the other sample alone has no covariance: both samples are weighed by the
    batch's matrices (its covariance with the bounds, into pinv_weights)."""
    from tpx_ext.estimators.weights import pinv_weights
    g_lr, g_rp = correlated_pair(2, 3, seed=0)
    cov, bound, _ = joint(g_lr, g_rp, 2.0)
    sig = cov + torch.diag(bound - cov.diagonal())
    S_lr, S_rp, X = sig[:3, :3], sig[3:, 3:], sig[:3, 3:]
    K, L = pinv_weights(S_rp - X.T, S_lr - X, S_lr + S_rp - X - X.T)
    want = g_lr @ K.T + g_rp @ L.T
    got = loo_matrix_combine(g_lr, g_rp, cov, bound)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * want.abs().max().item())


def test_loo_weights_with_dead_and_zero_coordinates_stay_finite():
    """A coordinate without variance in either estimator, and an all-zero node: finite, and a
    constant coordinate passes through unchanged (both estimators agree on it)."""
    g_lr, g_rp = correlated_pair(30, 3, seed=1)
    g_lr[:, 1] = 0.5
    g_rp[:, 1] = 0.5
    cov, bound, _ = joint(g_lr, g_rp, 2.0)
    got = loo_matrix_combine(g_lr, g_rp, cov, bound)
    assert bool(torch.isfinite(got).all()) and torch.allclose(got[:, 1], torch.full((30,), 0.5, dtype=torch.float64))
    zero = torch.zeros(10, 3, dtype=torch.float64)
    cov, bound, _ = joint(zero, zero, 2.0)
    assert torch.equal(loo_matrix_combine(zero, zero, cov, bound), zero)


def test_loo_weights_are_unbiased_where_batch_weights_are_not():
    """Samples where LR is unbiased but noisy and RP carries a noise that is large exactly
    when LR's is: the batch's weights pick, in each batch, the combination that cancels
    the batch's own noise, and their mean over 4000 batches of 8 is off the true mean 1 by
    more than 5 standard errors (measured: +0.063, 6.2 standard errors); the leave-one-out
    weights' mean is within 3 standard errors of 1 (measured: 0.4; they are exactly
    unbiased). The seed is fixed."""
    gen = torch.Generator().manual_seed(0)
    B, n = 8, 4000
    means = {"batch": [], "loo": []}
    for _ in range(n):
        noise = torch.randn(B, 1, generator=gen, dtype=torch.float64)
        g_lr = 1.0 + 3.0 * noise + torch.randn(B, 1, generator=gen, dtype=torch.float64)
        g_rp = 1.0 + 0.5 * torch.randn(B, 1, generator=gen, dtype=torch.float64) ** 3 - 2.0 * noise.abs() + 2.0 * math.sqrt(2 / math.pi)
        cov, bound, finite = joint(g_lr, g_rp, 0.0)
        means["batch"].append(apply_matrix_weight(g_lr, g_rp, matrix_weight(cov, bound, finite)).mean().item())
        means["loo"].append(loo_matrix_combine(g_lr, g_rp, cov, bound).mean().item())
    for rule, xs in means.items():
        x = torch.tensor(xs, dtype=torch.float64)
        means[rule] = (x.mean().item(), x.std().item() / math.sqrt(n))
    (m_b, se_b), (m_l, se_l) = means["batch"], means["loo"]
    assert abs(m_l - 1.0) < 3 * se_l, means
    assert abs(m_b - 1.0) > 5 * se_b, means


def test_loo_weights_refuse_running_statistics():
    with pytest.raises(ValueError, match="keeps no running statistics"):
        tpx_ext_estimator("tpx", weights="matrix-loo", momentum=0.5)


def tpx_ext_estimator(*args, **kw):
    from tpx_ext import Estimator

    return Estimator(*args, **kw)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_loo_node_matches_the_reference(dtype):
    """A tpx node with weights="matrix-loo" (fused co-moments, Sherman-Morrison) against the
    sample-by-sample reference on the node's per-sample gradients (float64: 1e-9; float32
    inputs: the float64 result rounded once, returned in float32)."""
    B, D = 60, 2
    d, eps, sigma, adv = node_inputs(B, D, dtype, "cpu", seed=3)
    node = Node(NodeStats("n", 0), None, None, WeightRule(weights="matrix-loo"), True, None, adv=adv)
    g_mu, g_sigma = node.combine(d, eps, sigma, True)
    assert g_mu.dtype == g_sigma.dtype == dtype
    g_lr, g_rp = reference.gaussian_per_sample(*(t.double() for t in (d, eps, sigma, adv)))
    ref = reference.loo_matrix_combine(g_lr, g_rp, 2.0)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat([g_mu, g_sigma], 1).double(), ref, **tol)


@pytest.mark.parametrize("scale", (2.0, 2.0 ** 14))
@pytest.mark.parametrize("half", (torch.float16, torch.bfloat16), ids=str)
def test_a_scaled_half_node_combines_in_float_and_returns_its_dtype(half, scale):
    """Under AMP the cotangent d arrives multiplied by the loss scale, in half precision;
    the scale exists because the unscaled gradients (here 0.1 / scale, ~6e-6 at 2^14) lie
    below float16's normal range (6.1e-5). The node divides the scale out in float32,
    combines and scales back: for any scale GradScaler sets (down to 2 after back-offs) the
    result is in the half dtype and equals the float32 combination of the unscaled d times
    the scale, rounded once (float16 keeps 11 bits, bfloat16 8: within 2^-9 / 2^-6
    relative). Dividing in float16 would flush d to subnormals and lose most of its bits."""
    d, eps, sigma, adv = node_inputs(64, 3, torch.float32, "cpu")
    d, adv = d * (0.1 / scale), adv * (0.1 / scale)  # the scaled cotangent is ~0.1
    rule = WeightRule(weights="matrix")
    d_half = (d * scale).to(half)  # what autograd hands the node
    ref = Node(NodeStats("n", 0), None, None, rule, True, None, adv=adv)
    want_mu, want_sigma = ref.combine(d_half.float() / scale, eps.to(half).float(), sigma.to(half).float())
    node = Node(NodeStats("n", 0), None, None, rule, True, None, adv=adv)
    node.scale = scale
    g_mu, g_sigma = node.combine(d_half, eps.to(half), sigma.to(half))
    assert g_mu.dtype == half and g_sigma.dtype == half
    tol = 2.0 ** -9 if half == torch.float16 else 2.0 ** -6
    for got, want in ((g_mu, want_mu), (g_sigma, want_sigma)):
        torch.testing.assert_close(got.float() / scale, want, rtol=tol, atol=1e-3 * tol * want.abs().max().item())


def test_reference_matrix_backward_defaults_and_knobs():
    """The reference's defaults are the Estimator's (no running statistics, momentum 0, the
    default ucb, a sigma gradient); ucb reaches its covariance bounds; groups 1 has no sigma
    gradient (None, not an empty tensor)."""
    d, eps, sigma, adv = node_inputs(32, 3, torch.float64, "cpu")
    default = reference.matrix_tpx_backward(d, eps, sigma, adv)
    explicit = reference.matrix_tpx_backward(d, eps, sigma, adv, None, 0.0, reference.DEFAULT_UCB, 2)
    for a, b in zip(default, explicit):
        assert torch.equal(a, b)
    cov_d, bound_d, _ = reference.gaussian_comoments(d, eps, sigma, adv)
    cov_e, bound_e, _ = reference.gaussian_comoments(d, eps, sigma, adv, 2, reference.DEFAULT_UCB)
    assert torch.equal(cov_d, cov_e) and torch.equal(bound_d, bound_e)
    no_bound = reference.matrix_tpx_backward(d, eps, sigma, adv, ucb=0.0)
    assert not torch.allclose(no_bound[0], default[0], rtol=1e-6, atol=0)
    g_mu, g_sigma, K, _ = reference.matrix_tpx_backward(d, eps, sigma, adv, groups=1)
    assert g_sigma is None and g_mu.shape == (32, 3) and K.shape == (3, 3)
    with pytest.raises(ValueError, match="groups must be 1 .mu. or 2 .mu, sigma., got 3"):
        reference.gaussian_comoments(d, eps, sigma, adv, 3)
    # with running statistics the default momentum 0 uses only the current batch
    second = node_inputs(32, 3, torch.float64, "cpu", seed=1)
    runs = [torch.full((3, 6, 6), float("nan"), dtype=torch.float64) for _ in range(2)]
    reference.matrix_tpx_backward(d, eps, sigma, adv, runs[0])
    reference.matrix_tpx_backward(d, eps, sigma, adv, runs[1], 0.0)
    with_default = reference.matrix_tpx_backward(*second, runs[0])
    assert torch.equal(with_default[0], reference.matrix_tpx_backward(*second, runs[1], 0.0)[0])
    assert torch.equal(with_default[0], reference.matrix_tpx_backward(*second)[0])


def test_running_statistics_default_to_the_latest_batch_and_skip_left_out_coordinates():
    """With a running buffer and the default momentum 0 the buffer holds the latest batch's
    statistics (no averaging). A coordinate left out (its LR not finite) keeps its entries
    in the buffer untouched (NaN: no data yet) while the others are updated with momentum,
    and it gets k = 0."""
    B, C = 200, 2
    first, second = (joint(*correlated_pair(B, C, seed=s), ucb=2.0) for s in (1, 2))
    running = torch.full((3, C, C), float("nan"), dtype=torch.float64)
    matrix_weight(*first, running)
    K2 = matrix_weight(*second, running)[0]
    torch.testing.assert_close(K2, matrix_weight(*second)[0], rtol=0, atol=0)
    cov, bound, finite = second
    excess = torch.diag(bound - cov.diagonal())
    want = torch.stack([(cov + excess)[:C, :C], (cov + excess)[C:, C:], (cov + excess)[:C, C:]])
    torch.testing.assert_close(running, want, rtol=1e-15, atol=0)

    partial = finite.clone()
    partial[1] = False  # the LR of coordinate 1
    running = torch.full((3, C, C), float("nan"), dtype=torch.float64)
    matrix_weight(cov, bound, partial, running, 0.5)
    assert torch.isnan(running[:, 1, :]).all() and torch.isnan(running[:, :, 1]).all()
    torch.testing.assert_close(running[:, 0, 0], want[:, 0, 0], rtol=1e-15, atol=0)
    K = matrix_weight(*first[:2], partial, running, 0.5)[0]
    mixed = 0.5 * want[:, 0, 0] + 0.5 * torch.stack(
        [(first[0] + torch.diag(first[1] - first[0].diagonal()))[i, j] for i, j in ((0, 0), (2, 2), (0, 2))])
    torch.testing.assert_close(running[:, 0, 0], mixed, rtol=1e-12, atol=0)
    assert K[1, 1].item() == 0.0 and K[0, 1].item() == 0.0 and K[1, 0].item() == 0.0


# ------------------------------------------------------------------ rows fit at z (jacobian)
def jacobian_inputs(B, D, dtype, device, seed=0):
    """node_inputs and a sigmoid's derivative f'(z) per sample and coordinate, spanning four
    orders of magnitude between samples, with one sample at exactly 0 (a saturated unit)."""
    d, eps, sigma, adv = node_inputs(B, D, dtype, device, seed)
    gen = torch.Generator().manual_seed(100 + seed)
    z = 4 * torch.randn(B, D, generator=gen, dtype=torch.float64)
    jac = torch.sigmoid(z) * torch.sigmoid(-z)
    jac[0] = 0.0
    return d, eps, sigma, adv, jac.to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("needs_sigma", (True, False))
def test_jacobian_node_matches_the_reference(needs_sigma, dtype, device):
    """A node given f'(z) against reference.matrix_tpx_backward(jacobian=...) over three
    calls with running averages (momentum 0.5, one block per mu row and one for the sigma
    rows, as the graph allocates them) and ucb 2: as test_node_matches_the_reference; the
    weights and running statistics of float32 inputs within 1e-5 (f'(z) d is formed in
    float32 by the node, in float64 by the reference)."""
    B, D = 300, 3
    C = (2 if needs_sigma else 1) * D
    rule = WeightRule(momentum=0.5, ucb=2.0, weights="matrix")
    running = torch.full((D + 1, 3, 2 * D, 2 * D), float("nan"), dtype=torch.float64, device=device)
    ref_running = torch.full((D + 1, 3, C, C), float("nan"), dtype=torch.float64)
    for call in range(3):
        d, eps, sigma, adv, jac = jacobian_inputs(B, D, dtype, device, seed=call)
        node = Node(NodeStats("n", 0), None, running, rule, True, None, jacobian=jac, adv=adv)
        g_mu, g_sigma = node.combine(d, eps, sigma, needs_sigma)
        r_mu, r_sigma, K, _ = reference.matrix_tpx_backward(
            *(t.cpu() for t in (d, eps, sigma, adv)), ref_running, 0.5, 2.0,
            2 if needs_sigma else 1, jac.cpu())
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_mu.cpu().double(), r_mu, **tol)
        if needs_sigma:
            torch.testing.assert_close(g_sigma.cpu().double(), r_sigma, **tol)
        # float32: the node scales d by f'(z) in float32 (6e-8 relative per sample)
        stats_tol = dict(rtol=1e-5, atol=1e-9) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(node.stats.k.cpu(), K.diagonal(), **stats_tol)
        torch.testing.assert_close(running[:, :, :C, :C].cpu(), ref_running, equal_nan=True, **stats_tol)
    assert not torch.isnan(ref_running[:D]).any()
    assert torch.isnan(ref_running[D]).all() != needs_sigma  # the sigma block only with sigma rows


def test_jacobian_rows_are_the_regression_at_z():
    """Without bounds, row c of the node's gradient is g_RP,c + (g_LR - g_RP) k_c with k_c
    the least-squares regression of f'(z_c) g_RP,c on -f'(z_c) (g_LR - g_RP) (float64, to
    1e-9): the gradient at z_c, f'(z_c) g_c, has the least batch variance of every row of
    that form (random perturbations of k_c only raise it), and it differs from the plain
    rule's, which minimises the variance at mu."""
    B, D = 400, 3
    d, eps, sigma, adv, jac = jacobian_inputs(B, D, torch.float64, "cpu")
    rule = WeightRule(weights="matrix", ucb=0.0)
    g_mu, g_sigma = Node(NodeStats("n", 0), None, None, rule, True, None, jacobian=jac,
                         adv=adv).combine(d, eps, sigma, False)
    plain, _ = Node(NodeStats("n", 0), None, None, rule, True, None, adv=adv).combine(d, eps, sigma, False)
    assert g_sigma is None
    g_lr, g_rp = adv[:, None] * eps / sigma, d
    a = g_lr - g_rp
    gen = torch.Generator().manual_seed(7)
    for c in range(D):
        w, y = jac[:, c:c + 1] * a, (jac[:, c] * g_rp[:, c])[:, None]
        k = -torch.linalg.pinv(reference.covariance(w, w)) @ reference.covariance(w, y)
        torch.testing.assert_close(g_mu[:, c], g_rp[:, c] + (a @ k)[:, 0], rtol=1e-9, atol=1e-12)
        best = (jac[:, c] * g_mu[:, c]).var()
        for _ in range(5):
            other = g_rp[:, c] + (a @ (k + 0.05 * torch.randn(D, 1, generator=gen, dtype=torch.float64)))[:, 0]
            assert (jac[:, c] * other).var() > best
        assert (g_mu[:, c] - plain[:, c]).abs().max() > 1e-3 * plain[:, c].abs().max()


def test_jacobian_reference_without_bounds():
    """The reference's rows at z take its ucb (0 here: no bounds), as the node does."""
    d, eps, sigma, adv, jac = jacobian_inputs(400, 3, torch.float64, "cpu")
    node = Node(NodeStats("n", 0), None, None, WeightRule(weights="matrix", ucb=0.0), True,
                None, jacobian=jac, adv=adv)
    g_mu, _ = node.combine(d, eps, sigma, False)
    r_mu, _, _, _ = reference.matrix_tpx_backward(d, eps, sigma, adv, None, 0.0, 0.0, 1, jac)
    torch.testing.assert_close(g_mu, r_mu, rtol=1e-12, atol=1e-15)


def small_graph(estimator, jacobian=None, seed=0, B=64, D=3):
    """One node [B, D] with a tanh-shaped objective; returns mu.grad."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(B, D, generator=gen, dtype=torch.float64).requires_grad_()
    sigma = torch.full((B, D), 0.3, dtype=torch.float64)
    graph = estimator.graph(torch.Generator().manual_seed(seed + 1))
    x = graph.sample(mu, sigma, step=0, jacobian=jacobian)
    graph.add_objective(torch.tanh(3 * x).sum(1) * torch.linspace(-1, 2, B, dtype=torch.float64), step=0)
    graph.backward()
    return mu.grad


def test_a_unit_jacobian_is_the_plain_rule_and_other_rules_ignore_it():
    """jacobian = 1 is the plain matrix rule exactly (f = identity); a sample-dependent one
    changes tpx's gradient but not the modes and weight rules that do not use it (lr, mix,
    coordinate and leave-one-out weights), which get the gradient they get without it."""
    from tpx_ext import Estimator

    B, D = 64, 3
    jac = torch.rand(B, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64) ** 4
    tpx = Estimator("tpx")
    plain = small_graph(tpx)
    torch.testing.assert_close(small_graph(tpx, torch.ones(B, D, dtype=torch.float64)), plain,
                               rtol=1e-12, atol=1e-15)
    assert (small_graph(tpx, jac) - plain).abs().max() > 1e-3 * plain.abs().max()
    for name in ("lr", "tpx-coord", "tpx-loo"):
        est = Estimator.from_name(name)
        assert torch.equal(small_graph(est, jac), small_graph(est)), name
    est = Estimator("mix", rho=0.3)
    assert torch.equal(small_graph(est, jac), small_graph(est))


def test_sample_checks_the_jacobian():
    """A jacobian of another shape, not a tensor, or with inf or NaN is refused with the
    reason; a jacobian that requires grad is used detached (it gets no gradient)."""
    from tpx_ext import Estimator

    B, D = 8, 2
    mu, sigma = torch.zeros(B, D), torch.ones(B, D)
    graph = Estimator("tpx").graph()
    with pytest.raises(ValueError, match=r"jacobian must be a tensor of mu's shape \(8, 2\), got \(8,\)$"):
        graph.sample(mu, sigma, 0, jacobian=torch.ones(B))
    with pytest.raises(ValueError, match=r"jacobian must be a tensor of mu's shape \(8, 2\), got list$"):
        graph.sample(mu, sigma, 0, jacobian=[[1.0, 1.0]] * B)
    for bad in (float("inf"), float("nan")):
        jac = torch.ones(B, D)
        jac[3, 1] = bad
        with pytest.raises(ValueError, match=r"^sample: jacobian must be finite everywhere \(found inf or NaN\)$"):
            graph.sample(mu, sigma, 0, jacobian=jac)
    jac = torch.full((B, D), 0.5, dtype=torch.float64, requires_grad=True)
    small_graph(Estimator("tpx"), jac, B=B, D=D)
    assert jac.grad is None


def test_a_jacobian_takes_mus_dtype():
    """A float64 jacobian for a float32 node is used in float32, as mu: the same gradient,
    bit for bit, as the jacobian given in float32."""
    from tpx_ext import Estimator

    B, D = 32, 2
    mu = torch.randn(B, D, generator=torch.Generator().manual_seed(0)).requires_grad_()
    jac = torch.rand(B, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for j in (jac, jac.float()):
        graph = Estimator("tpx").graph(torch.Generator().manual_seed(2))
        x = graph.sample(mu, torch.full((B, D), 0.3), 0, jacobian=j)
        graph.add_objective(torch.tanh(3 * x).sum(1), 0)
        graph.backward()
        grads.append(mu.grad.clone())
        mu.grad = None
    assert grads[0].dtype == torch.float32 and torch.equal(grads[0], grads[1])


def test_jacobian_rows_keep_their_own_running_statistics():
    """With momentum, a node given a jacobian keeps [D + 1, 3, 2D, 2D] float64 running
    blocks (one per mu row, one for the sigma rows), made at its first graph; the same node
    without a jacobian in a later graph, or with another event size, is refused (its
    statistics would not match), naming both shapes."""
    from tpx_ext import Estimator

    B, D = 64, 3
    jac = torch.rand(B, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    est = Estimator("tpx", momentum=0.5)
    small_graph(est, jac, B=B, D=D)
    running = est.running_stats[("node0", 0)]
    assert running.shape == (D + 1, 3, 2 * D, 2 * D) and running.dtype == torch.float64
    assert not torch.isnan(running[:D, :, :D, :D]).any()
    with pytest.raises(ValueError, match=r"node 'node0' at step 0 needs running statistics of "
                       r"shape \(3, 6, 6\) on cpu, but has \(4, 3, 6, 6\) on cpu"):
        small_graph(est, B=B, D=D)
    with pytest.raises(ValueError, match=r"needs running statistics of shape \(5, 3, 8, 8\) on "
                       r"cpu, but has \(4, 3, 6, 6\) on cpu \(a different event shape"):
        small_graph(est, torch.ones(B, 4, dtype=torch.float64), B=B, D=4)
    one = Estimator("tpx", momentum=0.5)  # a batch of one: the rows' blocks from mu's event
    small_graph(one, torch.ones(1, D, dtype=torch.float64), B=1, D=D)
    assert one.running_stats[("node0", 0)].shape == (D + 1, 3, 2 * D, 2 * D)
    coord = Estimator("tpx", weights="coordinate", momentum=0.5)
    small_graph(coord, B=B, D=D)
    with pytest.raises(ValueError, match=r"needs running statistics of shape \(8,\) on cpu, "
                       r"but has \(6,\) on cpu"):
        small_graph(coord, B=B, D=4)


@pytest.mark.parametrize("case", ["zero column", "1e30 and 1e-30", "non-finite sample", "B <= C"])
def test_jacobian_rows_stay_finite_at_the_edges(case):
    """Rows fit at z against the reference where their covariances are zero (a unit
    saturated in every sample), span 1e30 to 1e-30, have a non-finite coordinate (left out:
    the other estimator's gradient), or are singular (fewer samples than coordinates):
    finite wherever one estimator is finite, and equal to the reference to 1e-9."""
    B, D = (4, 3) if case == "B <= C" else (200, 3)
    d, eps, sigma, adv, jac = jacobian_inputs(B, D, torch.float64, "cpu")
    if case == "zero column":
        jac[:, 1] = 0.0
    elif case == "1e30 and 1e-30":
        jac[:, 0] *= 1e30
        jac[:, 2] *= 1e-30
    elif case == "non-finite sample":
        d[5, 2] = float("inf")
    rule = WeightRule(weights="matrix", ucb=2.0)
    node = Node(NodeStats("n", 0), None, None, rule, True, None, jacobian=jac, adv=adv)
    g_mu, g_sigma = node.combine(d, eps, sigma, True)
    r_mu, r_sigma, _, _ = reference.matrix_tpx_backward(d, eps, sigma, adv, None, 0.0, 2.0, 2, jac)
    assert bool(torch.isfinite(g_mu).all()) and bool(torch.isfinite(g_sigma).all())
    torch.testing.assert_close(g_mu, r_mu, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_sigma, r_sigma, rtol=1e-9, atol=1e-12)
    if case == "non-finite sample":  # coordinate 2's RP is out: its LR gradient alone
        torch.testing.assert_close(g_mu[:, 2], adv * eps[:, 2] / sigma[:, 2], rtol=1e-12, atol=0)


def test_the_rank_cut_scales_with_the_largest_eigenvalue():
    """pinv_and_null counts an eigenvalue of the unit-diagonal S as zero below C * 1e-12 of
    the largest: S = [[1, 1 - e], [1 - e, 1]] has eigenvalues 2 - e and e; with e = 1.5e-12
    (below 2 * 1e-12 * 2) S is singular to the rule, S^+ is the pseudo-inverse of its rank-one
    part (entries 1/4) and the null space is the difference direction."""
    e = 1.5e-12
    S = torch.tensor([[1.0, 1.0 - e], [1.0 - e, 1.0]], dtype=torch.float64)
    S_pinv, null = pinv_and_null(S)
    torch.testing.assert_close(S_pinv, torch.full((2, 2), 0.25, dtype=torch.float64), rtol=1e-9, atol=0)
    torch.testing.assert_close(null, torch.tensor([[0.5, -0.5], [-0.5, 0.5]], dtype=torch.float64),
                               rtol=1e-9, atol=1e-12)


def test_the_estimator_checks_sigma_by_default():
    """Estimator's check_sigma defaults to on: a sigma of 0 in a tpx graph is refused in
    backward; check_sigma=False lets it through."""
    for check, raises in ((None, True), (False, False)):
        est = Estimator("tpx") if check is None else Estimator("tpx", check_sigma=check)
        graph = est.graph()
        sigma = torch.ones(8, 2)
        sigma[3, 1] = 0.0
        x = graph.sample(torch.zeros(8, 2, requires_grad=True), sigma, 0)
        graph.add_objective(x.sum(1), 0)
        if raises:
            with pytest.raises(ValueError, match="sigma must be finite and > 0"):
                graph.backward()
        else:
            graph.backward()
