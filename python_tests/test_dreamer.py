"""The Dreamer agent's pieces: shapes, lambda-returns, estimator wiring, non-finite updates."""

import numpy as np
import pytest
import torch

from tpx_ext.configs import build
from tpx_ext.dreamer import Dreamer
from tpx_ext.dreamer.behavior import finite_step, objective_weights
from tpx_ext.dreamer.rssm import gaussian_kl
from tpx_ext.estimators import lambda_return_terms, lambda_returns

B, T, A = 3, 6, 2


def small_cfg(**overrides):
    return build(["debug"], {"horizon": 4, **overrides})


def batch(obs_shape, seed=0):
    rng = np.random.default_rng(seed)
    obs = (rng.integers(0, 256, (B, T, *obs_shape), dtype=np.uint8) if len(obs_shape) == 3
           else rng.standard_normal((B, T, *obs_shape)).astype(np.float32))
    return {"obs": obs, "action": rng.uniform(-1, 1, (B, T, A)).astype(np.float32),
            "reward": rng.random((B, T)).astype(np.float32)}


def test_lambda_returns_hand_computed():
    # gamma = lam = 0.5, H = 2: V_2 = v_2 = 8; V_1 = 2 + 0.5 (0.5*8 + 0.5*8) = 6;
    # V_0 = 1 + 0.5 (0.5*4 + 0.5*6) = 3.5.
    rewards = torch.tensor([[1.0], [2.0]])
    values = torch.tensor([[0.0], [4.0], [8.0]])
    V = lambda_returns(rewards, values, 0.5, 0.5)
    assert torch.equal(V, torch.tensor([[3.5], [6.0]]))
    # lam = 1: discounted reward sum plus bootstrap; lam = 0: one-step TD targets.
    assert torch.equal(lambda_returns(rewards, values, 0.5, 1.0), torch.tensor([[4.0], [6.0]]))
    assert torch.equal(lambda_returns(rewards, values, 0.5, 0.0), torch.tensor([[3.0], [6.0]]))
    with pytest.raises(ValueError, match="H\\+1 = 3"):
        lambda_returns(rewards, values[:2], 0.5, 0.5)


