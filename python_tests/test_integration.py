"""TPX dropped into Dreamer code as users write it: samplers, lambda-returns, graph.loss().

The V1-style loop below is written the usual way (a tanh-Normal policy, a transition that
calls `rsample` itself, DreamerV1's `lambda_return`, `actor_loss.backward()`); its TPX
version differs in a few lines, which one test counts.
"""

import difflib
import inspect

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal, TanhTransform, TransformedDistribution

import tpx_ext
from tpx_ext.estimators import Estimator

N, H, S, A = 16, 6, 3, 2
LAM, GAMMA = 0.95, 0.99


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Agent(nn.Module):
    """A tanh-Normal actor, a latent transition that calls rsample itself, reward, value."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.actor = nn.Linear(S, 2 * A)
        self.transition = nn.Linear(S + A, 2 * S)
        self.reward = nn.Linear(S, 1)
        self.value = nn.Linear(S, 1)

    def policy(self, state):
        mean, std = self.actor(state).chunk(2, -1)
        dist = Normal(mean, nn.functional.softplus(std) + 0.1)
        return Independent(TransformedDistribution(dist, [TanhTransform()]), 1)

    def img_step(self, state, action):
        mean, std = self.transition(torch.cat([state, action], -1)).chunk(2, -1)
        return Normal(torch.tanh(mean), nn.functional.softplus(std) + 0.1).rsample()


def lambda_return(reward, value, pcont, bootstrap, lambda_):
    """DreamerV1's lambda_return (axis 0)."""
    next_values = torch.cat([value[1:], bootstrap[None]], 0)
    inputs = reward + pcont * next_values * (1 - lambda_)
    returns, agg = [], bootstrap
    for t in reversed(range(reward.shape[0])):
        agg = inputs[t] + pcont[t] * lambda_ * agg
        returns.append(agg)
    return torch.stack(returns[::-1])


# The two versions of one actor update; test_switch_to_tpx counts the lines they differ in.
def actor_update(agent, start, optimizer):
    state, states = start, []
    for _ in range(H):
        action = agent.policy(state.detach()).rsample()
        state = agent.img_step(state, action)
        states.append(state)
    states = torch.stack(states)
    reward, value = agent.reward(states), agent.value(states)
    pcont = GAMMA * torch.ones_like(reward)
    returns = lambda_return(reward[:-1], value[:-1], pcont[:-1], value[-1], LAM)
    discount = torch.cumprod(torch.cat([torch.ones_like(pcont[:1]), pcont[:-2]], 0), 0)
    actor_loss = -(discount * returns).mean()
    optimizer.zero_grad()
    actor_loss.backward()
    optimizer.step()


def actor_update_tpx(agent, start, optimizer, estimator):
    graph = estimator.graph()
    act, latent = graph.sampler("action"), graph.sampler("latent")
    state, states = start, []
    for _ in range(H):
        action = act(agent.policy(state.detach()))
        state = latent.capturing(agent.img_step)(state, action)
        states.append(state)
    states = torch.stack(states)
    reward, value = agent.reward(states), agent.value(states)
    pcont = GAMMA * torch.ones_like(reward)
    returns = graph.lambda_return(reward[:-1], value, pcont[:-1], LAM, convention="dreamerv1")
    discount = torch.cumprod(torch.cat([torch.ones_like(pcont[:1]), pcont[:-2]], 0), 0)
    actor_loss = graph.loss(-(discount * returns).mean())
    optimizer.zero_grad()
    actor_loss.backward()
    optimizer.step()


