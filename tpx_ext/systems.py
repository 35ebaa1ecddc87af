"""Toy control problems for testing and measuring the estimators.

A system has `initial(B, like, generator)` (start states [B, 1] of like's
dtype and device), `features(s)` (the policy's input), `step(s, a)` and
`reward(s_next)` ([B]); `policy_gradient` runs one estimator on it with one
node per step (the action; pre-tanh where `squash`) and the reward
r_t = r(s_{t+1}) as the objective term of step t.

- `LinearGaussian`: s' = a s + b u, reward -q s'^2, with a linear policy:
  the expected return has a closed form, so the exact gradient is known.
- `ChaoticRotor`: s' = s + K sin(s) + a_max tanh(u), reward cos(s'): for
  K = 3 the map stretches by ~1.5 per step on average (|1 + K cos s|), so RP
  gradients grow exponentially with the horizon (the "curse of chaos") while
  LR gradients grow only with the number of reward terms.
"""

import math
from typing import List, Optional

import torch
from torch import Tensor, nn

from .estimators import Estimator, NodeStats


class GaussianPolicy(nn.Module):
    """(mu, sigma) = (MLP(x), exp(log_std)); hidden=0 makes mu linear in x."""

    def __init__(self, in_features: int, hidden: int = 32, log_std: float = -0.5,
                 dtype=torch.float32):
        super().__init__()
        if hidden:
            self.mu = nn.Sequential(nn.Linear(in_features, hidden, dtype=dtype), nn.Tanh(),
                                    nn.Linear(hidden, 1, dtype=dtype))
        else:
            self.mu = nn.Linear(in_features, 1, dtype=dtype)
        self.log_std = nn.Parameter(torch.full((1,), log_std, dtype=dtype))

    def forward(self, x: Tensor):
        mu = self.mu(x)
        return mu, self.log_std.exp().expand_as(mu)


class LinearGaussian:
    """s' = a s + b u, u ~ N(w s + c, sigma^2), s_0 = s0, reward -q s'^2 (uses no tanh)."""

    squash = False

    def __init__(self, a: float = 0.9, b: float = 0.5, q: float = 1.0, s0: float = 1.0):
        self.a, self.b, self.q, self.s0 = a, b, q, s0

    def initial(self, B: int, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return torch.full((B, 1), self.s0, dtype=like.dtype, device=like.device)

    def features(self, s: Tensor) -> Tensor:
        return s

    def step(self, s: Tensor, u: Tensor) -> Tensor:
        return self.a * s + self.b * u

    def reward(self, s: Tensor) -> Tensor:
        return -self.q * s[:, 0] ** 2

    def expected_return(self, policy: GaussianPolicy, horizon: int) -> Tensor:
        """E[sum_t r_t] in closed form for a linear `policy` (hidden=0): the state stays
        Gaussian with mean m and variance P. Differentiable in the policy's parameters."""
        w, c = policy.mu.weight[0, 0], policy.mu.bias[0]
        var_u = policy.log_std.exp()[0] ** 2
        m, P, total = w.new_tensor(self.s0), w.new_zeros(()), 0.0
        for _ in range(horizon):
            gain = self.a + self.b * w
            m, P = gain * m + self.b * c, gain**2 * P + self.b**2 * var_u
            total = total - self.q * (m**2 + P)
        return total


class ChaoticRotor:
    """s' = s + K sin(s) + a_max tanh(u), s_0 ~ U(-pi, pi), reward cos(s')."""

    squash = True

    def __init__(self, K: float = 3.0, a_max: float = 1.0):
        self.K, self.a_max = K, a_max

    def initial(self, B: int, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        u = torch.rand((B, 1), generator=generator, dtype=like.dtype, device=like.device)
        return (2 * u - 1) * math.pi

    def features(self, s: Tensor) -> Tensor:
        return torch.cat([torch.sin(s), torch.cos(s)], dim=1)

    def step(self, s: Tensor, a: Tensor) -> Tensor:
        return s + self.K * torch.sin(s) + self.a_max * a

    def reward(self, s: Tensor) -> Tensor:
        return torch.cos(s[:, 0])


def policy_gradient(estimator: Estimator, policy: nn.Module, system, horizon: int, batch: int,
                    generator: Optional[torch.Generator] = None) -> List[NodeStats]:
    """One gradient of the mean return over `horizon` steps into policy's .grad."""
    like = next(policy.parameters())
    graph = estimator.graph(generator)
    s = system.initial(batch, like, generator)
    draw = graph.sample_tanh if system.squash else graph.sample
    for t in range(horizon):
        x = graph.cut(system.features(s))
        mu, sigma = policy(x)
        a = draw(mu, sigma, step=t, source=(policy, x))
        s = system.step(s, a)
        graph.add_objective(system.reward(s), step=t)
    return graph.backward()