@pytest.mark.parametrize("kind", ["discount", "uniform", "start"])
def test_objective_terms_sum_to_weighted_lambda_returns(kind):
    g = torch.Generator().manual_seed(0)
    H, N, gamma, lam = 7, 5, 0.9, 0.8
    rewards = torch.randn(H, N, generator=g, dtype=torch.float64)
    values = torch.randn(H + 1, N, generator=g, dtype=torch.float64)
    w = objective_weights(kind, H, gamma)
    J = (w[:, None] * lambda_returns(rewards, values, gamma, lam)).sum(0)
    rho = lambda_return_terms(rewards, values, gamma, lam, w)
    torch.testing.assert_close(rho.sum(0), J, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unknown actor_weights"):
        objective_weights("bogus", H, gamma)


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mq, mp = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    sq, sp = torch.rand(4, 3, generator=g) + 0.1, torch.rand(4, 3, generator=g) + 0.1
    D = torch.distributions
    ref = D.kl_divergence(D.Normal(mq, sq), D.Normal(mp, sp)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mq, sq, mp, sp), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("obs_shape", [(5,), (3, 64, 64)], ids=["state", "pixels"])
def test_world_model_shapes(obs_shape):
    cfg = small_cfg()
    agent = Dreamer(obs_shape, A, cfg)
    data = {k: torch.as_tensor(v) for k, v in batch(obs_shape).items()}
    loss, post, metrics = agent.world_model.loss(data)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert post.stoch.shape == (B, T, cfg.stoch) and post.deter.shape == (B, T, cfg.deter)
    assert post.feat.shape == (B, T, cfg.stoch + cfg.deter)
    recon = agent.world_model.decoder(post.feat)
    assert recon.shape == (B, T, *obs_shape)
    assert set(metrics) >= {"obs_loss", "reward_loss", "kl"}


@pytest.mark.parametrize("estimator", ["rp", "lr", "mix", "tpx"])
@pytest.mark.parametrize("latent_nodes", [False, True])
def test_imagination_metrics_shapes(estimator, latent_nodes):
    H = 6
    cfg = small_cfg(estimator=estimator, horizon=H, latent_nodes=latent_nodes)
    agent = Dreamer((5,), A, cfg)
    m = agent.update(batch((5,)))
    assert float(m["model_skipped"]) == 0 and float(m["actor_skipped"]) == 0
    assert torch.isfinite(m["actor_grad_norm"]) and float(m["actor_grad_norm"]) > 0
    if estimator == "rp":
        assert "k_action" not in m
    else:
        assert m["k_action"].shape == (H,)
        k = m["k_action"]
        assert bool(((k >= 0) & (k <= 1)).all())
        if estimator == "lr":
            assert torch.equal(k, torch.ones(H))
        if estimator == "mix":
            torch.testing.assert_close(k, torch.full((H,), cfg.mix_rho))
    # lr: nothing upstream of a latent node needs a gradient (the world model is frozen and
    # REINFORCE does not backprop into the states), so latent nodes have no statistics.
    assert ("k_latent" in m) == (latent_nodes and estimator in ("mix", "tpx"))


def actor_grad(estimator, **kw):
    """The actor's gradient of J from one imagination, with fixed seeds."""
    torch.manual_seed(0)
    cfg = small_cfg(estimator=estimator, horizon=5, actor_entropy=0.0, **kw)
    agent = Dreamer((5,), A, cfg)
    data = {k: torch.as_tensor(v) for k, v in batch((5,)).items()}
    torch.manual_seed(1)
    _, post, _ = agent.world_model.loss(data)
    beh = agent.behavior
    grads = {}
    beh.actor_opt.step = lambda: grads.update(  # capture instead of stepping
        {n: p.grad.clone() for n, p in beh.actor.named_parameters()})
    torch.manual_seed(2)
    beh.update(agent.world_model, post)
    return grads


@pytest.mark.parametrize("latent_nodes", [False, True])
def test_mix_endpoints_reproduce_rp_and_lr(latent_nodes):
    """mix with rho = 0 must give Dreamer's dynamics backprop gradient, rho = 1 the LR one:
    the per-step objective terms, baselines and node wiring are the same in every mode."""
    rp = actor_grad("rp", latent_nodes=latent_nodes)
    lr = actor_grad("lr", latent_nodes=latent_nodes)
    mix0 = actor_grad("mix", mix_rho=0.0, latent_nodes=latent_nodes)
    mix1 = actor_grad("mix", mix_rho=1.0, latent_nodes=latent_nodes)
    for name in rp:
        torch.testing.assert_close(mix0[name], rp[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(mix1[name], lr[name], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(rp[name], lr[name])


def test_finite_step_skips_non_finite_gradients():
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(lin.parameters(), 0.1)
    before = [p.detach().clone() for p in lin.parameters()]
    lin(torch.ones(1, 3)).sum().backward()
    lin.weight.grad[0, 0] = float("nan")
    norm, ok = finite_step(opt, lin.parameters(), clip=1.0)
    assert not ok and not torch.isfinite(norm)
    assert all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))
    assert all(p.grad is None for p in lin.parameters())
    lin(torch.ones(1, 3)).sum().backward()
    norm, ok = finite_step(opt, lin.parameters(), clip=1.0)
    assert ok and not torch.equal(before[0], lin.weight)


def test_non_finite_batch_skips_the_whole_update():
    agent = Dreamer((5,), A, small_cfg())
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    data = batch((5,))
    data["reward"][0, 0] = np.inf
    m = agent.update(data)
    assert float(m["model_skipped"]) == 1 and "actor_grad_norm" not in m
    after = agent.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    m = agent.update(batch((5,)))  # the next finite batch trains normally
    assert float(m["model_skipped"]) == 0 and float(m["actor_skipped"]) == 0


def test_act_returns_bounded_actions_and_carries_state():
    agent = Dreamer((5,), A, small_cfg())
    obs = np.zeros(5, np.float32)
    a, state = agent.act(obs, None, explore=True)
    assert a.shape == (A,) and a.dtype == np.float32 and np.all(np.abs(a) <= 1)
    a2, state2 = agent.act(obs, state, explore=False)
    assert np.all(np.abs(a2) <= 1) and not torch.equal(state[0].deter, state2[0].deter)


def test_imag_starts_subsamples_the_start_states():
    agent = Dreamer((5,), A, small_cfg(imag_starts=5, estimator="tpx"))
    seen = []
    update = agent.behavior.update
    agent.behavior.update = lambda wm, start: seen.append(start.deter.shape) or update(wm, start)
    m = agent.update(batch((5,)))
    assert seen == [(5, agent.cfg.deter)] and float(m["actor_skipped"]) == 0