def actor_grads(update, *args, seed=1):
    agent = Agent()
    opt = torch.optim.SGD(agent.actor.parameters(), lr=0.0)
    start = torch.randn(N, S, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(seed)
    update(agent, start, opt, *args)
    return [p.grad.clone() for p in agent.actor.parameters()]


def test_switch_to_tpx_changes_six_lines_and_rp_is_bit_identical():
    lines = [inspect.getsource(f).splitlines()[1:] for f in (actor_update, actor_update_tpx)]
    changed = [ln for ln in difflib.ndiff(*lines) if ln.startswith("+ ")]
    assert len(changed) <= 6, changed
    want = actor_grads(actor_update)
    got = actor_grads(actor_update_tpx, Estimator("rp"))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def manual_terms(agent, start, estimator, convention, seed=1, pcont_noise=False):
    """The same objective with every term placed by hand, and the graph API's version;
    returns both graphs' node statistics and actor gradients."""
    out = []
    for api in (False, True):
        agent.zero_grad()
        graph = estimator.graph()
        gen = torch.Generator().manual_seed(seed)
        state, states, values0 = start, [], agent.value(start)
        for t in range(H):
            mean, std = agent.actor(state.detach()).chunk(2, -1)
            std = nn.functional.softplus(std) + 0.1
            eps = torch.randn(mean.shape, generator=gen)
            u = graph.sample(mean, std, t, name="action", eps=eps, baseline=torch.zeros(N))
            state = torch.tanh(agent.transition(torch.cat([state, torch.tanh(u)], -1))[:, :S])
            states.append(state)
        states = torch.stack(states)
        reward, value = agent.reward(states)[..., 0], agent.value(states)[..., 0]
        disc = GAMMA * (1 - 0.05 * torch.rand(H, N, generator=gen)) if pcont_noise else \
            torch.full((H, N), GAMMA)
        if convention == "dreamerv1":  # arrays of s_1 .. s_H
            r, v, d = reward[:-1], value, disc[:-1]
        elif convention == "dreamerv2":  # arrays of s_0 .. s_H
            r0 = agent.reward(start)[..., 0]
            r, v, d = torch.cat([r0[None], reward])[:-1], torch.cat([values0.T, value]), disc
        else:  # next_reward: rewards of s_1 .. s_H, values of s_0 .. s_H
            r, v, d = reward, torch.cat([values0.T, value]), disc
        weights = torch.cumprod(torch.cat([torch.ones_like(d[:1]), d[:-1]]), 0)
        if api:
            R = graph.lambda_return(r, v, d, LAM, convention=convention)
            graph.loss(-(weights * R).sum(0).mean()).backward()
        else:  # J = sum_t w_t R_t by hand: each reward and value at its state's step
            R = lambda_return(r, v[:-1], d, v[-1], LAM)
            offset_r, offset_v = tpx_ext.estimators.returns.CONVENTIONS[convention]
            rr, vv = r.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
            c_r, c_v = torch.autograd.grad((weights * lambda_return(rr, vv[:-1], d, vv[-1], LAM)).sum(),
                                           (rr, vv))
            for t in range(r.shape[0]):
                graph.add_objective(c_r[t] * r[t], step=max(t + offset_r - 1, 0))
            for t in range(v.shape[0]):
                graph.add_objective(c_v[t] * v[t], step=max(t + offset_v - 1, 0))
            assert torch.allclose((weights * R).sum(0), sum(graph._terms.values()), atol=1e-5)
            graph.backward()
        out.append((graph.stats, [p.grad.clone() for p in agent.actor.parameters()]))
    return out


@pytest.mark.parametrize("convention", ["next_reward", "dreamerv1", "dreamerv2"])
@pytest.mark.parametrize("pcont_noise", [False, True])
def test_conventions_place_every_term_at_its_state(convention, pcont_noise):
    """The API's terms (hence every node's return-to-go and LR gradient) equal those placed
    by hand at the step of each reward's and value's state, per-sample discounts included."""
    agent = Agent()
    start = torch.randn(N, S, generator=torch.Generator().manual_seed(3))
    (manual, g_manual), (api, g_api) = manual_terms(agent, start, Estimator("lr"), convention,
                                                    pcont_noise=pcont_noise)
    for m, a in zip(manual, api):
        torch.testing.assert_close(a.adv, m.adv, rtol=1e-5, atol=1e-6)
    assert len({round(float(m.adv.abs().mean()), 6) for m in manual}) == H  # G_t differs by t
    for g, w in zip(g_api, g_manual):  # the loss's gradient is -dJ, backward()'s +dJ
        torch.testing.assert_close(g, -w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("convention", ["next_reward", "dreamerv1", "dreamerv2"])
def test_value_baselines_equal_the_return_when_values_are_stationary(convention):
    """Every value v and every reward (1 - discount) v make every lambda-return v: then the
    matching baseline is exactly G_t, for any weights and per-sample discounts, except at
    the step whose state has no value in the arrays (dreamerv1's s_0: leave-one-out)."""
    f64, T = torch.float64, 5
    gen = torch.Generator().manual_seed(0)
    v = 1 + torch.rand(N, generator=gen, dtype=f64)
    d = 0.9 + 0.1 * torch.rand(T, N, generator=gen, dtype=f64)
    weights = torch.rand(T, 1, generator=gen, dtype=f64)
    graph = Estimator("lr").graph()
    mu = torch.zeros(N, 1, dtype=f64, requires_grad=True)
    act = graph.sampler("action")
    for _ in range(T):
        act(mu, torch.ones_like(mu))
    R = graph.lambda_return(((1 - d) * v)[..., None], v.expand(T + 1, N)[..., None], d, 0.7,
                            convention=convention)
    torch.testing.assert_close(R[..., 0], v.expand(T, N))
    graph.loss(-(weights[..., None] * R).mean()).backward()
    first = 1 if convention == "dreamerv1" else 0
    for s in graph.stats[first:]:
        torch.testing.assert_close(s.adv, torch.zeros_like(s.adv), atol=1e-12, rtol=0)
    if first:  # G_0 = J_i = v_i sum_t w_t / T, less the other samples' mean
        G = v * weights.sum() / T
        torch.testing.assert_close(graph.stats[0].adv, G - (G.sum() - G) / (N - 1))


def test_next_reward_convention_reproduces_the_hand_computed_terms_and_baselines():
    """TPX.md sec. 4's example (gamma = lam = 0.5, w = 1): G = (10.9375, 9.6875, 6.5625),
    b_t = kappa_t v(s_t) = (1.5, 2.25, 2.625), A = (9.4375, 7.4375, 3.9375)."""
    f64 = torch.float64
    rewards = torch.tensor([[1.0], [2.0], [3.0]], dtype=f64)
    values = torch.tensor([[0.5], [1.0], [2.0], [4.0]], dtype=f64)
    graph = tpx_ext.Estimator("tpx").graph()
    mu = torch.zeros(1, 2, dtype=f64, requires_grad=True)
    act, lat = graph.sampler("action"), graph.sampler("latent")
    for t in range(3):
        act(mu, mu.exp())
        lat(Normal(mu, mu.exp()))
    R = graph.lambda_return(rewards, values, 0.5, 0.5, convention="next_reward")
    loss = graph.loss(-R.sum())
    assert loss.item() == -R.sum().item()
    loss.backward()
    assert [s.adv.item() for s in graph.stats] == [9.4375, 9.4375, 7.4375, 7.4375, 3.9375, 3.9375]


def v1_arrays_declared(convention, estimator, *, check_values=False):
    """DreamerV1's arrays (states s_1 .. s_H) given to lambda_return as `convention`."""
    agent = Agent()
    graph = estimator.graph()
    act = graph.sampler("action")
    state, states = torch.randn(N, S, generator=torch.Generator().manual_seed(0)), []
    for _ in range(H):
        action = act(agent.policy(state))
        state = torch.tanh(agent.transition(torch.cat([state, action], -1))[:, :S])
        states.append(state)
    states = torch.stack(states)
    reward, value = agent.reward(states), agent.value(states)
    R = graph.lambda_return(reward[:-1], value, GAMMA, LAM, convention=convention)
    graph.loss(-R.mean()).backward()
    return graph


@pytest.mark.parametrize("mode", ["lr", "tpx", "mix"])
@pytest.mark.parametrize("wrong", ["next_reward", "dreamerv2"])
def test_wrong_convention_is_caught_as_a_misplaced_term(mode, wrong):
    """DreamerV1's arrays declared in another convention: a value (or reward) of s_{t+1}
    taken for one of s_t is a term of step t - 1 that depends on the node of step t."""
    est = Estimator(mode, rho=0.5) if mode == "mix" else Estimator(mode)
    with pytest.raises(ValueError, match=r"misplaced term: (values|rewards)\[\d+\] \(convention "
                                         rf"'{wrong}'.* depends on node 'action' of step \d+"):
        v1_arrays_declared(wrong, est)
    v1_arrays_declared("dreamerv1", Estimator(mode, rho=0.5) if mode == "mix" else Estimator(mode))


@pytest.mark.parametrize("convention, row", [
    ("next_reward", "values[0] (convention 'next_reward': the value of s_0, a baseline of step "
                    "0) depends on node 'action' of step 0"),
    ("dreamerv2", "rewards[1] (convention 'dreamerv2': a term of step 0) depends on node "
                  "'action' of step 1"),
])
def test_a_misplaced_row_is_named_by_its_role(convention, row):
    """DreamerV1's arrays (states s_1 .. s_H) declared in another convention: the message
    names the role the first misplaced row had. As next_reward's, values[0] is taken for
    the value of s_0 (a baseline of step 0) and depends on the first action; as
    dreamerv2's, rewards[1] (of s_2) is taken for a term of step 0 and depends on the
    action of step 1."""
    with pytest.raises(ValueError) as info:
        v1_arrays_declared(convention, Estimator("lr"))
    assert str(info.value) == (
        f"misplaced term: {row}, a later step, so that node's LR gradient misses it. Place "
        "each term at the step of the last node it depends on (with lambda_return: check the "
        "convention against your arrays' index alignment, docs/DREAMER_INTEGRATION.md)")


def test_misplaced_rewards_are_caught_where_the_values_are_right():
    """next_reward's arrays (values of s_0 .. s_H, rewards r(s_1) .. r(s_H)) declared as
    dreamerv2's: every value is at its state, but reward[t] = r(s_{t+1}) is taken for a
    function of s_t, a term of step t - 1 that depends on the action of step t."""
    agent, est = Agent(), Estimator("lr")
    for convention, raises in (("dreamerv2", True), ("next_reward", False)):
        graph = est.graph() if raises else Estimator("lr", check="every").graph()
        act = graph.sampler("action")
        state = torch.randn(N, S, generator=torch.Generator().manual_seed(0))
        states = [state]
        for _ in range(H):
            state = torch.tanh(agent.transition(torch.cat([state, act(agent.policy(state))], -1))[:, :S])
            states.append(state)
        states = torch.stack(states)
        R = graph.lambda_return(agent.reward(states[1:]), agent.value(states), GAMMA, LAM,
                                convention=convention)
        if raises:
            with pytest.raises(ValueError, match=r"^misplaced term: rewards\[\d+\] \(convention "
                                                 r"'dreamerv2'.* depends on node 'action'"):
                graph.loss(-R.mean()).backward()
        else:
            graph.loss(-R.mean()).backward()


@pytest.mark.parametrize("convention", ["next_reward", "dreamerv1", "dreamerv2"])
def test_advantages_keep_the_returns_dtype(convention):
    """float32 returns give float32 advantages (the value baselines are computed in float64
    and rounded back, as the terms are)."""
    graph = v1_arrays_declared(convention, Estimator("lr", check="off"))
    assert [s.adv.dtype for s in graph.stats] == [torch.float32] * H


def test_the_check_runs_on_the_first_graph_by_default_every_graph_or_never():
    est = Estimator("lr")
    with pytest.raises(ValueError, match="misplaced term"):
        v1_arrays_declared("next_reward", est)
    v1_arrays_declared("next_reward", est)  # the second graph is not checked
    est = Estimator("lr", check="every")
    for _ in range(2):
        with pytest.raises(ValueError, match="misplaced term"):
            v1_arrays_declared("next_reward", est)
    v1_arrays_declared("next_reward", Estimator("lr", check="off"))
    with pytest.raises(ValueError, match="check must be one of first, every, off"):
        Estimator("tpx", check=True)


@pytest.mark.parametrize("mode", ["lr", "tpx"])
def test_an_objective_term_that_depends_on_a_later_node_is_caught(mode):
    """Without the check this node would get G = 0: zero LR, zero variance, and a
    gradient of exactly 0 under tpx."""
    graph = Estimator(mode).graph()
    mu = torch.zeros(N, 1, requires_grad=True)
    x0 = graph.sample(mu, torch.ones_like(mu), 0, name="a")
    x1 = graph.sample(mu + x0, torch.ones_like(mu), 1, name="a")
    graph.add_objective((x0 * x1)[:, 0], step=0)
    with pytest.raises(ValueError, match=r"the objective term of step 0 depends on node 'a' of step 1"):
        graph.backward()


@pytest.mark.parametrize("mode", ["lr", "tpx", "mix"])
def test_loss_in_a_sum_and_scaled_gives_the_scaled_update(mode):
    """graph.loss() is an ordinary loss: 3 * loss + another loss gives 3x its gradient plus
    the other's (the node's weights do not see the scale or the loss's sign)."""
    def grads(scale):
        agent = Agent()
        est = Estimator(mode, rho=0.5) if mode == "mix" else Estimator(mode)
        start = torch.randn(N, S, generator=torch.Generator().manual_seed(0))
        opt = torch.optim.SGD(agent.parameters(), lr=0.0)

        class Scaled:
            def zero_grad(self):
                opt.zero_grad()

            def step(self):
                pass

        torch.manual_seed(1)
        graph = est.graph()
        act = graph.sampler("action")
        state, states = start, []
        for _ in range(H):
            state = torch.tanh(agent.transition(torch.cat([state, act(agent.policy(state))], -1))[:, :S])
            states.append(state)
        states = torch.stack(states)
        reward, value = agent.reward(states), agent.value(states)
        R = graph.lambda_return(reward[:-1], value, GAMMA, LAM, convention="dreamerv1")
        other = agent.value(start).pow(2).mean()
        (scale * graph.loss(-R.mean()) + other).backward()
        return ([torch.zeros_like(p) if p.grad is None else p.grad.clone()
                 for p in agent.actor.parameters()], agent.value.weight.grad.clone())

    (g0, v0), (g1, v1), (g3, v3) = grads(0.0), grads(1.0), grads(3.0)
    for a, b, z in zip(g3, g1, g0):
        assert not z.any() and b.abs().sum() > 0
        torch.testing.assert_close(a, 3 * b, rtol=1e-5, atol=1e-7)
    # The value head (in the returns and in the other loss) gets other's share plus 1x / 3x
    # the loss's.
    torch.testing.assert_close(v3 - v0, 3 * (v1 - v0), rtol=1e-5, atol=1e-7)
    assert (v1 - v0).abs().sum() > 0


def test_graph_loss_under_autocast_and_grad_scaler_matches_float32():
    """bfloat16 autocast with a grad scaler of 2^10: the same update as float32 within
    bfloat16's precision (8 bits of mantissa: 2-3 significant digits)."""
    def update(amp):
        agent = Agent()
        opt = torch.optim.SGD(agent.actor.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=amp)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            graph = Estimator("tpx").graph()
            act = graph.sampler("action")
            state, states = torch.randn(N, S, generator=torch.Generator().manual_seed(0)), []
            for _ in range(H):
                action = act(agent.policy(state.detach()))
                state = torch.tanh(agent.transition(torch.cat([state, action], -1))[:, :S])
                states.append(state)
            states = torch.stack(states)
            reward, value = agent.reward(states), agent.value(states)
            R = graph.lambda_return(reward[:-1], value, GAMMA, LAM, convention="dreamerv1")
            loss = graph.loss(-R.float().mean())
        before = [p.detach().clone() for p in agent.actor.parameters()]
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert all(s.k is not None and torch.isfinite(s.k).all() for s in graph.stats)
        return [p.detach() - b for p, b in zip(agent.actor.parameters(), before)]

    want, got = update(False), update(True)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=0.05, atol=0.02 * float(w.abs().max()))


def _graph_with_nodes(T=3):
    graph = Estimator("tpx").graph()
    mu = torch.zeros(N, 1, requires_grad=True)
    act = graph.sampler("action")
    for _ in range(T):
        act(mu, torch.ones_like(mu))
    return graph, mu


R_, V_ = torch.zeros(3, N, 1), torch.zeros(4, N, 1)


@pytest.mark.parametrize("call, match", [
    (lambda g: g.lambda_return(R_, R_, GAMMA, LAM, convention="dreamerv1"),
     r"need values of shape \(4, 16\) \(the last row is the bootstrap"),
    (lambda g: g.lambda_return(R_, V_, GAMMA, LAM, convention=None),
     r"^lambda_return: convention must be one of next_reward, dreamerv1, dreamerv2, got None "
     r"\(see its docstring for the index alignment\)$"),
    (lambda g: g.lambda_return(R_, V_, torch.ones(4, N), LAM, convention="dreamerv1"),
     r"discount must be a number, \[3\] or \[3, 16\]"),
    (lambda g: g.lambda_return(R_, V_, GAMMA, torch.tensor(0.9), convention="dreamerv1"),
     r"lam must be a number in \[0, 1\]"),
    (lambda g: g.lambda_return(R_, V_, GAMMA, 1.5, convention="dreamerv1"), r"lam must be a number"),
    (lambda g: g.lambda_return(torch.zeros(3, N, 2), V_, GAMMA, LAM, convention="dreamerv1"),
     r"rewards must be \[T, N\]"),
    (lambda g: [g.lambda_return(R_, V_, GAMMA, LAM, convention="dreamerv1"),
                g.lambda_return(R_, V_, GAMMA, LAM, convention="dreamerv1")],
     r"^lambda_return: a graph takes one call \(concatenate the returns\)$"),
    (lambda g: [g.lambda_return(R_, V_, GAMMA, LAM, convention="dreamerv1"), g.backward()],
     r"^backward: the returns of graph\.lambda_return are weighted by the loss that uses them; "
     r"call graph\.loss\(your_loss\)\.backward\(\)$"),
    (lambda g: [g.lambda_return(R_, V_, GAMMA, LAM, convention="dreamerv1"),
                g.loss(g._batch * torch.ones((), requires_grad=True)).backward()],
     r"^loss: it does not use the returns of graph\.lambda_return$"),
    (lambda g: g.loss(torch.ones(2)), "expected a floating scalar tensor"),
    (lambda g: g.sampler("action")(torch.distributions.Bernoulli(0.5)),
     "cannot draw a node from Bernoulli: pass a torch.distributions.Normal"),
    (lambda g: g.sampler("")(None), "name must be a non-empty string"),
])
def test_errors_name_the_argument_and_the_fix(call, match):
    graph, _ = _graph_with_nodes()
    with pytest.raises((ValueError, TypeError), match=match):
        call(graph)


def test_capture_refuses_a_sample_shape_and_restores_rsample():
    graph, _ = _graph_with_nodes()
    latent = graph.sampler("latent")
    dist = Normal(torch.zeros(N, 1), torch.ones(N, 1))
    original = Normal.rsample
    with pytest.raises(ValueError, match="rsample with a sample_shape cannot be a node"):
        with latent.capture():
            dist.rsample((2,))
    assert Normal.rsample is original
    with latent.capture():
        x = dist.rsample()
    assert Normal.rsample is original and latent.step == 1 and x.shape == (N, 1)
    assert [s.name for s in graph.stats][-1] == "latent"


def test_cut_detaches_state_structures_in_lr_mode_only():
    from tpx_ext.dreamer.rssm import LatentState
    x = torch.ones(2, 3, requires_grad=True) * 2
    state = {"rssm": LatentState(x, x, x, x), "extra": [x, (x, 5)]}
    cut = Estimator("lr").graph().cut(state)
    assert isinstance(cut["rssm"], LatentState) and cut["extra"][1][1] == 5
    assert not any(t.requires_grad for t in (*cut["rssm"], cut["extra"][0], cut["extra"][1][0]))
    assert Estimator("tpx").graph().cut(state) is state


@pytest.mark.parametrize("convention", ["next_reward", "dreamerv1", "dreamerv2"])
def test_returns_are_the_plain_recursion_and_the_terms_sum_to_the_objective(convention):
    """Bit for bit DreamerV1's recursion; the terms the graph places add up to -loss."""
    gen = torch.Generator().manual_seed(0)
    r, v = torch.randn(H, N, 1, generator=gen), torch.randn(H + 1, N, 1, generator=gen)
    d = GAMMA * (1 - 0.1 * torch.rand(H, N, 1, generator=gen))
    w = torch.rand(H, 1, 1, generator=gen)
    graph, _ = _graph_with_nodes(H)
    R = graph.lambda_return(r, v, d, LAM, convention=convention)
    assert torch.equal(R.detach(), lambda_return(r, v[:-1], d, v[-1], LAM))
    loss = graph.loss(-(w * R).sum(0).mean())
    loss.backward()
    total = sum(graph._terms[k] for k in graph._terms).mean()
    torch.testing.assert_close(total, -loss.detach(), rtol=1e-6, atol=1e-6)


def test_lambda_return_terms_refuses_trailing_dims_instead_of_broadcasting():
    with pytest.raises(ValueError, match=r"rewards must be \[H, B\], got \(3, 16, 1\)"):
        tpx_ext.lambda_return_terms(R_, V_, GAMMA, LAM, torch.ones(3))


def test_lambda_return_takes_a_discount_as_a_number_a_0d_tensor_one_per_step_or_per_sample():
    """A discount given as a float, a 0-d tensor, [T] or [T, N] (+ a trailing 1) gives the
    same returns, computed in the rewards' dtype: a float32 discount tensor with float64
    rewards is converted first (used as float32, even an exact 0.75 changes the returns by
    1e-7). A bool or another type is refused."""
    f64, T = torch.float64, 3
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(T, N, 1, generator=gen, dtype=f64)
    values = torch.rand(T + 1, N, 1, generator=gen, dtype=f64)

    def returns(discount):
        graph, _ = _graph_with_nodes(T)
        return graph.lambda_return(rewards, values, discount, LAM, convention="dreamerv1")

    expected = returns(0.75)  # exact in float32 too
    assert expected.dtype == f64
    for form in (torch.tensor(0.75, dtype=torch.float32), torch.full((T,), 0.75),
                 torch.full((T, N), 0.75), torch.full((T, N, 1), 0.75)):
        got = returns(form)
        assert got.dtype == f64 and got.shape == expected.shape and torch.equal(got, expected)
    steps = torch.tensor([0.5, 0.75, 1.0])  # one per step, the same for every sample
    torch.testing.assert_close(returns(steps), returns(steps[:, None].expand(T, N)), rtol=0, atol=0)
    few = Estimator("tpx").graph()  # fewer samples than steps: a 0-d discount still fills [T, N]
    torch.testing.assert_close(
        few.lambda_return(rewards[:, :2], values[:, :2], torch.tensor(0.75), LAM,
                          convention="dreamerv1"), expected[:, :2], rtol=0, atol=0)
    for discount, message in [
            (torch.zeros(T, N, 2), "lambda_return: discount must be [T, N] (optionally with "
                                   "trailing dims of size 1), got (3, 16, 2)"),
            (torch.ones(T, N, dtype=torch.int64), "lambda_return: discount must be a floating tensor")]:
        with pytest.raises(ValueError) as info:
            returns(discount)
        assert str(info.value) == message
    with pytest.raises(ValueError, match=r"^lambda_return: discount must be a number or a tensor, got a bool$"):
        returns(True)
    with pytest.raises(ValueError, match=r"^lambda_return: discount must be a number or a tensor, got str$"):
        returns("0.9")


def test_lambda_return_edges_lam_0_and_1_a_first_batch_and_refusals_in_full():
    """lam = 0 gives one-step targets r_t + d v_{t+1}, lam = 1 the discounted rewards plus
    the bootstrap value; a graph without nodes takes its batch size from the returns, so a
    node of another batch is refused; non-floating rewards, malformed values, another batch
    and a closed graph are refused naming the argument."""
    f64, T, d = torch.float64, 3, 0.5
    rewards = torch.tensor([[1.0], [2.0], [4.0]], dtype=f64)
    values = torch.tensor([[8.0], [16.0], [32.0], [64.0]], dtype=f64)

    def returns(lam):
        graph = Estimator("tpx").graph()
        return graph.lambda_return(rewards, values, d, lam, convention="next_reward")

    torch.testing.assert_close(returns(0.0), rewards + d * values[1:], rtol=0, atol=0)
    monte_carlo = torch.tensor([[1 + d * 2 + d * d * 4 + d ** 3 * 64], [2 + d * 4 + d * d * 64],
                                [4 + d * 64]], dtype=f64)
    torch.testing.assert_close(returns(1.0), monte_carlo, rtol=0, atol=0)

    graph = Estimator("tpx").graph()
    graph.lambda_return(torch.zeros(T, 5), torch.zeros(T + 1, 5), d, 0.5, convention="next_reward")
    with pytest.raises(ValueError, match=r"^mu has batch size 4, but the graph's batch size is 5$"):
        graph.sampler("action")(torch.zeros(4, 1), torch.ones(4, 1))

    cases = [
        (lambda g: g.lambda_return(torch.zeros(T, N, dtype=torch.int64), V_, GAMMA, LAM,
                                   convention="next_reward"),
         "lambda_return: rewards must be a floating tensor"),
        (lambda g: g.lambda_return([[0.0] * N] * T, V_, GAMMA, LAM, convention="next_reward"),
         "lambda_return: rewards must be a floating tensor"),
        (lambda g: g.lambda_return(R_, torch.zeros(T + 1, N, 2), GAMMA, LAM, convention="next_reward"),
         "lambda_return: values must be [T, N] (optionally with trailing dims of size 1), "
         "got (4, 16, 2)"),
        (lambda g: g.lambda_return(torch.zeros(T, N + 1), torch.zeros(T + 1, N + 1), GAMMA, LAM,
                                   convention="next_reward"),
         f"lambda_return rewards has batch size {N + 1}, but the graph's batch size is {N}"),
    ]
    for call, message in cases:
        graph, _ = _graph_with_nodes(T)
        with pytest.raises(ValueError) as info:
            call(graph)
        assert str(info.value) == message
    graph, mu = _graph_with_nodes(T)
    graph.loss(-mu.sum() * graph._batch).backward()
    with pytest.raises(RuntimeError) as info:
        graph.lambda_return(R_, V_, GAMMA, LAM, convention="next_reward")
    assert str(info.value) == ("lambda_return: backward already ran on this graph; build a new "
                               "graph (Estimator.graph()) for every gradient")


def test_graph_loss_refusals_name_what_it_got():
    """graph.loss refuses what is not a floating scalar (saying its shape, or its type when
    it is not a tensor) and a graph without nodes, with these messages in full."""
    cases = [(torch.ones(2), "loss: expected a floating scalar tensor, got (2,)"),
             (torch.ones((), dtype=torch.int64), "loss: expected a floating scalar tensor, got ()"),
             (1.0, "loss: expected a floating scalar tensor, got <class 'float'>")]
    for value, message in cases:
        graph, _ = _graph_with_nodes()
        with pytest.raises(ValueError) as info:
            graph.loss(value)
        assert str(info.value) == message
    with pytest.raises(ValueError) as info:
        Estimator("tpx").graph().loss(torch.ones((), requires_grad=True))
    assert str(info.value) == "loss: the graph has no nodes (draw samples first)"


def test_the_placement_check_follows_five_steps_with_its_own_random_weights(monkeypatch):
    """The check probes each followed row with random weights from its own generator (the
    caller's torch RNG is untouched) and follows the rows of the first three and the last
    two steps only, since each probe is a backward pass through the rollout. With
    next_reward's arrays over 8 steps the row steps are -1 (values[0]) .. 7; of steps -1, 0,
    1, 6, 7 the rows that reach a later node are values[0 .. 2], values[7], rewards[0],
    rewards[1] and rewards[6]: 7 more backward passes than without the check (4 where the
    rewards need no gradient)."""
    import tpx_ext.estimators.graph as graph_module
    agent, T = Agent(), 8
    real_grad = torch.autograd.grad

    def backward_passes(check, constant_rewards=False):
        calls = []
        monkeypatch.setattr(graph_module.torch.autograd, "grad",
                            lambda *a, **kw: calls.append(1) or real_grad(*a, **kw))
        graph = Estimator("lr", check=check).graph(torch.Generator().manual_seed(0))
        act = graph.sampler("action")
        state = torch.randn(N, S, generator=torch.Generator().manual_seed(0))
        states = [state]
        for _ in range(T):
            action = act(agent.policy(state))
            state = torch.tanh(agent.transition(torch.cat([state, action], -1))[:, :S])
            states.append(state)
        states = torch.stack(states)
        rewards = agent.reward(states[1:])
        R = graph.lambda_return(rewards.detach() if constant_rewards else rewards,
                                agent.value(states), GAMMA, LAM, convention="next_reward")
        graph.loss(-R.mean()).backward()
        monkeypatch.undo()
        return len(calls)

    unchecked = backward_passes("off")
    torch.manual_seed(11)
    expected_next = torch.rand(4)
    torch.manual_seed(11)
    assert backward_passes("every") - unchecked == 7
    assert torch.equal(torch.rand(4), expected_next)
    # rewards that need no gradient (a known reward function) are skipped, the values not
    assert backward_passes("every", constant_rewards=True) - unchecked == 4


def test_terms_beside_the_returns_are_checked_and_constant_ones_pass():
    """The placement check follows add_objective's terms as well as lambda_return's rows: a
    term of step 0 that depends on the node of step 2 is caught next to correctly placed
    returns (their shares are added to it inside loss().backward(), where grad mode is
    off); a term that depends on no node (a constant, no gradient) is no error."""
    graph, mu = _graph_with_nodes()
    x2 = graph._outputs[2]
    R = graph.lambda_return(torch.zeros(3, N, 1), torch.zeros(4, N, 1), GAMMA, LAM,
                            convention="dreamerv1")
    graph.add_objective(x2.sum(1), step=0)
    with pytest.raises(ValueError, match=r"^misplaced term: the objective term of step 0 depends "
                                         r"on node 'action' of step 2, a later step"):
        graph.loss(-R.mean()).backward()
    graph, mu = _graph_with_nodes()
    graph.add_objective(torch.ones(N), step=0)
    graph.add_objective(graph._outputs[2].sum(1), step=2)
    graph.backward()
    assert mu.grad is not None and bool(torch.isfinite(mu.grad).all())
