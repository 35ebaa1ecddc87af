"""The Dreamer agent's pieces: shapes, lambda-returns, estimator wiring, non-finite updates."""

import copy
import dataclasses
import os

import numpy as np
import pytest
import torch

from tpx_ext.dreamer.configs import build
from tpx_ext.dreamer.networks import ConvTranspose2dOn1x1
from tpx_ext.dreamer import Dreamer
from tpx_ext.dreamer.behavior import finite_step, objective_weights
from tpx_ext.dreamer.rssm import LatentState, balanced_kl, gaussian_kl
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
    cfg = small_cfg(estimator=estimator, horizon=H, latent_nodes=latent_nodes,
                    **({"estimator_args.rho": 0.5} if estimator == "mix" else {}))
    agent = Dreamer((5,), A, cfg)
    m = agent.update(batch((5,)))
    assert float(m["model_skipped"]) == 0 and float(m["actor_skipped"]) == 0
    assert torch.isfinite(m["actor_grad_norm"]) and float(m["actor_grad_norm"]) > 0
    if estimator == "rp":
        assert "k_action" not in m
    else:
        assert m["k_action"].shape == (H,)
        k = m["k_action"]
        assert bool(torch.isfinite(k).all())  # tpx: the diagonal of a matrix weight
        if estimator != "tpx":
            assert bool(((k >= 0) & (k <= 1)).all())
        if estimator == "lr":
            assert torch.equal(k, torch.ones(H))
        if estimator == "mix":
            torch.testing.assert_close(k, torch.full((H,), cfg.estimator_args["rho"]))
    # lr: nothing upstream of a latent node needs a gradient (the world model is frozen and
    # REINFORCE does not backprop into the states), so latent nodes have no statistics;
    # except in the first update, whose placement check follows the samples into the model.
    m = agent.update(batch((5,), seed=1))
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


