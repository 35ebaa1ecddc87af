"""graph.sampler: what it hands to graph.sample (shapes, dtypes, baselines, steps) and
the errors it raises itself. Each test compares against graph.sample called directly with
the same noise, so a sampler that drops or alters an argument fails."""

import re

import pytest
import torch
from torch.distributions import Normal

from tpx_ext.estimators import Estimator

N = 4


def _mu_sigma(dtype=torch.float64, width=2):
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(N, width, generator=gen, dtype=dtype, requires_grad=True)
    sigma = (0.5 + torch.rand(N, width, generator=gen, dtype=dtype)).requires_grad_()
    return mu, sigma


def test_a_pair_is_read_as_mu_then_sigma_and_keywords_reach_graph_sample():
    mu, sigma = _mu_sigma()
    eps = torch.randn(N, 2, dtype=torch.float64)
    graph = Estimator("rp").graph()
    x = graph.sampler("a")((mu, sigma), eps=eps)
    torch.testing.assert_close(x, mu + sigma * eps, rtol=0, atol=0)


def test_a_broadcastable_pair_is_expanded_before_it_becomes_a_node():
    """graph.sample wants one shape; (mu [N, 2], sigma [1, 2]) is what a shared log-std gives."""
    mu, _ = _mu_sigma()
    sigma = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    eps = torch.randn(N, 2, dtype=torch.float64)
    x = Estimator("tpx").graph().sampler("a")(mu, sigma, eps=eps)
    assert x.shape == (N, 2)
    torch.testing.assert_close(x, mu + sigma.expand(N, 2) * eps, rtol=0, atol=0)


@pytest.mark.parametrize("narrow", ["mu", "sigma"])
def test_mixed_dtypes_are_promoted_not_refused(narrow):
    """Under autocast one head may be float16/32 and the other float64: the node takes the
    wider dtype, so the sample equals the float64 computation."""
    mu, sigma = _mu_sigma()
    eps = torch.randn(N, 2, dtype=torch.float64)
    if narrow == "mu":
        mu = mu.float()
    else:
        sigma = sigma.float()
    x = Estimator("tpx").graph().sampler("a")(mu, sigma, eps=eps)
    assert x.dtype == torch.float64
    torch.testing.assert_close(x, mu.double() + sigma.double() * eps, rtol=0, atol=0)


def test_steps_count_from_start_and_names_are_the_samplers():
    mu, sigma = _mu_sigma()
    graph = Estimator("tpx").graph()
    act = graph.sampler("action", start=2)
    for _ in range(3):
        act(Normal(mu, sigma))
    assert [(s.name, s.step) for s in graph.stats] == [("action", 2), ("action", 3), ("action", 4)]
    assert [s.step for s in _stats_of_default_start()] == [0, 1]


def _stats_of_default_start():
    mu, sigma = _mu_sigma()
    graph = Estimator("tpx").graph()
    act = graph.sampler("action")
    act(mu, sigma)
    act(mu, sigma)
    return graph.stats


def _advantages(how: str):
    """lr advantages of two nodes. "sampler": the first with the sampler's baseline, the
    second with a call's own; "direct": the same baselines given to graph.sample; "none":
    no baselines."""
    mu, sigma = _mu_sigma()
    gen = torch.Generator().manual_seed(1)
    eps = [torch.randn(N, 2, generator=gen, dtype=torch.float64) for _ in range(2)]
    b_default = torch.arange(N, dtype=torch.float64)
    b_call = -10 * torch.ones(N, dtype=torch.float64)
    graph = Estimator("lr").graph()
    if how == "direct":
        x0 = graph.sample(mu, sigma, 0, name="a", eps=eps[0], baseline=b_default)
        x1 = graph.sample(mu, sigma, 1, name="a", eps=eps[1], baseline=b_call)
    else:
        act = graph.sampler("a", baseline=b_default if how == "sampler" else None)
        x0 = act(mu, sigma, eps=eps[0])
        x1 = act(mu, sigma, eps=eps[1], baseline=b_call if how == "sampler" else None)
    graph.add_objective(x0.sum(-1), 0)
    graph.add_objective(x1.sum(-1), 1)
    graph.backward()
    return [s.adv for s in graph.stats]


def test_the_samplers_baseline_is_the_default_and_a_calls_baseline_overrides_it():
    direct, sampled = _advantages("direct"), _advantages("sampler")
    for a, b in zip(direct, sampled):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # the baselines are what the advantages subtract: ignoring or swapping one changes them
    plain = _advantages("none")
    torch.testing.assert_close(direct[0], plain[0] - torch.arange(N, dtype=torch.float64))
    torch.testing.assert_close(direct[1], plain[1] + 10)


@pytest.mark.parametrize("start", [-1, 1.5, True, "0"])
def test_a_bad_start_is_refused(start):
    with pytest.raises(ValueError, match=re.escape(f"sampler: start must be an int >= 0, got {start!r}")):
        Estimator("tpx").graph().sampler("a", start=start)


@pytest.mark.parametrize("sigma", [1.0, None])
def test_a_non_tensor_half_of_a_pair_is_refused_by_the_sampler(sigma):
    mu, _ = _mu_sigma()
    args = (mu, sigma) if sigma is not None else ((1.0, mu),)
    with pytest.raises(TypeError, match="^sampler: mu and sigma must be tensors$"):
        Estimator("tpx").graph().sampler("a")(*args)


def test_an_unsupported_distribution_gets_the_whole_message():
    with pytest.raises(TypeError) as info:
        Estimator("tpx").graph().sampler("a")(torch.distributions.Bernoulli(0.5))
    assert str(info.value) == (
        "sampler: cannot draw a node from Bernoulli: pass a torch.distributions.Normal, an "
        "Independent or TransformedDistribution of one (e.g. a tanh-Normal), or (mu, sigma); "
        "for a wrapper class, pass the torch distribution it holds")
