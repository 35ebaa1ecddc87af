"""The estimator API (tpx_ext.estimators): exactness, unbiasedness, returns, chaos, errors."""

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import DEVICES
from torch import nn

import tpx_ext
from tpx_ext import reference
from tpx_ext.estimators import weights
from tpx_ext.estimators.tp import _per_sample_param_grads
from tpx_ext.estimators.weights import WeightRule
from tpx_ext.systems import (ChaoticRotor, GaussianPolicy, LinearGaussian, NoisyRNN,
                             policy_gradient)

K_ROTOR = 3.0
LATENT_STD = 0.1


@pytest.fixture(autouse=True)
def one_thread():
    """Every tensor here is tiny: intra-op threads only add synchronisation, which on a
    shared 2-core machine makes these tests up to 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Toy(nn.Module):
    """A policy and a learnable 'world model' gain: two nodes per step (action, latent)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.policy = GaussianPolicy(2, 8, dtype=dtype)
        self.gain = nn.Parameter(torch.tensor([0.7], dtype=dtype))

    def transition_mean(self, s, a):
        return s + K_ROTOR * torch.sin(s) + self.gain * a


def toy_noise(H, B, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s0 = (torch.rand(B, 1, generator=gen, dtype=dtype) * 2 - 1) * math.pi
    eps_a, eps_z = torch.randn(2, H, B, 1, generator=gen, dtype=dtype)
    return s0.to(device), eps_a.to(device), eps_z.to(device)


def toy_graph_rollout(graph, toy, s0, eps_a, eps_z):
    """Rollout through the API: action u_t and latent s_{t+1} are both nodes of step t."""
    s = s0
    for t in range(eps_a.shape[0]):
        x = graph.cut(torch.cat([torch.sin(s), torch.cos(s)], 1))
        mu, sigma = toy.policy(x)
        baseline = 0.3 * (eps_a.shape[0] - t) * torch.cos(s[:, 0])
        a = graph.sample_tanh(mu, sigma, t, eps=eps_a[t], name="action", baseline=baseline)
        m = toy.transition_mean(graph.cut(s), a)
        s = graph.sample(m, torch.full_like(m, LATENT_STD), t, eps=eps_z[t], name="latent",
                         baseline=baseline)
        graph.add_objective(torch.cos(s[:, 0]), step=t)


def param_grads(module, run):
    module.zero_grad()
    run()
    return [p.grad.clone() for p in module.parameters()]


def assert_all_equal(got, want):
    for g, w in zip(got, want):
        assert torch.equal(g, w), (g - w).abs().max()


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("device", DEVICES)
def test_rp_mode_is_plain_autograd_and_mix0_reproduces_it(device):
    toy = Toy().to(device)
    noise = toy_noise(6, 16, device)

    def plain():
        s0, eps_a, eps_z = noise
        s, J = s0, 0.0
        for t in range(eps_a.shape[0]):
            mu, sigma = toy.policy(torch.cat([torch.sin(s), torch.cos(s)], 1))
            a = torch.tanh(mu + sigma * eps_a[t])
            m = toy.transition_mean(s, a)
            s = m + torch.full_like(m, LATENT_STD) * eps_z[t]
            J = J + torch.cos(s[:, 0])
        J.mean().backward()

    def api(mode, **kw):
        graph = tpx_ext.Estimator(mode, **kw).graph()
        toy_graph_rollout(graph, toy, *noise)
        graph.backward()

    want = param_grads(toy, plain)
    assert_all_equal(param_grads(toy, lambda: api("rp")), want)
    # the TPX node with its weight forced to 0 (total propagation of pure RP)
    assert_all_equal(param_grads(toy, lambda: api("mix", rho=0.0)), want)


@pytest.mark.parametrize("device", DEVICES)
def test_mix1_reproduces_lr(device):
    """Weight forced to 1 with total propagation: everything that flows back past a node
    is discarded there, so the parameters get exactly REINFORCE's gradient."""
    toy = Toy().to(device)
    noise = toy_noise(6, 16, device)

    def api(mode, **kw):
        graph = tpx_ext.Estimator(mode, **kw).graph()
        toy_graph_rollout(graph, toy, *noise)
        graph.backward()

    lr = param_grads(toy, lambda: api("lr"))
    assert all(g.abs().sum() > 0 for g in lr)
    assert_all_equal(param_grads(toy, lambda: api("mix", rho=1.0)), lr)


def test_lr_mode_matches_the_reinforce_surrogate():
    """lr = grad of mean_i sum_t A_t log N(u_t; mu_t, sigma_t) at fixed states, with the
    pre-tanh u as the node (independent implementation, so close, not bit-equal)."""
    toy = Toy(torch.float64)
    s0, eps_a, eps_z = toy_noise(5, 32, "cpu", torch.float64)

    def surrogate():
        s, logps, rewards, baselines = s0, [], [], []
        for t in range(eps_a.shape[0]):
            mu, sigma = toy.policy(torch.cat([torch.sin(s), torch.cos(s)], 1))
            u = (mu + sigma * eps_a[t]).detach()
            m = toy.transition_mean(s, torch.tanh(u))
            z = (m + LATENT_STD * eps_z[t]).detach()
            normal = lambda x, mean, std: torch.distributions.Normal(mean, std).log_prob(x)[:, 0]  # noqa: E731
            logps.append(normal(u, mu, sigma) + normal(z, m, torch.full_like(m, LATENT_STD)))
            baselines.append(0.3 * (eps_a.shape[0] - t) * torch.cos(s[:, 0]))
            rewards.append(torch.cos(z[:, 0]))
            s = z
        G = tpx_ext.returns_to_go(torch.stack(rewards))
        adv = G - torch.stack(baselines)
        (adv * torch.stack(logps)).sum(0).mean().backward()

    def api():
        graph = tpx_ext.Estimator("lr").graph()
        toy_graph_rollout(graph, toy, s0, eps_a, eps_z)
        graph.backward()

    for got, want in zip(param_grads(toy, api), param_grads(toy, surrogate)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_event_shapes_and_dtypes(device, dtype):
    """Nodes of shape [B, 2, 3]: 2D = 12 coordinates, gradients of mu's dtype and shape."""
    mu = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    mu.requires_grad_(True)
    log_std = torch.zeros(2, 3, device=device, dtype=dtype, requires_grad=True)
    graph = tpx_ext.Estimator("tpx").graph(torch.Generator(device).manual_seed(1))
    x = graph.sample(mu, log_std.exp().expand_as(mu), 0)
    graph.add_objective((x**2).sum((1, 2)), 0)
    (stats,) = graph.backward()
    assert stats.k.shape == (12,) and stats.k.dtype == torch.float64
    assert bool(((stats.k >= 0) & (stats.k <= 1)).all()) and int(stats.nonfinite) == 0
    assert mu.grad.shape == mu.shape and mu.grad.dtype == dtype
    assert log_std.grad.shape == (2, 3) and bool(torch.isfinite(log_std.grad).all())


# --------------------------------------------------------------------------- unbiasedness
LINEAR_H = 3


def linear_policy():
    torch.manual_seed(0)
    policy = GaussianPolicy(1, hidden=0, log_std=-1.0, dtype=torch.float64)
    with torch.no_grad():
        policy.mu.weight.fill_(-0.3)
        policy.mu.bias.fill_(0.2)
    return policy


LAGGED = {"momentum": 0.99, "lagged": True, "warm_start": True}


@pytest.mark.parametrize(
    "mode, kw, batch, batches",
    [("rp", {}, 16, 400), ("lr", {}, 16, 400), ("mix", {"rho": 0.3}, 16, 400),
     ("tpx", {"momentum": 0.99}, 16, 400), ("tpx", {}, 256, 100), ("tp", {}, 256, 40),
     ("tpx", LAGGED, 16, 400), ("tpx", {**LAGGED, "projections": 4}, 16, 400)],
)
def test_unbiased_on_linear_gaussian_system(mode, kw, batch, batches):
    """Mean of the batch gradients vs the closed-form gradient of E[sum_t -s_{t+1}^2].

    Tolerance: 5 standard errors of the mean, estimated from the batch gradients.
    For an unbiased estimator the mean is ~normal (CLT), so each of the 3 parameters
    fails with probability ~6e-7 (the seed is fixed, so the outcome is deterministic).

    tpx and tp estimate k from the batch they weight, which biases them by O(1/B):
    here 0.072 (10 standard errors of 1600 batches) on the first coordinate (-0.30) at
    B = 16 and 0.019 at B = 64. So batch-statistics tpx is checked at B = 256, where the
    bias is ~0.7 standard errors of 100 batches (false failures < 1e-5 per coordinate), and
    at B = 16 with momentum 0.99, where the current batch has 1% of the weight's say.
    Lagged weights are independent of the batch they weight (only the first batch uses its
    own statistics): exactly unbiased at B = 16.
    """
    system, policy = LinearGaussian(), linear_policy()
    exact = torch.autograd.grad(system.expected_return(policy, LINEAR_H), list(policy.parameters()))
    exact = torch.cat([g.reshape(-1) for g in exact])
    est = tpx_ext.Estimator(mode, **kw)
    gen = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(batches):
        policy.zero_grad()
        policy_gradient(est, policy, system, LINEAR_H, batch, gen)
        samples.append(torch.cat([p.grad.reshape(-1) for p in policy.parameters()]))
    samples = torch.stack(samples)
    stderr = samples.std(0) / math.sqrt(batches)
    z = (samples.mean(0) - exact) / stderr
    assert bool((z.abs() < 5).all()), f"{mode}: z-scores {z.tolist()} (exact {exact.tolist()})"


# --------------------------------------------------------------------------- returns
def test_returns_to_go_and_baselines_match_tpx_md_section_4():
    """H = 3, gamma = lambda = 1/2, w = (1, 1, 1), r = (1, 2, 3), v(s_0..s_3) = (0.5, 1, 2, 4).

    V_3 = 4, V_2 = 3 + 4/2 = 5, V_1 = 2 + (2 + 5)/4 = 3.75, V_0 = 1 + (1 + 3.75)/4 = 2.1875,
    J = V_0 + V_1 + V_2 = 10.9375. c = (1, 1.25, 1.3125).
    rho = (1 (1 + 1/4), 1.25 (2 + 2/4), 1.3125 (3 + 4/2)) = (1.25, 3.125, 6.5625): sum = J.
    G = (10.9375, 9.6875, 6.5625).
    kappa = (0.75 (1 + 1.25) + 1.3125, 0.75 * 1.25 + 1.3125, 1.3125) = (3, 2.25, 1.3125),
    b = kappa * v(s_t) = (1.5, 2.25, 2.625), A = G - b = (9.4375, 7.4375, 3.9375).
    """
    f64 = torch.float64
    rewards = torch.tensor([[1.0], [2.0], [3.0]], dtype=f64)
    values = torch.tensor([[0.5], [1.0], [2.0], [4.0]], dtype=f64)
    w = torch.ones(3, dtype=f64)
    rho = tpx_ext.lambda_return_terms(rewards, values, 0.5, 0.5, w)
    assert torch.equal(rho[:, 0], torch.tensor([1.25, 3.125, 6.5625], dtype=f64))
    kappa = tpx_ext.baseline_coefficients(0.5, 0.5, w)
    assert torch.equal(kappa, torch.tensor([3.0, 2.25, 1.3125], dtype=f64))
    assert torch.equal(tpx_ext.returns_to_go(rho)[:, 0], torch.tensor([10.9375, 9.6875, 6.5625], dtype=f64))

    # Through the graph: action a_t and latent z_{t+1} of step t both get G_t - b_t.
    graph = tpx_ext.Estimator("tpx").graph()
    mu = torch.zeros(1, 2, dtype=f64, requires_grad=True)
    for t in range(3):
        b = kappa[t] * values[t]
        graph.sample(mu, mu.exp(), t, name="action", baseline=b)
        graph.sample(mu, mu.exp(), t, name="latent", baseline=b)
        graph.add_objective(rho[t], step=t)
    adv = [s.adv.item() for s in graph.backward()]
    assert adv == [9.4375, 9.4375, 7.4375, 7.4375, 3.9375, 3.9375]


def test_start_state_weights_and_constant_values_give_zero_advantage():
    """w = (1, 0, 0) (objective V_0) and every value and return equal to v: b_t = G_t."""
    gamma, lam, v = 0.9, 0.8, 2.0
    w = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    rewards = torch.full((3, 1), (1 - gamma) * v, dtype=torch.float64)  # so that V_t = v
    rho = tpx_ext.lambda_return_terms(rewards, torch.full((4, 1), v, dtype=torch.float64), gamma, lam, w)
    assert rho.sum().item() == pytest.approx(v)  # J = V_0
    G = tpx_ext.returns_to_go(rho)[:, 0]
    torch.testing.assert_close(G, tpx_ext.baseline_coefficients(gamma, lam, w) * v)


def test_objective_steps_without_nodes_are_credited_by_index():
    """Terms of steps before a node are not credited to it; terms after the last node are."""
    graph = tpx_ext.Estimator("tpx").graph()
    mu = torch.zeros(2, 1, requires_grad=True)
    graph.sample(mu, mu.exp(), step=1)
    graph.sample(mu, mu.exp(), step=3)
    graph.add_objective(torch.tensor([1.0, 2.0]), step=0)
    graph.add_objective(torch.tensor([10.0, 20.0]), step=2)
    graph.add_objective(torch.tensor([100.0, 200.0]), step=5)
    graph.add_objective(torch.tensor([1000.0, 2000.0]), step=5)
    s1, s3 = graph.backward()
    assert s1.adv.tolist() == [1110.0, 2220.0] and s3.adv.tolist() == [1100.0, 2200.0]


# --------------------------------------------------------------------------- weights
def test_tp_weight_is_the_trace_of_per_sample_parameter_gradient_covariances():
    """tp's scalar k against per-sample parameter gradients formed one sample at a time."""
    torch.manual_seed(3)
    policy = GaussianPolicy(2, 5, dtype=torch.float64)
    B = 6
    s = torch.randn(B, 2, dtype=torch.float64)
    eps = torch.randn(B, 1, dtype=torch.float64)
    graph = tpx_ext.Estimator("tp").graph()
    mu, sigma = policy(s)
    x = graph.sample(mu, sigma, 0, eps=eps, source=(policy, s))
    graph.add_objective(torch.sin(3 * x[:, 0]), step=0)
    (stats,) = graph.backward()

    adv = torch.sin(3 * (mu + sigma * eps)[:, 0]).detach()
    d = 3 * torch.cos(3 * (mu + sigma * eps)).detach()
    per_lr, per_rp = [], []
    for i in range(B):
        mu_i, sigma_i = policy(s[i : i + 1])
        for cot_mu, cot_sigma, out in (
            (adv[i] * eps[i] / sigma_i.detach(), adv[i] * (eps[i] ** 2 - 1) / sigma_i.detach(), per_lr),
            (d[i], d[i] * eps[i], per_rp),
        ):
            projected = (cot_mu * mu_i + cot_sigma * sigma_i).sum()
            grads = torch.autograd.grad(projected, list(policy.parameters()), retain_graph=True)
            out.append(torch.cat([g.reshape(-1) for g in grads]) / B)
    v_lr = torch.stack(per_lr).var(0).sum()
    v_rp = torch.stack(per_rp).var(0).sum()
    torch.testing.assert_close(stats.var_lr, v_lr.reshape(1), rtol=1e-9, atol=0)
    torch.testing.assert_close(stats.var_rp, v_rp.reshape(1), rtol=1e-9, atol=0)
    torch.testing.assert_close(stats.k, (v_rp / (v_lr + v_rp)).reshape(1), rtol=1e-9, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_tpx_momentum_keeps_running_variances_per_node(device):
    est = tpx_ext.Estimator("tpx", momentum=0.5)
    policy = GaussianPolicy(2, 4).to(device)
    system, gen = ChaoticRotor(), torch.Generator(device).manual_seed(0)
    first = [s.var_lr.clone() for s in policy_gradient(est, policy, system, 3, 8, gen)]
    (run_lr, run_rp) = est.running_stats[("node0", 2)]
    assert torch.equal(run_lr, first[2])  # the first batch replaces the NaN "no data"
    second = policy_gradient(est, policy, system, 3, 8, gen)
    assert sorted(est.running_stats) == [("node0", 0), ("node0", 1), ("node0", 2)]
    torch.testing.assert_close(run_lr, 0.5 * first[2] + 0.5 * second[2].var_lr)
    torch.testing.assert_close(second[2].k, run_rp / (run_lr + run_rp))


# --------------------------------------------------------------------------- weight rules
def _node_inputs(seed, B=16, D=3):
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    d = torch.randn(B, D, generator=gen, dtype=f64) * 10 ** torch.linspace(-1, 1, D, dtype=f64)
    eps = torch.randn(B, D, generator=gen, dtype=f64)
    sigma = torch.rand(B, D, generator=gen, dtype=f64) + 0.5
    adv = torch.randn(B, generator=gen, dtype=f64)
    return d, eps, sigma, adv


def _mixed(k, d, eps, sigma, adv):
    g_lr, g_rp = reference.gaussian_per_sample(d, eps, sigma, adv)
    return k * g_lr + (1 - k) * g_rp


@pytest.mark.parametrize("warm_start", [True, False])
def test_lagged_weights_come_from_the_statistics_before_the_batch(warm_start):
    """Batch n is weighted by the running variances of batches 0..n-1 only; batch 0 by its
    own. Warm start: the running variances are the plain mean of the batches while
    n < 1 / (1 - momentum); without it, an EMA that the first batch initialises."""
    m = 0.8
    rule = WeightRule(momentum=m, lagged=True, warm_start=warm_start)
    running = tpx_ext.new_running_stats(6)
    seen = []
    for n in range(4):
        d, eps, sigma, adv = _node_inputs(n)
        grad_mu, grad_sigma, k, var_lr, var_rp, nonfinite = weights.combine(
            rule, running, n, d, eps, sigma, adv)
        want = reference.gaussian_tpx_backward(d, eps, sigma, adv)
        torch.testing.assert_close(var_lr, want.var_lr, rtol=1e-12, atol=0)
        torch.testing.assert_close(var_rp, want.var_rp, rtol=1e-12, atol=0)
        if n == 0:
            want_k = want.k
        else:
            ema_lr, ema_rp = seen[0]
            for j, (v_lr, v_rp) in enumerate(seen[1:], start=1):
                mj = min(m, j / (j + 1)) if warm_start else m
                ema_lr, ema_rp = mj * ema_lr + (1 - mj) * v_lr, mj * ema_rp + (1 - mj) * v_rp
            want_k = reference.lr_weight(ema_lr, ema_rp)
        torch.testing.assert_close(k, want_k, rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.cat([grad_mu, grad_sigma], 1),
                                   _mixed(want_k, d, eps, sigma, adv), rtol=1e-12, atol=1e-15)
        assert int(nonfinite) == 0
        seen.append((var_lr, var_rp))
    if warm_start:  # n = 0..3 < 1 / (1 - 0.8): the running variances are plain means
        torch.testing.assert_close(running[0], torch.stack([v for v, _ in seen]).mean(0))


def test_lagged_weights_give_way_to_a_nonfinite_batch():
    """A coordinate with a non-finite RP sample takes LR only, whatever the history, and the
    non-finite variance does not enter the running statistics."""
    rule = WeightRule(momentum=0.9, lagged=True, warm_start=True)
    running = tpx_ext.new_running_stats(6)
    weights.combine(rule, running, 0, *_node_inputs(0))
    before = [r.clone() for r in running]
    d, eps, sigma, adv = _node_inputs(1)
    d[3, 0] = float("inf")  # RP of mu_0 and sigma_0 (coordinates 0 and 3) non-finite
    grad_mu, grad_sigma, k, var_lr, var_rp, nonfinite = weights.combine(
        rule, running, 1, d, eps, sigma, adv)
    assert k[0] == 1 and k[3] == 1 and int(nonfinite) == 0
    torch.testing.assert_close(k[[1, 2, 4, 5]], reference.lr_weight(*before)[[1, 2, 4, 5]])
    assert running[1][0] == before[1][0] and running[1][3] == before[1][3]
    assert bool(torch.isfinite(grad_mu).all() & torch.isfinite(grad_sigma).all())


def test_log_domain_statistics_average_log_variances():
    rule = WeightRule(momentum=0.5, lagged=True, log_domain=True)
    running = tpx_ext.new_running_stats(6)
    logs = []
    for n in range(3):
        *_, k, var_lr, var_rp, _ = weights.combine(rule, running, n, *_node_inputs(n))
        logs.append((var_lr.log(), var_rp.log()))
    ema = [0.5 * 0.5 * logs[0][i] + 0.25 * logs[1][i] + 0.5 * logs[2][i] for i in (0, 1)]
    torch.testing.assert_close(running[0], ema[0])
    torch.testing.assert_close(running[1], ema[1])


class FixedModule(nn.Module):
    """(mu, sigma) = (x, exp(x)): a producer without trainable parameters."""

    def forward(self, x):
        return x, x.exp()


def test_projections_of_a_one_parameter_module_reproduce_tp():
    """With one parameter, every random direction scales the per-sample parameter gradients
    by the same factor, so the projected weight is tp's exactly (the noisy recurrent network,
    whose nodes are its states and whose only parameter is the gain)."""
    system = NoisyRNN()
    cell = system.make_policy(0, torch.float64)
    k = {}
    for name, est in (("tp", tpx_ext.Estimator("tp")), ("proj", tpx_ext.Estimator("tpx", projections=3))):
        cell.zero_grad()
        stats = policy_gradient(est, cell, system, 5, 32, torch.Generator().manual_seed(0))
        k[name] = torch.cat([s.k for s in stats])
        k[name + " grad"] = cell.gain.grad.clone()
    per_node = k["proj"].view(5, 4)  # one weight per node, repeated over its coordinates
    assert bool((per_node == per_node[:, :1]).all())
    torch.testing.assert_close(per_node[:, 0], k["tp"], rtol=1e-9, atol=0)
    torch.testing.assert_close(k["proj grad"], k["tp grad"], rtol=1e-9, atol=0)


def test_projected_variance_estimates_the_trace_of_parameter_gradient_covariances():
    """Mean over K random directions v ~ N(0, I) of Var_i(g_i . J_i v) against tp's exact
    trace(C) (C: covariance of the per-sample parameter gradients J_i^T g_i). Its standard
    deviation is sqrt(2 tr(C^2) / K); the test allows 5 of them (false failure < 1e-6)."""
    torch.manual_seed(1)
    policy = GaussianPolicy(3, 6, dtype=torch.float64, out_features=2)
    B, K = 12, 4000
    x = torch.randn(B, 3, dtype=torch.float64)
    g = torch.randn(1, B, 4, dtype=torch.float64)  # per-sample gradients for (mu, sigma)
    t = weights.tangents(policy, (x,), K, torch.Generator().manual_seed(2))
    assert t.shape == (K, B, 4)
    estimate = weights._projected_variance(g.expand(2, B, 4), t, per_coordinate=False)[0, 0]
    per_sample, _ = _per_sample_param_grads(policy, (x,), (g[0, :, :2], g[0, :, 2:]),
                                            (g[0, :, :2], g[0, :, 2:]))
    C = torch.cov(per_sample.T)
    sd = math.sqrt(2 * (C @ C).trace() / K)
    assert abs(estimate - C.trace()) < 5 * sd, (float(estimate), float(C.trace()), sd)


def test_projection_falls_back_to_coordinates_without_trainable_parameters():
    """A node whose module has no trainable parameters weights its coordinates by their own
    variances (tpx's coordinate-wise rule), in tpx with projections as in plain tpx; tp takes
    the traces over those coordinates."""
    mu = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = {}
    for name, est in (("tpx", tpx_ext.Estimator("tpx")), ("proj", tpx_ext.Estimator("tpx", projections=4)),
                      ("tp", tpx_ext.Estimator("tp"))):
        graph = est.graph(torch.Generator().manual_seed(1))
        x = mu.clone().requires_grad_(True)
        m, s = FixedModule()(x)
        y = graph.sample(m, s, 0, source=(FixedModule(), (x,)))
        graph.add_objective(torch.sin(3 * y).sum(1), 0)
        (stats,) = graph.backward()
        k[name] = stats
    assert k["proj"].k.shape == (4,)
    torch.testing.assert_close(k["proj"].k, k["tpx"].k, rtol=1e-12, atol=0)
    v_lr, v_rp = k["tpx"].var_lr.sum(), k["tpx"].var_rp.sum()
    torch.testing.assert_close(k["tp"].k, (v_rp / (v_lr + v_rp)).reshape(1), rtol=1e-9, atol=0)


def test_estimator_state_dict_resumes_exactly():
    """Running statistics, batch counts and projection directions survive a save/load: the
    next gradient is bit-identical."""
    kw = {"momentum": 0.9, "lagged": True, "warm_start": True, "projections": 2}
    system = ChaoticRotor()
    torch.manual_seed(0)
    policy = GaussianPolicy(2, 4, dtype=torch.float64)
    a = tpx_ext.Estimator("tpx", **kw)
    for i in range(2):
        policy_gradient(a, policy, system, 4, 8, torch.Generator().manual_seed(i))
    b = tpx_ext.Estimator("tpx", **kw)
    b.load_state_dict(a.state_dict())
    assert b.running_counts == a.running_counts == {("node0", t): 2 for t in range(4)}
    grads = []
    for est in (a, b):
        policy.zero_grad()
        policy_gradient(est, policy, system, 4, 8, torch.Generator().manual_seed(5))
        grads.append(torch.cat([p.grad.reshape(-1) for p in policy.parameters()]))
    assert torch.equal(grads[0], grads[1])


# --------------------------------------------------------------------------- chaos
CHAOS_HORIZONS = (5, 20, 50)
CHAOS_MARGIN = 2.0


def gradient_variance(mode, horizon, reps=40, batch=32):
    """Trace of the covariance of the policy gradient over `reps` independent batches
    (one fixed policy, the same noise for every mode)."""
    torch.manual_seed(0)
    policy = GaussianPolicy(2, 16)
    est, gen = tpx_ext.Estimator(mode), torch.Generator().manual_seed(horizon)
    grads = []
    for _ in range(reps):
        policy.zero_grad()
        policy_gradient(est, policy, ChaoticRotor(K_ROTOR), horizon, batch, gen)
        grads.append(torch.cat([p.grad.reshape(-1) for p in policy.parameters()]).double())
    grads = torch.stack(grads)
    assert bool(torch.isfinite(grads).all()) or mode == "rp", f"{mode} at H={horizon}: non-finite"
    return grads.var(0).sum().item()


def test_tpx_survives_chaos():
    """RP variance explodes with the horizon, LR's does not; tpx's variance stays within
    CHAOS_MARGIN of the better of the two at every horizon (40 batches: the variance
    estimates are good to ~25%, so a correct tpx passes with a wide margin)."""
    var = {m: [gradient_variance(m, H) for H in CHAOS_HORIZONS] for m in ("rp", "lr", "tpx")}
    assert var["rp"][-1] > 1e6 * var["rp"][0], var  # the system is chaotic
    for i, H in enumerate(CHAOS_HORIZONS):
        best = min(var["rp"][i], var["lr"][i])
        assert var["tpx"][i] <= CHAOS_MARGIN * best, f"H={H}: {var}"


# --------------------------------------------------------------------------- errors
def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="rp, lr, mix, tp, tpx"):
        tpx_ext.Estimator("pathwise")


@pytest.mark.parametrize(
    "kw, match",
    [({"mode": "mix"}, "rho is required"), ({"mode": "tpx", "rho": 0.5}, "rho is required"),
     ({"mode": "mix", "rho": 1.5}, r"\[0, 1\]"), ({"mode": "rp", "momentum": 0.9}, "momentum"),
     ({"mode": "tpx", "momentum": 1.0}, "momentum"),
     ({"mode": "tpx", "lagged": True}, "need running statistics"),
     ({"mode": "lr", "projections": 2}, "tpx' only"), ({"mode": "tpx", "projections": -1}, ">= 0"),
     ({"mode": "tpx", "projection": "param"}, "projection must be")],
)
def test_estimator_options_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        tpx_ext.Estimator(**kw)


def _graph(mode="tpx"):
    return tpx_ext.Estimator(mode).graph()


MU = torch.zeros(4, 2, requires_grad=True)


def _node(graph, step=0, **kw):
    return graph.sample(MU, MU.exp(), step, **kw)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda g: g.sample(MU, torch.ones(4, 1), 0), "same shape"),
        (lambda g: g.sample(MU, torch.ones(4, 2, dtype=torch.float64), 0), "dtype"),
        (lambda g: _node(g, baseline=torch.zeros(4, 1)), r"baseline must have shape \(4,\)"),
        (lambda g: _node(g, step=-1), "step"),
        (lambda g: _node(g, eps=torch.zeros(4)), "eps"),
        (lambda g: [_node(g, name="a"), _node(g, name="a")], "already exists"),
        (lambda g: [_node(g), g.add_objective(torch.zeros(3), 0)], "batch size 3"),
        (lambda g: g.add_objective(torch.zeros(4, 1), 0), r"\[B\] tensor"),
        (lambda g: g.backward(), "no nodes"),
        (lambda g: [_node(g), g.backward()], "no objective"),
        (lambda g: [_node(g), g.backward(extra=torch.zeros(2))], "scalar"),
        (lambda g: _node(_graph("tp")), "source"),
    ],
)
def test_invalid_graph_inputs_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build(_graph())