@pytest.mark.parametrize("latent_nodes,state_grad", [(False, True), (True, True), (True, False)])
def test_mix_endpoints_reproduce_rp_and_lr(latent_nodes, state_grad):
    """mix with rho = 0 must give Dreamer's dynamics backprop gradient, rho = 1 the LR one:
    the per-step objective terms, baselines and node wiring are the same in every mode."""
    kw = dict(latent_nodes=latent_nodes, actor_state_grad=state_grad)
    rp = actor_grad("rp", **kw)
    lr = actor_grad("lr", **kw)
    mix0 = actor_grad("mix", estimator_args={"rho": 0.0}, **kw)
    mix1 = actor_grad("mix", estimator_args={"rho": 1.0}, **kw)
    for name in rp:
        torch.testing.assert_close(mix0[name], rp[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(mix1[name], lr[name], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(rp[name], lr[name])


def test_actor_state_grad_false_detaches_the_actors_input():
    """DreamerV1 feeds the actor a detached state: the RP gradient then reaches the actor
    only through its actions, and differs from the one through its input state too."""
    seen = {}
    for state_grad in (True, False):
        torch.manual_seed(0)
        agent = Dreamer((5,), A, small_cfg(estimator="rp", actor_state_grad=state_grad))
        beh = agent.behavior
        forward, inputs = beh.actor.forward, []
        beh.actor.forward = lambda feat: inputs.append(feat.requires_grad) or forward(feat)
        data = {k: torch.as_tensor(v) for k, v in batch((5,)).items()}
        post = agent.world_model.loss(data)[1].map(lambda x: x.detach().reshape(-1, x.shape[-1]))
        beh.actor_gradient(agent.world_model, post, beh.estimator, 4)
        # inputs: the H imagined states, then the entropy's (detached) states.
        seen[state_grad] = inputs[:4]
        grads = [p.grad.clone() for p in beh.actor.parameters()]
        seen[state_grad, "grad"] = grads
    assert seen[True] == [False, True, True, True]  # the start states are detached
    assert seen[False] == [False] * 4
    assert any(not torch.allclose(a, b) for a, b in zip(seen[True, "grad"], seen[False, "grad"]))


def test_exploration_noise_is_added_clipped_and_carried():
    obs = np.linspace(-1, 1, 5).astype(np.float32)
    torch.manual_seed(0)
    plain = Dreamer((5,), A, small_cfg())
    for noise in (0.3, 10.0):
        torch.manual_seed(0)
        noisy = Dreamer((5,), A, small_cfg(expl_noise=noise))  # the same initial weights
        torch.manual_seed(1)
        a0, _ = plain.act(obs, None, explore=True)
        eps = torch.randn(1, A)  # the draw that follows the actor's sample
        torch.manual_seed(1)
        a1, state = noisy.act(obs, None, explore=True)
        expected = torch.clamp(torch.as_tensor(a0) + noise * eps[0], -1, 1).numpy()
        np.testing.assert_allclose(a1, expected, rtol=1e-6, atol=1e-7)
        assert not np.allclose(a1, a0) and np.all(np.abs(a1) <= 1)
        np.testing.assert_array_equal(state[1][0].numpy(), a1)  # the executed action is carried
        # The mean action (evaluation) has no noise.
        torch.manual_seed(2)
        m0, _ = plain.act(obs, None, explore=False)
        torch.manual_seed(2)
        m1, _ = noisy.act(obs, None, explore=False)
        np.testing.assert_array_equal(m0, m1)
    # Noise of std 10 saturates: over many steps most actions sit at the bounds, none beyond.
    acts, state = [], None
    for _ in range(50):
        a, state = noisy.act(obs, state, explore=True)
        acts.append(a)
    acts = np.abs(np.array(acts))
    assert acts.max() <= 1 and (acts == 1).mean() > 0.5


@pytest.mark.parametrize("every", [0, 3])
def test_target_critic(every):
    """slow_critic_every 0 (DreamerV1): the imagined values are the critic's own; otherwise
    a copy refreshed every `every` updates."""
    agent = Dreamer((5,), A, small_cfg(slow_critic_every=every))
    beh = agent.behavior
    assert (beh.slow_critic is None) == (every == 0)
    assert (beh.target_critic is beh.critic) == (every == 0)
    assert any(k.startswith("behavior.slow_critic.") for k in agent.state_dict()) == (every > 0)
    data = {k: torch.as_tensor(v) for k, v in batch((5,)).items()}
    for i in range(4):
        agent.update(batch((5,), seed=i))
        post = agent.world_model.loss(data)[1].map(lambda x: x.detach().reshape(-1, x.shape[-1]))
        im = beh.actor_gradient(agent.world_model, post, beh.estimator, 4)
        beh.actor_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            own = beh.critic(im.feats)
        # (A batched evaluation of the same network rounds differently in the last bit.)
        if every == 0 or (i + 1) % every == 0:  # no slow critic, or just copied
            torch.testing.assert_close(im.values, own, rtol=1e-6, atol=1e-6)
        else:
            assert not torch.allclose(im.values, own)


def _kl_inputs():
    g = torch.Generator().manual_seed(0)
    leaf = lambda *shape: torch.randn(*shape, generator=g).requires_grad_(True)  # noqa: E731
    mq, rq, mp, rp = leaf(B, T, 4), leaf(B, T, 4), leaf(B, T, 4), leaf(B, T, 4)
    q = LatentState(mq, torch.nn.functional.softplus(rq) + 0.1, mq, mq)
    p = LatentState(mp, torch.nn.functional.softplus(rp) + 0.1, mp, mp)
    return (mq, rq, mp, rp), q, p


@pytest.mark.parametrize("free_nats", [0.0, 1e3])
def test_kl_balance_zero_is_plain_kl(free_nats):
    """kl_balance 0: DreamerV1's max(KL(q || p), free nats) with gradients into q and p;
    balance 0.5 has the same value and half that gradient."""
    leaves, q, p = _kl_inputs()
    loss, kl = balanced_kl(q, p, 0.0, free_nats)
    D = torch.distributions
    ref_kl = D.kl_divergence(D.Normal(q.mean, q.std), D.Normal(p.mean, p.std)).sum(-1).mean()
    ref = torch.maximum(ref_kl, torch.tensor(free_nats))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(kl, ref_kl.detach())
    g_plain = torch.autograd.grad(loss, leaves, retain_graph=True)
    g_ref = torch.autograd.grad(ref, leaves, retain_graph=True)
    half, _ = balanced_kl(q, p, 0.5, free_nats)
    torch.testing.assert_close(half, ref)
    g_half = torch.autograd.grad(half, leaves, retain_graph=True)
    for a, b, h in zip(g_plain, g_ref, g_half):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(2 * h, a)
        assert bool((a == 0).all()) == (free_nats > 0)
    # Balancing 0.8 trains the prior 4x as hard as the posterior.
    loss8, _ = balanced_kl(q, p, 0.8, 0.0)
    g8 = torch.autograd.grad(loss8, leaves, retain_graph=True)
    if free_nats == 0.0:
        torch.testing.assert_close(g8[0], 0.2 * g_ref[0])
        torch.testing.assert_close(g8[2], 0.8 * g_ref[2])


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



def _trained_with_running_stats(estimator, **kw):
    """An agent after two updates whose tpx nodes keep running statistics (momentum 0.5),
    and a deep copy of its checkpoint state."""
    torch.manual_seed(0)
    cfg = small_cfg(estimator=estimator, estimator_args={"momentum": 0.5}, **kw)
    agent = Dreamer((5,), A, cfg)
    for i in range(2):
        agent.update(batch((5,), seed=i))
    return agent, copy.deepcopy(agent.checkpoint_state())


def _continues_alike(agent, other):
    """One more update of each from the same batch and seed: the same tpx weights."""
    k = []
    for a in (agent, other):
        torch.manual_seed(5)
        k.append(a.update(batch((5,), seed=2))["k_action"])
    torch.testing.assert_close(k[0], k[1], rtol=0, atol=0)


@pytest.mark.parametrize("estimator", ["tpx", "tpx-coord"])
def test_checkpoint_restores_the_running_statistics(estimator):
    """Each node's running statistics ((name, step) -> one [3, C, C] tensor of the matrix
    rule, or the (var_lr, var_rp) pair of the coordinate rule) come back from a checkpoint
    under the same keys with the same values, and the restored agent weighs as the saved one."""
    agent, state = _trained_with_running_stats(estimator, latent_nodes=True)
    saved = agent.behavior.estimator.running_stats
    assert sorted(saved) == sorted((n, t) for n in ("action", "latent") for t in range(4))
    other = Dreamer((5,), A, agent.cfg)
    other.load_checkpoint_state(state)
    loaded = other.behavior.estimator.running_stats
    assert loaded.keys() == saved.keys()
    for key in saved:
        if estimator == "tpx":
            assert torch.equal(loaded[key], saved[key]) and saved[key].shape[0] == 3
        else:
            assert len(loaded[key]) == 2
            assert all(torch.equal(a, b) for a, b in zip(loaded[key], saved[key]))
    assert other.behavior.updates == agent.behavior.updates == 2
    _continues_alike(agent, other)


@pytest.mark.parametrize("precision", ["32", "16"])
def test_a_checkpoint_from_before_the_matrix_rule_and_the_scalers_loads(precision):
    """Checkpoints written before the matrix rule stored each node's running statistics as
    (name, step, var_lr, var_rp), and those written before --precision have no "scalers":
    they load into the coordinate rule's (var_lr, var_rp) pairs, the scalers keep their
    initial state, and the agent weighs as the one that wrote them."""
    agent, state = _trained_with_running_stats("tpx-coord", precision=precision)
    behavior = state["behavior"]
    del behavior["scalers"]
    behavior["running_stats"] = [(n, s, lr, rp) for n, s, (lr, rp) in behavior["running_stats"]]
    other = Dreamer((5,), A, agent.cfg)
    initial = [s.state_dict() for s in (other.behavior.actor_scaler, other.behavior.critic_scaler)]
    other.load_checkpoint_state(state)
    saved, loaded = agent.behavior.estimator.running_stats, other.behavior.estimator.running_stats
    assert loaded.keys() == saved.keys() == {("action", t) for t in range(4)}
    for key, (lr, rp) in saved.items():
        assert len(loaded[key]) == 2
        assert torch.equal(loaded[key][0], lr) and torch.equal(loaded[key][1], rp)
        assert not torch.equal(lr, rp)
    assert [s.state_dict() for s in (other.behavior.actor_scaler,
                                     other.behavior.critic_scaler)] == initial
    _continues_alike(agent, other)


def test_objective_weights_values():
    """w_t of J = sum_t w_t V_t in float64: gamma^t / H, 1 / H, or the start state's V_0."""
    expected = {"discount": [1 / 4, 0.5 / 4, 0.25 / 4, 0.125 / 4], "uniform": [0.25] * 4,
                "start": [1.0, 0.0, 0.0, 0.0]}
    for kind, want in expected.items():
        w = objective_weights(kind, 4, 0.5)
        assert w.dtype == torch.float64
        assert torch.equal(w, torch.tensor(want, dtype=torch.float64)), kind
    assert torch.equal(objective_weights("start", 1, 0.5), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError) as info:
        objective_weights("Discount", 4, 0.5)
    assert str(info.value) == "unknown actor_weights 'Discount'; valid: discount, uniform, start"


def test_the_agents_objective_weights_are_float32_on_the_asked_device_and_cached():
    beh = Dreamer((5,), A, small_cfg(actor_weights="discount", gamma=0.5)).behavior
    w = beh.objective_weights(4, torch.device("cpu"))
    assert w.dtype == torch.float32 and w.device.type == "cpu"
    assert torch.equal(w, objective_weights("discount", 4, 0.5).float())
    assert beh.objective_weights(4, "cpu") is w  # cached per (horizon, device)
    assert beh.objective_weights(3, "cpu").shape == (3,)
    meta = beh.objective_weights(4, "meta")  # a device of its own, not the cpu entry
    assert meta.device.type == "meta" and beh.objective_weights(4, "cpu") is w


def test_actor_critic_follow_the_config():
    """The actor's std and mean bounds, the heads' depths, and the two Adam optimisers over
    their own module's parameters with the configured learning rates and eps."""
    cfg = small_cfg(actor_init_std=3.0, actor_min_std=0.2, actor_mean_scale=2.0,
                    actor_layers=3, critic_layers=1, actor_lr=2e-4, critic_lr=5e-4,
                    adam_eps=1e-6)
    beh = Dreamer((5,), A, cfg).behavior
    actor = beh.actor
    assert (actor.min_std, actor.mean_scale) == (0.2, 2.0)
    with torch.no_grad():
        for layer in actor.net:  # a zero pre-activation: sigma = init_std, mu = 0
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_(), layer.bias.zero_()
        mu, sigma = actor(torch.zeros(1, beh.critic.net[0].in_features))
    torch.testing.assert_close(sigma, torch.full((1, A), 3.0))
    assert torch.equal(mu, torch.zeros(1, A))
    linears = lambda m: sum(isinstance(x, torch.nn.Linear) for x in m.modules())  # noqa: E731
    assert (linears(actor), linears(beh.critic)) == (4, 2)
    for opt, module, lr in ((beh.actor_opt, actor, 2e-4), (beh.critic_opt, beh.critic, 5e-4)):
        assert isinstance(opt, torch.optim.Adam) and len(opt.param_groups) == 1
        group = opt.param_groups[0]
        assert (group["lr"], group["eps"]) == (lr, 1e-6)
        assert [id(p) for p in group["params"]] == [id(p) for p in module.parameters()]


def test_the_slow_critic_is_a_copy_without_gradients():
    """slow_critic_every 1 keeps a slow critic (copied after every update); its parameters
    are the critic's values in tensors of their own, never trained by a gradient."""
    agent = Dreamer((5,), A, small_cfg(slow_critic_every=1))
    beh = agent.behavior
    assert beh.slow_critic is not None and beh.target_critic is beh.slow_critic
    for i in range(2):
        agent.update(batch((5,), seed=i))
        for p, q in zip(beh.slow_critic.parameters(), beh.critic.parameters()):
            assert not p.requires_grad and p.grad is None
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()


@pytest.mark.parametrize("slow_critic_every", [100, 0])  # 0: the values are the critic's own
def test_imagination_trains_the_actor_only(slow_critic_every):
    """actor_gradient leaves gradients in the actor alone: the world model and the critic
    are frozen during it and trainable again after it, also where the critic itself gives
    the imagined values."""
    agent = Dreamer((5,), A, small_cfg(estimator="tpx", slow_critic_every=slow_critic_every))
    assert (agent.behavior.target_critic is agent.behavior.critic) == (slow_critic_every == 0)
    beh = agent.behavior
    data = {k: torch.as_tensor(v) for k, v in batch((5,)).items()}
    post = agent.world_model.loss(data)[1].map(lambda x: x.detach().reshape(-1, x.shape[-1]))
    beh.actor_gradient(agent.world_model, post, beh.estimator, 4)
    assert all(p.grad is not None for p in beh.actor.parameters())
    for module in (agent.world_model, beh.critic):
        assert all(p.grad is None and p.requires_grad for p in module.parameters())


def test_imagined_steps_chain_through_the_rssm():
    """Step t feeds the state's stoch and deter with the sampled action (in [-1, 1]) to the
    GRU; the next state's deter is its output and its stoch the prior's sample
    mean + std * eps of that deter, eps the float32 standard normal draw; the values are the
    target critic's of s_0 .. s_H and the rewards the reward head's of s_1 .. s_H."""
    torch.manual_seed(0)
    cfg = small_cfg(estimator="rp", horizon=3)
    agent = Dreamer((5,), A, cfg)
    wm, beh, S = agent.world_model, agent.behavior, cfg.stoch
    data = {k: torch.as_tensor(v) for k, v in batch((5,)).items()}
    post = wm.loss(data)[1].map(lambda x: x.detach().reshape(-1, x.shape[-1]))
    steps, priors, draws = [], [], []
    deter_step, prior, randn = wm.rssm.deter_step, wm.rssm.prior, torch.randn
    wm.rssm.deter_step = lambda z, a, h: steps.append((z, a, h)) or deter_step(z, a, h)
    wm.rssm.prior = lambda h: priors.append(prior(h)) or priors[-1]

    def spy_randn(*args, **kw):
        draws.append(randn(*args, **kw))
        return draws[-1]
    torch.randn = spy_randn
    try:
        im = beh.actor_gradient(wm, post, beh.estimator, 3)
    finally:
        torch.randn = randn
    latent_draws = [d for d in draws if d.shape == (len(post.deter), S)]
    assert len(steps) == len(priors) == len(latent_draws) == 3
    for t, ((z, a, h), (mean, std), eps) in enumerate(zip(steps, priors, latent_draws)):
        assert torch.equal(z.detach(), im.feats[t, :, :S]) and torch.equal(h.detach(), im.feats[t, :, S:])
        assert a.shape == (len(post.deter), A) and bool((a.abs() <= 1).all())
        assert torch.equal(deter_step(z, a, h).detach(), im.feats[t + 1, :, S:])
        assert eps.dtype == torch.float32
        assert torch.equal((mean + std * eps).detach(), im.feats[t + 1, :, :S])
    with torch.no_grad():
        torch.testing.assert_close(im.values, beh.target_critic(im.feats), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(im.rewards, wm.reward(im.feats[1:]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("state_grad", [True, False])
def test_the_actor_loss_is_minus_the_weighted_returns_and_the_entropy_bonus(state_grad):
    """The loss given to graph.loss is -(mean over starts of sum_t w_t V_t + actor_entropy x
    the mean over steps and starts of the summed log sigma), recomputed from the rollout's
    rewards, values and sigmas [H, N, A]."""
    torch.manual_seed(0)
    cfg = small_cfg(estimator="tpx", horizon=4, actor_entropy=0.3, actor_weights="discount",
                    actor_state_grad=state_grad, gamma=0.9, lam=0.7)
    agent = Dreamer((5,), A, cfg)
    beh = agent.behavior
    data = {k: torch.as_tensor(v) for k, v in batch((5,)).items()}
    post = agent.world_model.loss(data)[1].map(lambda x: x.detach().reshape(-1, x.shape[-1]))
    seen, make_graph = [], beh.estimator.graph

    def graph():
        g = make_graph()
        loss = g.loss
        g.loss = lambda value: seen.append(value.detach()) or loss(value)
        return g
    beh.estimator.graph = graph
    im = beh.actor_gradient(agent.world_model, post, beh.estimator, 4)
    N = len(post.deter)
    assert im.sigma.shape == (4, N, A) and im.values.shape == (5, N) and im.rewards.shape == (4, N)
    with torch.no_grad():
        _, sigma = beh.actor(im.feats[:-1])
    torch.testing.assert_close(im.sigma, sigma, rtol=1e-6, atol=1e-7)
    entropy = im.sigma.log().sum(-1).mean()
    torch.testing.assert_close(im.entropy, entropy)
    w = objective_weights("discount", 4, 0.9)[:, None]
    J = (w * lambda_returns(im.rewards.double(), im.values.double(), 0.9, 0.7)).sum(0).mean()
    (value,) = seen
    torch.testing.assert_close(value.double(), -(J + 0.3 * entropy.double()), rtol=1e-5, atol=1e-6)


def test_node_metrics_average_the_mu_weights_of_each_step():
    """k_<node> [H]: each step's mean LR weight over its mu coordinates (the first half of
    k, NaN ignored); nonfinite_<node>: the count summed over steps; rp's stats (k None) and
    nodes the graph did not have give no metric."""
    from tpx_ext.estimators import NodeStats
    beh = Dreamer((5,), A, small_cfg()).behavior
    nan = float("nan")
    k = [torch.tensor([0.2, 0.4, 0.6, 9.0, 9.0, 9.0], dtype=torch.float64),
         torch.tensor([nan, 1.0, 0.0, 9.0, 9.0, 9.0], dtype=torch.float64)]
    stats = [NodeStats("action", t, k=k[t], nonfinite=torch.tensor(t + 1)) for t in range(2)]
    stats.append(NodeStats("latent", 0, k=None))
    out = beh._node_metrics(stats)
    assert set(out) == {"k_action", "nonfinite_action"}
    assert out["k_action"].dtype == torch.float32
    torch.testing.assert_close(out["k_action"], torch.tensor([0.4, 0.5]))
    assert float(out["nonfinite_action"]) == 3.0
    one = beh._node_metrics([NodeStats("latent", 0, k=k[0], nonfinite=torch.tensor(0))])
    assert set(one) == {"k_latent", "nonfinite_latent"}
    torch.testing.assert_close(one["k_latent"], torch.tensor([0.4]))


def test_a_horizon_of_one_reports_one_weight():
    m = Dreamer((5,), A, small_cfg(estimator="tpx", horizon=1)).update(batch((5,)))
    assert m["k_action"].shape == (1,) and float(m["actor_skipped"]) == 0


def test_the_actor_acts_with_its_mean_or_a_reparameterised_sample():
    """explore=False: tanh(mu), whatever the RNG; explore=True: tanh(mu + sigma eps) with
    eps torch's next standard normal draw."""
    beh = Dreamer((5,), A, small_cfg(actor_init_std=2.0)).behavior
    feat = torch.randn(3, beh.critic.net[0].in_features)
    with torch.no_grad():
        mu, sigma = beh.actor(feat)
        torch.manual_seed(1)
        mean_action = beh.act(feat, explore=False)
        torch.manual_seed(2)
        assert torch.equal(beh.act(feat, explore=False), mean_action)
        assert torch.equal(mean_action, torch.tanh(mu))
        torch.manual_seed(3)
        sampled = beh.act(feat, explore=True)
        torch.manual_seed(3)
        eps = torch.randn_like(mu)
    assert torch.equal(sampled, torch.tanh(mu + sigma * eps))


def test_world_model_layers_follow_the_config():
    """The state encoder has mlp_layers - 1 hidden layers, the decoder mlp_layers, the
    reward head reward_layers, all `hidden` wide; the RSSM's layers are rssm_hidden wide
    and its latents' std is at least latent_min_std."""
    cfg = small_cfg(mlp_layers=3, reward_layers=1, hidden=12, rssm_hidden=10,
                    latent_min_std=0.5)
    wm = Dreamer((5,), A, cfg).world_model
    widths = lambda m: [x.out_features for x in m.modules() if isinstance(x, torch.nn.Linear)]  # noqa: E731
    assert widths(wm.encoder) == [12, 12, 12]
    assert widths(wm.decoder) == [12, 12, 12, 5]
    assert widths(wm.reward) == [12, 1]
    assert wm.rssm.img_in.out_features == 10 and wm.rssm.min_std == 0.5
    data = {k: torch.as_tensor(v) for k, v in batch((5,)).items()}
    with torch.no_grad():
        post, prior = wm.rssm.observe(wm.embed(data["obs"]), data["action"])
    assert float(prior.std.min()) >= 0.5 and float(post.std.min()) >= 0.5


@pytest.mark.parametrize("act", ["relu", "elu"])
def test_pixel_encoder_and_decoder_use_cnn_act(act):
    wm = Dreamer((3, 64, 64), A, small_cfg(cnn_act=act)).world_model
    other = {"relu": torch.nn.ELU, "elu": torch.nn.ReLU}[act]
    want = {"relu": torch.nn.ReLU, "elu": torch.nn.ELU}[act]
    for net in (wm.encoder, wm.decoder):
        kinds = {type(m) for m in net.modules()}
        assert want in kinds and other not in kinds


@pytest.mark.parametrize("shape", [(3, 32, 32), (4, 64, 64), (3, 65, 64), (3, 64, 65)])
def test_pixels_other_than_3x64x64_are_refused(shape):
    with pytest.raises(ValueError) as info:
        Dreamer(shape, A, small_cfg())
    assert str(info.value) == f"the conv encoder needs 3x64x64 pixels, got {shape}"


def test_pixel_world_model_loss_recomputed_from_the_batch():
    """Pixels: the decoder's target is the encoder's scaling obs / 255 - 0.5, its squared
    error summed over channels and pixels; the metrics also hold the model loss and the
    prior's entropy term (summed log std, averaged over the batch)."""
    torch.manual_seed(0)
    cfg = small_cfg(kl_balance=0.8, free_nats=0.0, kl_scale=0.7)
    wm = Dreamer((3, 64, 64), A, cfg).world_model
    data = {k: torch.as_tensor(v) for k, v in batch((3, 64, 64)).items()}
    with torch.no_grad():
        torch.manual_seed(3)
        loss, _, m = wm.loss(data)
        torch.manual_seed(3)
        post, prior = wm.rssm.observe(wm.encoder(data["obs"]), data["action"])
        target = data["obs"].float() / 255 - 0.5
        obs_loss = 0.5 * (wm.decoder(post.feat) - target).pow(2).sum((2, 3, 4)).mean()
        reward_loss = 0.5 * (wm.reward(post.feat) - data["reward"]).pow(2).mean()
        prior_ent = prior.std.log().sum(-1).mean()
    torch.testing.assert_close(m["obs_loss"], obs_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m["model_loss"], loss)
    torch.testing.assert_close(loss, obs_loss + reward_loss + 0.7 * m["kl"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m["prior_ent"], prior_ent)
    assert set(m) == {"model_loss", "obs_loss", "reward_loss", "kl", "prior_ent"}


def test_posterior_is_the_losss_posterior_and_state_obs_may_be_float64():
    torch.manual_seed(0)
    wm = Dreamer((5,), A, small_cfg()).world_model
    data = {k: torch.as_tensor(v) for k, v in batch((5,)).items()}
    with torch.no_grad():
        torch.manual_seed(3)
        _, post, _ = wm.loss(data)
        torch.manual_seed(3)
        again = wm.posterior(data)
        torch.manual_seed(3)
        wide = wm.posterior({**data, "obs": data["obs"].double()})
    for a, b, c in zip(post, again, wide):
        assert a.shape[:2] == (B, T)
        assert torch.equal(a, b) and torch.equal(a, c)


def test_update_metrics_describe_the_update():
    """update takes start states [B, T, ...] (flattened to B x T) and reports the actor's
    and critic's gradient norms, skips and clipping (norm above grad_clip), the imagined
    return V_0 and reward, the actor's std and entropy, all from the rollout it trained on."""
    def run(**kw):
        torch.manual_seed(0)
        agent = Dreamer((5,), A, small_cfg(estimator="tpx", horizon=4, **kw))
        beh = agent.behavior
        data = {k: torch.as_tensor(v) for k, v in batch((5,)).items()}
        post = agent.world_model.loss(data)[1]
        seen, real = [], beh.actor_gradient
        beh.actor_gradient = lambda *a: seen.append(real(*a)) or seen[-1]
        torch.manual_seed(1)
        return beh.update(agent.world_model, post), seen[0], agent.cfg

    m, im, cfg = run()
    assert im.feats.shape == (5, B * T, cfg.stoch + cfg.deter)
    assert set(m) == {"actor_grad_norm", "actor_skipped", "actor_clipped", "critic_loss",
                      "critic_grad_norm", "critic_skipped", "imag_return", "imag_reward",
                      "action_std", "entropy", "k_action", "nonfinite_action"}
    V = lambda_returns(im.rewards, im.values, cfg.gamma, cfg.lam)
    torch.testing.assert_close(m["imag_return"], V[0].mean())
    torch.testing.assert_close(m["imag_reward"], im.rewards.mean())
    torch.testing.assert_close(m["action_std"], im.sigma.mean())
    torch.testing.assert_close(m["entropy"], im.entropy)
    assert float(m["actor_skipped"]) == float(m["critic_skipped"]) == 0.0
    norm = float(m["actor_grad_norm"])
    assert 0 < norm < cfg.grad_clip and float(m["actor_clipped"]) == 0.0
    assert float(m["critic_grad_norm"]) > 0
    at, _, _ = run(grad_clip=norm)  # the same first gradient: not above the clip
    assert float(at["actor_grad_norm"]) == norm and float(at["actor_clipped"]) == 0.0
    below, _, _ = run(grad_clip=norm / 2)
    assert float(below["actor_grad_norm"]) == norm and float(below["actor_clipped"]) == 1.0

def test_act_returns_bounded_actions_and_carries_state():
    agent = Dreamer((5,), A, small_cfg())
    obs = np.zeros(5, np.float32)
    a, state = agent.act(obs, None, explore=True)
    assert a.shape == (A,) and a.dtype == np.float32 and np.all(np.abs(a) <= 1)
    a2, state2 = agent.act(obs, state, explore=False)
    assert np.all(np.abs(a2) <= 1) and not torch.equal(state[0].deter, state2[0].deter)


def test_act_on_a_batch_acts_for_each_environment_separately():
    """--envs: one call on N observations gives N actions, row i depending on obs i only
    (the posterior sample draws the same noise per row under the same seed); a batch of
    one is the single-observation call bit for bit."""
    agent = Dreamer((5,), A, small_cfg())
    obs = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)

    def act(o, explore=True):
        torch.manual_seed(7)
        return agent.act(o, None, explore=explore)

    actions, state = act(obs)
    assert actions.shape == (3, A) and state[0].deter.shape[0] == 3
    changed = obs.copy()
    changed[2] += 1.0
    again, _ = act(changed)
    np.testing.assert_array_equal(again[:2], actions[:2])
    assert not np.array_equal(again[2], actions[2])
    one, _ = act(obs[:1])
    single, _ = act(obs[0])
    np.testing.assert_array_equal(one[0], single)


def test_pixel_world_model_uses_channels_last_with_the_same_loss():
    torch.manual_seed(0)
    agent = Dreamer((3, 64, 64), A, small_cfg())
    convs = [m for m in agent.world_model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    nchw = copy.deepcopy(agent.world_model).to(memory_format=torch.contiguous_format)
    data = {k: torch.as_tensor(v) for k, v in batch((3, 64, 64)).items()}
    torch.manual_seed(1)
    a = agent.world_model.loss(data)[0]
    torch.manual_seed(1)
    b = nchw.loss(data)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_decoders_first_layer_is_the_transposed_convolution_it_replaces(channels_last):
    """ConvTranspose2dOn1x1 against torch's ConvTranspose2d with the same state_dict, in
    float64 (agreement to 1e-12: only the summation order differs), values and gradients."""
    torch.manual_seed(0)
    fast = ConvTranspose2dOn1x1(64, 16, 5, 2).double()
    slow = torch.nn.ConvTranspose2d(64, 16, 5, 2).double()
    slow.load_state_dict(fast.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fast.to(memory_format=fmt)
    x = torch.randn(9, 64, 1, 1, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
    y, want = fast(x), slow(x)
    assert y.shape == want.shape == (9, 16, 5, 5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    g = torch.randn_like(want)
    got = torch.autograd.grad(y, (x, fast.weight, fast.bias), g)
    ref = torch.autograd.grad(want, (x, slow.weight, slow.bias), g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"expects a 1x1 input, got spatial size \(2, 1\)"):
        fast(torch.zeros(1, 64, 2, 1, dtype=torch.float64))
    decoder = Dreamer((3, 64, 64), A, small_cfg()).world_model.decoder
    assert type(decoder.net[0]) is ConvTranspose2dOn1x1
    assert [type(m) for m in decoder.net[1:] if not isinstance(m, torch.nn.ReLU)] == [torch.nn.ConvTranspose2d] * 3


def test_imag_starts_subsamples_the_start_states():
    agent = Dreamer((5,), A, small_cfg(imag_starts=5, estimator="tpx"))
    seen = []
    update = agent.behavior.update
    agent.behavior.update = lambda wm, start: seen.append(start.deter.shape) or update(wm, start)
    m = agent.update(batch((5,)))
    assert seen == [(5, agent.cfg.deter)] and float(m["actor_skipped"]) == 0


@pytest.mark.parametrize("estimator", ["rp", "tpx"])
def test_an_actor_update_moves_the_objective_up(estimator):
    """One real actor step (Adam, world model and critic frozen) raises J = sum_t w_t V_t on
    the same start states and the same noise; an optimiser stepping the wrong way (minimising
    J) lowers it."""
    torch.manual_seed(0)
    cfg = small_cfg(estimator=estimator, horizon=5, actor_entropy=0.0, actor_lr=1e-3)
    agent = Dreamer((5,), A, cfg)
    beh = agent.behavior
    data = {k: torch.as_tensor(v) for k, v in batch((5,)).items()}
    post = agent.world_model.loss(data)[1].map(lambda x: x.detach().reshape(-1, x.shape[-1]))
    weights = beh.objective_weights(cfg.horizon, "cpu")

    def objective():
        torch.manual_seed(1)
        im = beh.actor_gradient(agent.world_model, post, beh.estimator, cfg.horizon)
        V = lambda_returns(im.rewards, im.values, cfg.gamma, cfg.lam)
        return float((weights[:, None] * V).sum(0).mean())

    before = objective()  # also leaves this gradient in .grad
    beh.actor_opt.step()
    beh.actor_opt.zero_grad(set_to_none=True)
    after = objective()
    assert after > before, (before, after)


def test_critic_loss_regresses_each_state_on_its_own_lambda_return():
    """The reported critic loss, recomputed independently from the imagined rollout: v(s_t)
    for t = 0 .. H-1 regresses on V_t = r(s_{t+1}) + gamma((1 - lam) v(s_{t+1}) + lam V_{t+1})
    (V_H = v(s_H), values from the target critic), weighted gamma^t (docs/tensor_shapes.md)."""
    torch.manual_seed(0)
    cfg = small_cfg(estimator="rp", horizon=4)
    agent = Dreamer((5,), A, cfg)
    beh = agent.behavior
    data = {k: torch.as_tensor(v) for k, v in batch((5,)).items()}
    post = agent.world_model.loss(data)[1].map(lambda x: x.detach().reshape(-1, x.shape[-1]))
    seen = []
    real = beh.actor_gradient
    beh.actor_gradient = lambda *a: seen.append(real(*a)) or seen[-1]
    critic_before = {k: v.clone() for k, v in beh.critic.state_dict().items()}
    metrics = beh.update(agent.world_model, post)
    (im,) = seen
    H, gamma, lam = cfg.horizon, cfg.gamma, cfg.lam
    r, v = im.rewards.double(), im.values.double()  # r[t] = r(s_{t+1}), v[t] = v(s_t)
    V = [None] * H
    nxt = v[H]
    for t in reversed(range(H)):
        nxt = r[t] + gamma * ((1 - lam) * v[t + 1] + lam * nxt)
        V[t] = nxt
    critic = copy.deepcopy(beh.critic)
    critic.load_state_dict(critic_before)
    with torch.no_grad():
        pred = critic(im.feats[:-1]).double()  # v(s_0) .. v(s_{H-1})
    want = sum(0.5 * gamma ** t * (pred[t] - V[t]).pow(2).mean() for t in range(H)) / H
    torch.testing.assert_close(metrics["critic_loss"].double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("balance", [0.0, 0.8])
def test_world_model_loss_recomputed_from_the_batch(balance):
    """The reported losses, recomputed independently: the decoder reconstructs obs_t and the
    reward head predicts reward_t (the reward that led to obs_t) from the posterior of step
    t, and the KL of the Gaussians (torch.distributions) is floored at free_nats."""
    from torch.distributions import Independent, Normal, kl_divergence

    torch.manual_seed(0)
    cfg = small_cfg(kl_balance=balance, free_nats=0.5, kl_scale=0.7)
    agent = Dreamer((5,), A, cfg)
    wm = agent.world_model
    data = {k: torch.as_tensor(v) for k, v in batch((5,)).items()}
    with torch.no_grad():
        torch.manual_seed(3)
        loss, _, m = wm.loss(data)
        torch.manual_seed(3)  # the same posterior samples
        post, prior = wm.rssm.observe(wm.embed(data["obs"]), data["action"])
        obs_loss = 0.5 * (wm.decoder(post.feat) - data["obs"]).pow(2).sum(-1).mean()
        reward_loss = 0.5 * (wm.reward(post.feat) - data["reward"]).pow(2).mean()
        kl = kl_divergence(Independent(Normal(post.mean, post.std), 1),
                           Independent(Normal(prior.mean, prior.std), 1)).mean()
        want = obs_loss + reward_loss + 0.7 * torch.clamp(kl, min=0.5)
    for got, expected in ((m["obs_loss"], obs_loss), (m["reward_loss"], reward_loss),
                          (m["kl"], kl), (loss, want)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the trainer around the agent
# (test_train.py runs the trainer end to end; these are its fast checks of resuming and setup)
def _train(logdir, *args):
    from tpx_ext.dreamer.train import main
    return main(["--configs", "debug", "--logdir", str(logdir), "--quiet", "--threads", "1", *args])


@pytest.fixture
def debug_trainer(tmp_path):
    """A new quiet one-thread Trainer of the debug config in tmp_path/r (with overrides),
    closed after the test."""
    from tpx_ext.dreamer.train import Trainer
    made = []

    def make(**overrides):
        made.append(Trainer(build(["debug"], {"threads": "1", **overrides}), str(tmp_path / "r"),
                            quiet=True))
        return made[-1]

    yield make
    for trainer in made:
        trainer.close()


def _run_files(logdir):
    """(metrics without the timing fields, checkpoint counters, agent state (modules,
    optimizers, running statistics), replay arrays)."""
    from tpx_ext.dreamer import checkpoint
    from tpx_ext.dreamer.train import load_run
    from test_train import records
    state = checkpoint.read_state(str(logdir))
    loaded = load_run(str(logdir))  # what gradvar --checkpoint and tpx_ext.evaluate read
    assert loaded.env_steps == state["counters"]["env_steps"]
    assert dataclasses.asdict(loaded.cfg) == state["config"]
    for key, value in loaded.agent.state_dict().items():
        assert torch.equal(value, state["agent"]["modules"][key]), key
    return records(str(logdir)), state["counters"], state["agent"], loaded.replay.state_dict()


def _assert_equal_state(a, b, where="agent"):
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def _assert_same_run(a, b):
    (rec_a, count_a, agent_a, rep_a), (rec_b, count_b, agent_b, rep_b) = a, b
    assert rec_a == rec_b
    assert count_a == count_b
    _assert_equal_state(agent_a, agent_b)
    assert rep_a.keys() == rep_b.keys()
    for key in rep_a:
        np.testing.assert_array_equal(rep_a[key], rep_b[key], err_msg=key)


@pytest.mark.parametrize("legacy_env_rng", [False, True])
def test_a_resumed_run_continues_as_the_uninterrupted_run(tmp_path, legacy_env_rng):
    """400 env steps, then --resume to 800: the same metrics, counters, weights and replay
    as 800 steps in one go (every RNG, the counters and the last evaluation are restored).
    Evaluations every 400 steps, so that the first run's final one is also the whole run's.
    A record written after the checkpoint (by a run killed before its next one) is
    dropped. legacy_env_rng: a checkpoint written before --envs, holding one env_rng."""
    _train(tmp_path / "whole", "--steps", "800", "--eval_every", "400")
    _train(tmp_path / "part", "--steps", "400", "--eval_every", "400")
    if legacy_env_rng:
        path = tmp_path / "part" / "checkpoint.pt"
        state = torch.load(path, weights_only=True)
        (state["env_rng"],) = state.pop("env_rngs")
        torch.save(state, path)
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write('{"step": 600, "train_return": -1.0}\n')
    from tpx_ext.dreamer.train import main
    result = main(["--logdir", str(tmp_path / "part"), "--resume", "--steps", "800", "--quiet"])
    assert result["eval_episodes"] == 1 and np.isfinite(result["eval_return"])
    _assert_same_run(_run_files(tmp_path / "part"), _run_files(tmp_path / "whole"))


def test_resume_past_a_damaged_newest_checkpoint_sets_it_aside(tmp_path, capsys):
    """A truncated checkpoint.pt: --resume continues from checkpoint.prev.pt (with a warning
    naming the file) and renames the damaged one to checkpoint.pt.bad, so the next save
    keeps a readable previous checkpoint instead of rotating the damaged one into it."""
    from tpx_ext.dreamer import checkpoint
    run_dir = tmp_path / "r"
    _train(run_dir, "--steps", "800")  # checkpoints at 400 (prev) and 800
    latest = run_dir / "checkpoint.pt"
    damaged = latest.read_bytes()[:1000]
    latest.write_bytes(damaged)
    capsys.readouterr()
    from tpx_ext.dreamer.train import main
    main(["--logdir", str(run_dir), "--resume", "--steps", "800", "--quiet"])
    err = capsys.readouterr().err
    assert f"{latest}" in err and "using the previous checkpoint" in err and "(env step 400)" in err
    assert (run_dir / "checkpoint.pt.bad").read_bytes() == damaged
    assert checkpoint.safe_load(str(run_dir / "checkpoint.prev.pt"))["counters"]["env_steps"] == 400
    assert checkpoint.read_state(str(run_dir))["counters"]["env_steps"] == 800


def test_resolve_device(monkeypatch):
    from tpx_ext.dreamer.train import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^device 'cuda:1' requested but torch sees no CUDA device$"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # torch.device needs no GPU
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_new_trainer_starts_from_zero_with_its_config_and_settings(tmp_path, monkeypatch):
    """Trainer(cfg, run_dir) starts a run (not a resume, progress shown): config.json, an
    eval/ directory, zero counters, a new metrics file (over one left by a run that
    stopped before its first checkpoint); the environment gets the config's action repeat and
    seed, the torch thread count is set when `threads` > 0, pixel observations are stored as
    uint8, and --tensorboard writes TensorBoard events. The thread counts set are recorded,
    not applied: more than one thread in a process forked from one that used OpenMP (as
    mutation testing runs this) deadlocks."""
    import json
    from tpx_ext.dreamer.train import Trainer
    thread_counts = []
    monkeypatch.setattr(torch, "set_num_threads", thread_counts.append)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 0, "eval_return": 1.0}\n')
    trainer = Trainer(small_cfg(action_repeat=4, seed=3, threads=1), str(tmp_path / "a"))
    assert not trainer.quiet and set(trainer.counters.values()) == {0}
    trainer.logger.write(0, {"eval_return": 2.0})
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == '{"step": 0, "eval_return": 2.0}\n'
    assert ((tmp_path / "a" / "config.json").read_text()
            == json.dumps(dataclasses.asdict(trainer.cfg), indent=2))  # for people to read
    assert (tmp_path / "a" / "eval").is_dir() and thread_counts == [1]
    steps, first = 0, trainer.env.reset()[0]
    while not trainer.env.step(np.zeros((1, trainer.env.action_dim)))[0][2]:
        steps += 1
    assert steps + 1 == 200 // 4  # episode_length 200 physics steps, 4 per action
    trainer.close()
    other = Trainer(small_cfg(seed=4, threads=0), str(tmp_path / "b"))
    assert thread_counts == [1]  # threads 0 keeps torch's setting
    assert not np.array_equal(other.env.reset()[0], first)
    other.close()
    again = Trainer(small_cfg(seed=3), str(tmp_path / "c"))
    np.testing.assert_array_equal(again.env.reset()[0], first)
    again.close()
    pixels = Trainer(small_cfg(obs="pixels", tensorboard=True), str(tmp_path / "p"))
    assert pixels.replay.state_dict()["pending_obs"].dtype == np.uint8
    pixels.close()
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "p" / "tb"))


def test_a_run_logs_every_episode_and_evaluates_and_saves_at_its_cadence(tmp_path, capsys):
    """debug: 200-step episodes, prefill 400, an update every 20 env steps, evaluations every
    600 steps (and of the untrained agent, and at the end), checkpoints every 400 (and at
    the end). The records, counters, printed summary and checkpoints follow exactly."""
    from tpx_ext.dreamer import checkpoint
    from tpx_ext.dreamer.logger import read_metrics
    result = _train(tmp_path / "r", "--steps", "1000")
    records = read_metrics(str(tmp_path / "r" / "metrics.jsonl"))
    evals = [r for r in records if "eval_return" in r]
    train = [r for r in records if "train_return" in r]
    assert [r["step"] for r in evals] == [0, 600, 1000]
    assert all(r["eval_episodes"] == 1 and r["eval_return_std"] == 0.0 for r in evals)
    assert [r["step"] for r in train] == [200, 400, 600, 800, 1000]
    assert [r["episodes"] for r in train] == [1, 2, 3, 4, 5]
    assert [r["evals"] for r in train] == [1, 1, 1, 2, 2]  # each written before its step's eval
    # one update per 20 env steps from the end of the prefill (400) on
    assert [r["updates"] for r in train] == [0, 1, 11, 21, 31]
    assert all(r["episode_length"] == 200 and r["env_steps_per_second"] > 0 for r in train)
    assert "model_loss" not in train[0] and np.isfinite(train[1]["model_loss"])
    assert all(r["model_skipped"] == r["actor_skipped"] == r["critic_skipped"] == 0 for r in train)
    assert result == {k: evals[-1][k] for k in ("eval_return", "eval_return_std", "eval_episodes")}
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"tpx_ext.train | cartpole_balance (state) | estimator tpx | horizon 5 | "
                      f"1000 env steps | device cpu | run dir {tmp_path / 'r'}")
    assert out[1] == (f"final eval return: {result['eval_return']:.1f} +- 0.0 (1 episodes) after "
                      f"1000 env steps, 31 updates (0 model / 0 actor updates skipped as "
                      f"non-finite); curves: python -m tpx_ext.plot {tmp_path / 'r'}")
    assert checkpoint.read_state(str(tmp_path / "r"))["counters"]["env_steps"] == 1000
    previous = checkpoint.safe_load(str(tmp_path / "r" / "checkpoint.prev.pt"))
    assert previous["counters"]["env_steps"] == 800
    assert previous["last_eval"] == {k: v for k, v in evals[1].items() if k != "step"}


def test_an_interrupted_run_says_where_to_continue_and_keeps_its_checkpoint(tmp_path, monkeypatch, capsys):
    """Ctrl-C during training: the run stops with KeyboardInterrupt after printing the env
    step it reached, the step of its last checkpoint and the command that continues it, and
    --resume continues from that checkpoint."""
    from tpx_ext.dreamer import checkpoint
    from tpx_ext.dreamer.agent import Dreamer
    from tpx_ext.dreamer.train import main
    update, calls = Dreamer.update, []

    def interrupted(self, batch):
        calls.append(1)
        if len(calls) == 15:  # updates at 400, 420, ...: the 15th at 680 env steps
            raise KeyboardInterrupt
        return update(self, batch)

    monkeypatch.setattr(Dreamer, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "r", "--steps", "1000")
    err = capsys.readouterr().err
    run_dir = tmp_path / "r"
    assert (f"interrupted at 680 env steps; the last checkpoint is at 400 steps. Continue "
            f"with:\n  python -m tpx_ext.train --logdir {run_dir} --resume") in err
    assert checkpoint.read_state(str(run_dir))["counters"]["env_steps"] == 400
    monkeypatch.setattr(Dreamer, "update", update)
    main(["--logdir", str(run_dir), "--resume", "--quiet"])
    assert checkpoint.read_state(str(run_dir))["counters"]["env_steps"] == 1000


def test_a_run_interrupted_before_its_first_checkpoint_is_started_again(tmp_path, monkeypatch, capsys):
    """Ctrl-C before the first checkpoint: nothing to resume, so the message says so
    (rather than offering --resume, which would refuse), and the same command starts over."""
    from tpx_ext.dreamer import checkpoint
    from tpx_ext.dreamer.train import Trainer

    def interrupted(self, bar):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_episode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "r", "--steps", "600")
    assert capsys.readouterr().err.endswith(
        "\ninterrupted at 0 env steps, before the run's first checkpoint (every 400 env steps): "
        "there is nothing to resume; the same command starts the run again\n")
    assert not checkpoint.exists(str(tmp_path / "r"))
    monkeypatch.undo()
    _train(tmp_path / "r", "--steps", "400")
    assert checkpoint.read_state(str(tmp_path / "r"))["counters"]["env_steps"] == 400


@pytest.fixture
def drawn_frames(monkeypatch):
    """Environments draw a numbered blank frame instead of rendering: mutation testing runs
    every mutant in a process forked from one that ran these tests, and dm_control's render
    thread does not survive a fork. Real frames are checked by test_train.py's pixel run."""
    from tpx_ext.dreamer import envs, train
    drawn = []

    def render(self, size=64):
        drawn.append(1)
        return np.full((3, size, size), len(drawn) % 256, np.uint8)

    monkeypatch.setattr(envs.DMCEnv, "render", render)
    monkeypatch.setattr(train, "rendering_error", lambda: None)
    return drawn


def test_evaluate_returns_each_episode_and_draws_the_first(drawn_frames):
    """evaluate(): one return per episode, the frames of the first episode only (one per
    step, 64 x 64, as the environment draws them), the same returns for the same seed, the
    policy's samples with `explore`, and the caller's torch RNG untouched."""
    from tpx_ext.dreamer.train import evaluate
    cfg = small_cfg(episode_length=40)
    agent = Dreamer((5,), 1, cfg)
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    returns, frames = evaluate(agent, cfg, seed=7, episodes=2, frames=True)
    assert torch.equal(torch.rand(3), expected_next)
    assert len(returns) == 2 and len(drawn_frames) == len(frames) == 40 // 2
    assert [int(f[0, 0, 0]) for f in frames] == list(range(1, 21))
    assert frames[0].shape == (3, 64, 64)
    again, none = evaluate(agent, cfg, seed=7, episodes=2)
    assert again == returns and none == [] and len(drawn_frames) == 20
    assert evaluate(agent, cfg, seed=8, episodes=2)[0] != returns
    assert evaluate(agent, cfg, seed=7, episodes=2, explore=True)[0] != returns


class _RecordingPolicy:
    """An agent for evaluate(): a fixed action; every observation it was shown, and the
    recurrent state it was given (its state counts its decisions in the episode)."""
    device = torch.device("cpu")

    def __init__(self, action):
        self.action, self.seen, self.states = np.asarray(action, np.float32), [], []

    def act(self, obs, state, explore=False):
        self.seen.append(obs)
        self.states.append(state)
        return self.action, (state or 0) + 1


def test_evaluate_steps_its_own_seeded_environment_and_sums_each_episodes_rewards():
    """evaluate()'s episodes are those of make_env(task, obs, action_repeat, seed,
    episode_length): replaying the recorded actions in a fresh environment built so gives
    the same observations (the seed's initial states), as many decisions as the action
    repeat allows, and returns equal to the sums of its rewards."""
    from tpx_ext.dreamer.envs import make_env
    from tpx_ext.dreamer.train import evaluate
    cfg = small_cfg(episode_length=30, action_repeat=3)  # not make_env's default repeat of 2
    policy = _RecordingPolicy([0.4])
    returns, frames = evaluate(policy, cfg, seed=7, episodes=2)
    assert frames == [] and len(policy.seen) == 2 * 30 // 3
    assert policy.states == 2 * [None, *range(1, 10)]  # carried within an episode only
    expected = []
    with make_env(cfg.task, "state", 3, seed=7, episode_length=30) as env:
        for episode in range(2):
            obs, done, ret = env.reset(), False, 0.0
            for step in range(10):
                assert np.array_equal(obs, policy.seen[10 * episode + step])
                assert not done
                obs, reward, done, _ = env.step(policy.action)
                ret += reward
            assert done
            expected.append(ret)
    assert returns == expected and expected[0] != 0.0
    with make_env(cfg.task, "state", 3, seed=0, episode_length=30) as env:
        assert not np.array_equal(env.reset(), policy.seen[0])  # the seed matters


def test_evaluate_shows_a_pixel_run_its_observations_without_rendering_again(drawn_frames, monkeypatch):
    """With pixel observations the first episode's frames are the observations the agent
    was shown (rendered once each: the first and every step's), not a second rendering."""
    from tpx_ext.dreamer import envs
    from tpx_ext.dreamer.train import evaluate
    monkeypatch.setattr(envs, "rendering_error", lambda: None)
    cfg = small_cfg(obs="pixels", episode_length=8)
    policy = _RecordingPolicy([0.0])
    returns, frames = evaluate(policy, cfg, seed=7, episodes=1, frames=True)
    assert len(returns) == 1 and len(policy.seen) == 8 // 2
    assert all(f is o for f, o in zip(frames, policy.seen)) and len(frames) == 4
    assert len(drawn_frames) == len(policy.seen) + 1  # the last observation ends the episode


@pytest.mark.parametrize("renders", [True, False])
def test_a_state_run_saves_evaluation_gifs_or_warns_once(tmp_path, capsys, monkeypatch, drawn_frames,
                                                       renders):
    """--eval_gif on a state task: one GIF per evaluation, named by the env step, of the
    first evaluation episode's frames; where no OpenGL backend loads, one warning for the
    whole run and training goes on without GIFs."""
    from PIL import Image
    from tpx_ext.dreamer import train
    if not renders:
        monkeypatch.setattr(train, "rendering_error", lambda: "no OpenGL (test)")
    _train(tmp_path / "r", "--steps", "600", "--eval_gif", "true", "--episode_length", "40")
    gifs = sorted(p.name for p in (tmp_path / "r" / "eval").iterdir())
    err = capsys.readouterr().err
    warning = ("warning: evaluation GIFs are skipped: no OpenGL (test) (--eval_gif false "
               "silences this)")
    if renders:
        assert gifs == ["step_000000000.gif", "step_000000600.gif"] and "warning" not in err
        with Image.open(tmp_path / "r" / "eval" / gifs[0]) as im:
            assert im.size == (64, 64) and im.n_frames == 20  # 40 physics steps, repeat 2
    else:
        assert gifs == [] and drawn_frames == [] and err.count(warning) == 1


def test_the_trainer_counts_updates_and_skipped_or_clipped_ones():
    """Counters accumulate each update's flags: the model's always, the actor's and the
    critic's when the update trained them (a model-only update has no actor metrics)."""
    from types import SimpleNamespace
    from tpx_ext.dreamer.train import COUNTERS, Trainer
    trainer = SimpleNamespace(counters=dict.fromkeys(COUNTERS, 0))
    one, zero = torch.tensor(1.0), torch.tensor(0.0)
    Trainer._count(trainer, {"model_skipped": one})
    Trainer._count(trainer, {"model_skipped": one, "actor_skipped": one, "critic_skipped": one,
                             "actor_clipped": one})
    Trainer._count(trainer, {"model_skipped": zero, "actor_skipped": one, "critic_skipped": one,
                             "actor_clipped": zero})
    assert trainer.counters == {**dict.fromkeys(COUNTERS, 0), "updates": 3, "model_skipped": 2,
                                "actor_skipped": 2, "critic_skipped": 2, "actor_clipped": 1}


def test_the_progress_bar_counts_env_steps_and_the_records_their_rate(tmp_path, monkeypatch):
    """Not quiet: a bar of env steps on stderr (from the checkpoint's step on a resume),
    redrawn at most every 0.5 s on a terminal and every 30 s into a log file, showing the
    last return, evaluation, updates and skips. Each record's env_steps_per_second is the
    episode's steps over its wall time (a clock that ticks once per reading here), and the
    step count is the record's step, not a field of its own."""
    import sys
    from types import SimpleNamespace
    from tpx_ext.dreamer import train
    from tpx_ext.dreamer.logger import read_metrics
    bars = []

    class Bar:
        def __init__(self, **kwargs):
            self.kwargs, self.steps, self.postfix, self.closed = kwargs, 0, None, False
            bars.append(self)

        def update(self, n):
            self.steps += n

        def set_postfix(self, **postfix):
            self.postfix = postfix

        def close(self):
            self.closed = True

    class Terminal:
        def write(self, text):
            pass

        def flush(self):
            pass

        def isatty(self):
            return True

    clock = iter(range(10**6))  # half a second per reading
    monkeypatch.setattr(train, "tqdm", Bar)
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: next(clock) / 2))
    logdir, log_file = str(tmp_path / "r"), sys.stderr  # pytest's capture: not a terminal
    train.main(["--configs", "debug", "--logdir", logdir, "--threads", "1", "--steps", "400"])
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    train.main(["--logdir", logdir, "--resume", "--steps", "600"])
    first, resumed = bars
    assert first.kwargs == dict(total=400, initial=0, unit="step", dynamic_ncols=True,
                                disable=False, file=log_file, mininterval=30)
    assert resumed.kwargs == dict(total=600, initial=400, unit="step", dynamic_ncols=True,
                                  disable=False, file=terminal, mininterval=0.5)
    assert (first.steps, resumed.steps) == (400, 200) and first.closed and resumed.closed
    records = [r for r in read_metrics(f"{logdir}/metrics.jsonl") if "train_return" in r]
    assert resumed.postfix == {"ret": f"{records[-1]['train_return']:.1f}",
                               "eval": f"{read_metrics(f'{logdir}/metrics.jsonl')[-1]['eval_return']:.1f}",
                               "upd": 11, "skipped": 0}
    assert [r["env_steps_per_second"] for r in records] == [400.0, 400.0, 400.0]
    assert all("env_steps" not in r for r in records)


def test_the_progress_bar_shows_the_world_model_and_actor_skips_together(debug_trainer, monkeypatch):
    from types import SimpleNamespace
    from tpx_ext.dreamer import train
    postfixes = []
    monkeypatch.setattr(train, "tqdm", lambda **kwargs: SimpleNamespace(
        set_postfix=lambda **p: postfixes.append(p), close=lambda: None))
    trainer = debug_trainer(steps="200")
    trainer.counters.update(model_skipped=2, actor_skipped=3, critic_skipped=7, evals=1)

    def episode(bar):
        trainer.counters["env_steps"] += 200
        return 1.0, 200, {}

    monkeypatch.setattr(trainer, "_episode", episode)
    monkeypatch.setattr(trainer, "_evaluate", lambda: setattr(trainer, "last_eval", {"eval_return": 4.0}))
    monkeypatch.setattr(trainer, "_save", lambda: None)
    trainer.train()
    assert postfixes == [{"ret": "1.0", "eval": "4.0", "upd": 0, "skipped": 5}]


def test_the_trainers_help_shows_its_docstring_presets_and_every_option(capsys, monkeypatch):
    """The module docstring's first paragraph and the epilog verbatim (raw formatting: not
    rewrapped to the terminal), the epilog naming every preset, config key and knob; the
    trainer's own options with their help, the config keys only in the epilog."""
    from tpx_ext.dreamer import configs, train
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    keys = [f"--{f.name}" for f in dataclasses.fields(configs.Config) if f.name != "estimator_args"]
    epilog = (f"Presets: {', '.join(configs.PRESETS)}. Every config key (see "
              f"tpx_ext/dreamer/configs.py) is an option: {' '.join(keys)}; the estimator's "
              f"knobs: {' '.join('--estimator_args.' + k for k in configs.KNOBS)}")
    assert out.startswith("usage: python -m tpx_ext.train ")
    assert "\n\n" + train.__doc__.split("\n\n")[0] + "\n\noptions:\n" in out  # its first paragraph only
    assert "Train Dreamer on a dm_control task" in out and "--task" in keys
    assert out.endswith("\n\n" + epilog + "\n")
    assert ("\n\noptions:\n"
            "  -h, --help            show this help message and exit\n"
            "  --configs PRESET [PRESET ...]\n"
            "                        presets applied left to right over the CPU default\n"
            "  --logdir LOGDIR       run directory (default runs/<task>_<obs>_<estimator>_h<H>_s<seed>)\n"
            "  --resume              continue the run in --logdir from its checkpoint\n"
            "  --quiet               no progress bar\n\n" + epilog) in out


def test_closing_a_trainer_closes_its_environments_and_its_logs(debug_trainer, monkeypatch):
    """close() releases what a run holds open: its environments, the metrics file and the
    TensorBoard writer (whose background thread otherwise outlives the run)."""
    trainer = debug_trainer(tensorboard="true")
    closed = []
    env_close = trainer.env.close
    monkeypatch.setattr(trainer.env, "close", lambda: (closed.append("env"), env_close()))
    trainer.close()
    assert closed == ["env"]
    assert trainer.logger._file.closed and trainer.logger._tb.all_writers is None


def test_a_knob_takes_its_value_after_an_equals_sign_or_as_the_next_word(capsys):
    """--estimator_args.<knob>=VALUE and --estimator_args.<knob> VALUE each set one knob,
    as the last word too; a knob without its value, and --estimator_args without a knob
    (it is not an option itself), are refused with what is wrong."""
    from tpx_ext.dreamer import train
    assert train.parse_args(["--estimator_args.ucb=1.5"])[2] == {"estimator_args.ucb": "1.5"}
    assert train.parse_args(["--estimator_args.ucb", "1.5", "--seed", "3"])[2] == \
        {"seed": "3", "estimator_args.ucb": "1.5"}
    for argv, message in [(["--estimator_args.ucb"], "--estimator_args.ucb: expected a value"),
                          (["--estimator_args", "ucb=2"],
                           "unrecognized arguments: --estimator_args ucb=2")]:
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert capsys.readouterr().err.endswith(f" error: {message}\n")


def test_prepare_names_what_to_change(tmp_path, debug_trainer):
    from tpx_ext.cli import UsageError
    from tpx_ext.dreamer import checkpoint, train
    from tpx_ext.dreamer.envs import task_names
    with pytest.raises(UsageError) as info:
        train.prepare(["debug"], {"task": "cartpole_fly"}, str(tmp_path / "a"))
    assert str(info.value) == f"unknown task 'cartpole_fly'; valid: {', '.join(sorted(task_names()))}"
    assert ", " in str(info.value)
    trainer = debug_trainer()
    trainer._save()
    run_dir = trainer.run_dir
    assert checkpoint.exists(run_dir)
    with pytest.raises(UsageError) as info:
        train.prepare(["debug"], {}, run_dir)
    assert str(info.value) == (f"{run_dir} already holds a run: continue it with --resume, or "
                               "pick another --logdir")


def test_run_prints_and_flushes_its_header_and_summary_around_a_fresh_loud_trainer(tmp_path, monkeypatch):
    """run() with its defaults starts a new run with a progress bar (resume and quiet
    False); the header is flushed before the trainer starts and the summary after it ends,
    so a log file shows both as they happen."""
    import sys
    from tpx_ext.dreamer import train
    events = []

    class Out:
        def write(self, text):
            events.append(("write", text))

        def flush(self):
            events.append(("flush",))

    class FakeTrainer:
        def __init__(self, cfg, run_dir, resume, quiet):
            events.append(("trainer", run_dir, resume, quiet))
            self.counters = dict.fromkeys(train.COUNTERS, 0)

        def train(self):
            events.append(("train",))
            return {"eval_return": 1.0, "eval_return_std": 0.5, "eval_episodes": 2}

    monkeypatch.setattr(train, "Trainer", FakeTrainer)
    monkeypatch.setattr(sys, "stdout", Out())
    result = train.run(build(["debug"], {}), "some/dir")
    monkeypatch.undo()
    assert result["eval_return"] == 1.0
    kinds = [e[0] for e in events]
    header_flush = kinds.index("flush")
    assert kinds[:header_flush] == ["write"] * header_flush
    assert events[header_flush + 1] == ("trainer", "some/dir", False, False)
    assert kinds[header_flush + 2:] == ["train"] + ["write"] * (len(kinds) - header_flush - 4) + ["flush"]
    assert "".join(e[1] for e in events[header_flush + 3:-1]).startswith("final eval return: 1.0 +- 0.5")


def test_a_cpu_checkpoint_holds_no_cuda_generators(debug_trainer):
    from tpx_ext.dreamer import checkpoint
    trainer = debug_trainer(device="cpu")
    trainer._save()
    assert checkpoint.read_state(trainer.run_dir)["cuda_rng"] is None


def test_a_run_without_logdir_goes_under_runs_named_by_its_config(tmp_path, monkeypatch):
    from tpx_ext.dreamer.train import prepare
    monkeypatch.chdir(tmp_path)
    cfg, run_dir = prepare(["debug"], {"estimator": "rp", "horizon": 7, "seed": 3})
    assert run_dir == os.path.join("runs", "cartpole_balance_state_rp_h7_s3")
    assert cfg.horizon == 7 and not os.path.exists("runs")  # nothing is written yet


def test_an_episode_acts_stores_and_averages_its_updates(tmp_path, monkeypatch):
    """One episode of the trainer, with the agent's act and update replaced by recorders
    (debug: prefill 400 env steps, 100 actions of 2 physics steps per episode, an update per
    20 env steps): random actions in [-1, 1] until the prefill's last step, then the policy
    from exactly the prefill on, fed back its own state (None at each episode's start); the
    environment executes exactly the actions the replay stores, every episode starts with a
    zero action, reward 0 and discount 1; each record holds the mean of its episode's
    updates' metrics, profiles over the horizon included. (Evaluations act too, with
    explore off; they are not recorded.)"""
    from tpx_ext.dreamer import train
    from tpx_ext.dreamer.agent import Dreamer
    from tpx_ext.dreamer.env_pool import EnvPool
    from tpx_ext.dreamer.logger import read_metrics
    acts, updates, executed = [], [], []
    step = EnvPool.step

    def act(self, obs, state, explore):
        if not explore:  # an evaluation's single environment
            return np.zeros(self.action_dim, np.float32), None
        acts.append(state)
        return np.full((len(obs), self.action_dim), 0.25, np.float32), len(acts)

    def update(self, batch):
        updates.append(len(updates) + 1)
        u = float(updates[-1])
        return {"model_skipped": torch.tensor(0.0), "loss": torch.tensor(u),
                "k_action": torch.tensor([u, 2 * u])}

    def recorded_step(self, action):
        executed.append(np.array(action, copy=True))
        return step(self, action)

    monkeypatch.setattr(Dreamer, "act", act)
    monkeypatch.setattr(Dreamer, "update", update)
    evaluate, eval_seeds = train.evaluate, []

    def recorded_evaluate(agent, cfg, seed, *args, **kwargs):
        eval_seeds.append(seed)
        return evaluate(agent, cfg, seed, *args, **kwargs)

    monkeypatch.setattr(EnvPool, "step", recorded_step)
    monkeypatch.setattr(train, "evaluate", recorded_evaluate)
    _train(tmp_path / "r", "--steps", "600", "--seed", "5")
    assert eval_seeds == [10_005, 10_006]  # its own seed per evaluation: at 0 and 600
    assert len(executed) == 300 and len(acts) == 100  # the third episode's 100 actions
    assert acts == [None] + list(range(1, 100))
    random = np.concatenate(executed[:200])
    assert random.min() < -0.9 and random.max() > 0.9 and random.dtype == np.float32
    assert all((a == 0.25).all() for a in executed[200:])
    stored = train.load_run(str(tmp_path / "r")).replay.state_dict()
    lengths = stored["lengths"]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    assert list(lengths) == [101, 101, 101]
    np.testing.assert_array_equal(np.delete(stored["action"], starts, 0), np.concatenate(executed))
    assert not stored["action"][starts].any() and not stored["reward"][starts].any()
    assert (stored["discount"][starts] == 1).all()
    records = [r for r in read_metrics(str(tmp_path / "r" / "metrics.jsonl")) if "train_return" in r]
    # updates 1 (at 400, the second episode's end) and 2..11 (420 .. 600)
    assert records[1]["loss"] == 1.0 and records[1]["k_action"] == [1.0, 2.0]
    assert records[2]["loss"] == np.mean(range(2, 12)) and records[2]["k_action"] == [6.5, 13.0]
    assert "loss" not in records[0]
    for record, start, n in zip(records, starts, lengths):  # the return sums the rewards
        assert record["train_return"] == pytest.approx(stored["reward"][start:start + n].sum(), rel=1e-6)


def test_environments_whose_episodes_end_at_different_steps_are_refused(debug_trainer):
    """--envs steps its environments in lockstep, an episode each: two whose episodes end
    after 3 and 5 steps stop the run at the third step, with nothing of them stored."""
    from types import SimpleNamespace
    trainer = debug_trainer()
    trainer.env.close()
    obs_shape, steps = trainer.env.observation_shape, []

    def step(action):
        steps.append(action)
        return [(np.zeros(obs_shape, np.float32), 1.0, len(steps) >= end, {"discount": 1.0})
                for end in (3, 5)]

    trainer.env = SimpleNamespace(n=2, action_dim=trainer.env.action_dim, step=step, close=lambda: None,
                                  reset=lambda: [np.zeros(obs_shape, np.float32)] * 2)
    with pytest.raises(RuntimeError) as info:
        trainer._episode(SimpleNamespace(update=lambda n: None))
    assert str(info.value) == ("cartpole_balance: the 2 environments' episodes ended at different "
                               "steps; --envs needs episodes of one length (time limits)")
    assert len(steps) == 3 and trainer.replay.num_episodes == 0


def test_training_starts_once_the_replay_holds_an_episode(tmp_path):
    """Without a prefill the first update comes at the end of the first episode, right
    after it is stored (an update per 20 env steps, 200 per episode: 1, then 10 more)."""
    from tpx_ext.dreamer.logger import read_metrics
    _train(tmp_path / "r", "--steps", "400", "--prefill", "0")
    records = [r for r in read_metrics(str(tmp_path / "r" / "metrics.jsonl")) if "train_return" in r]
    assert [r["updates"] for r in records] == [1, 11]


def test_pixel_runs_draw_evaluation_frames_without_probing_opengl(monkeypatch):
    """A pixel run renders its observations anyway, so its GIFs need no check; a state run
    asks rendering_error once, and warns once."""
    from types import SimpleNamespace
    from tpx_ext.dreamer import train
    monkeypatch.setattr(train, "rendering_error", lambda: "no OpenGL (test)")
    pixels = SimpleNamespace(cfg=SimpleNamespace(obs="pixels"), _gif_warned=False)
    state = SimpleNamespace(cfg=SimpleNamespace(obs="state"), _gif_warned=False)
    assert train.Trainer._can_draw_frames(pixels) is True and not pixels._gif_warned
    assert train.Trainer._can_draw_frames(state) is False and state._gif_warned