def test_backward_runs_once_and_closes_the_graph():
    graph = _graph()
    x = graph.sample(MU, MU.exp(), 0)
    graph.add_objective(x.sum(1), 0)
    graph.backward()
    with pytest.raises(RuntimeError, match="already ran"):
        graph.backward()
    with pytest.raises(RuntimeError, match="already ran"):
        graph.sample(MU, MU.exp(), 1)


def test_loss_backward_without_the_graph_is_refused():
    graph = _graph()
    x = graph.sample(MU, MU.exp(), 0)
    with pytest.raises(RuntimeError, match="StochasticGraph.backward"):
        x.sum().backward()


def test_extra_terms_take_plain_autograd():
    """An entropy-like extra term reaches (mu, sigma) directly, outside the weighting."""
    mu = torch.zeros(8, 1, requires_grad=True)
    log_std = torch.zeros(8, 1, requires_grad=True)
    graph = tpx_ext.Estimator("tpx").graph(torch.Generator().manual_seed(0))
    graph.sample(mu, log_std.exp(), 0)
    graph.add_objective(torch.zeros(8), 0)  # zero objective: the node contributes d = 0, A = 0
    graph.backward(extra=log_std.sum())
    assert torch.equal(log_std.grad, torch.ones_like(log_std)) and torch.equal(mu.grad, torch.zeros_like(mu))


# --------------------------------------------------------------------------- docs
def test_api_md_example_runs():
    text = (Path(__file__).parents[1] / "docs" / "API.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/API.md has no python example"
    exec(compile(blocks[0], "docs/API.md", "exec"), {"__name__": "api_md_example"})
