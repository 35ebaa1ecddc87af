"""Toy control problems for testing and measuring the estimators.

A system has `initial(B, like, generator)` (start states [B, S] of like's
dtype and device), `features(s)` (the policy's input), `step(s, a, graph, t)`
(the next state; it may add nodes of step t to `graph`, e.g. process noise),
`reward(s_next)` ([B]) and `make_policy(hidden, dtype)` (the module that
produces the action node's (mu, sigma)). `policy_gradient` runs one estimator
on it with one action node per step (pre-tanh where `squash`) and the reward
r_t = r(s_{t+1}) as the objective term of step t (of the last step only where
`terminal`).

- `LinearGaussian`: s' = a s + b u, reward -q s'^2, with a linear policy:
  the expected return has a closed form, so the exact gradient is known.
- `ChaoticRotor`: s' = s + K sin(s) + a_max tanh(u), reward cos(s'): for
  K = 3 the map stretches tangent vectors by e^0.12 per step (its largest
  Lyapunov exponent with a random policy), so RP gradients grow exponentially
  with the horizon (the "curse of chaos") while LR gradients grow only with
  the number of reward terms.

The other chaotic systems of the benchmark suite (`python -m tpx_ext.gradvar
--suite`) differ in how fast RP explodes (each docstring gives the largest
Lyapunov exponent per step, as `lyapunov_exponent` measures it with a random
policy of width 16 under the system's own noise), in what the node is (an action, the state itself, process
noise without trainable parameters) and in where the objective is:

- `NoisyRNN`: a chaotic 2-D recurrent network with Gaussian state noise at
  every step and a loss on the final state; the only parameter is its gain.
- `TanhRNN`: the same with tanh units, where RP stays the better estimator
  for ~30 steps before it explodes (not chaotic on average: its gradient
  grows by intermittent bursts).
- `SigmoidRNN`: proppo's demo, a 2-D sigmoid network of rank one with tiny noise
  (not chaotic: a stable cycle).
- `LowRankSigmoidRNN`, `LowRankTanhRNN`: chaotic 4-D sigmoid and 6-D tanh networks
  whose maps have rank one and two, so the node's coordinates move together (small and
  moderate noise).
- `LogisticMap`: the logistic map whose growth rate a policy sets; RP
  overflows float32 at long horizons.
- `Lorenz`: the Lorenz-63 system pushed by a policy; slow chaos.
- `DoublePendulum`: a torque-driven double pendulum with process noise on its
  velocities as a second node of every step (a node whose (mu, sigma) come
  from a module without trainable parameters, like Dreamer's latent nodes).
"""

import math
from typing import Dict, List, Optional, Type

import torch
from torch import Tensor, nn

from ..estimators import Estimator, NodeStats


class GaussianPolicy(nn.Module):
    """(mu, sigma) = (MLP(x), exp(log_std)); hidden=0 makes mu linear in x."""

    def __init__(self, in_features: int, hidden: int = 32, log_std: float = -0.5,
                 dtype=torch.float32, out_features: int = 1):
        super().__init__()
        if hidden:
            self.mu = nn.Sequential(nn.Linear(in_features, hidden, dtype=dtype), nn.Tanh(),
                                    nn.Linear(hidden, out_features, dtype=dtype))
        else:
            self.mu = nn.Linear(in_features, out_features, dtype=dtype)
        self.log_std = nn.Parameter(torch.full((out_features,), log_std, dtype=dtype))

    def forward(self, x: Tensor):
        mu = self.mu(x)
        return mu, self.log_std.exp().expand_as(mu)


class ToySystem:
    """Defaults of the interface above: one action per step, a reward at every step,
    no nodes besides the action, a `GaussianPolicy` on the features."""

    squash = True  # the action is tanh of the node
    terminal = False  # True: only the last step has an objective term
    baseline = None  # the action nodes' LR baseline (None: 0; or "leave-one-out")
    features_dim = 1
    action_dim = 1

    def features(self, s: Tensor) -> Tensor:
        return s

    def make_policy(self, hidden: int, dtype=torch.float32) -> nn.Module:
        return GaussianPolicy(self.features_dim, hidden, dtype=dtype, out_features=self.action_dim)

    def jacobian(self, policy: nn.Module, x: Tensor) -> Optional[Tensor]:
        """The node's `jacobian` (f'(z) of mu = f(z), f elementwise), None where mu has no
        elementwise output map (a linear layer's output)."""
        return None


class LinearGaussian(ToySystem):
    """s' = a s + b u, u ~ N(w s + c, sigma^2), s_0 = s0, reward -q s'^2 (uses no tanh)."""

    squash = False

    def __init__(self, a: float = 0.9, b: float = 0.5, q: float = 1.0, s0: float = 1.0):
        self.a, self.b, self.q, self.s0 = a, b, q, s0

    def initial(self, B: int, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return torch.full((B, 1), self.s0, dtype=like.dtype, device=like.device)

    def step(self, s: Tensor, u: Tensor, graph=None, t: int = 0) -> Tensor:
        return self.a * s + self.b * u

    def reward(self, s: Tensor) -> Tensor:
        return -self.q * s[:, 0] ** 2

    def make_policy(self, hidden: int = 0, dtype=torch.float64) -> nn.Module:
        return GaussianPolicy(1, 0, dtype=dtype)  # the closed form needs a linear policy

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


class ChaoticRotor(ToySystem):
    """s' = s + K sin(s) + a_max tanh(u), s_0 ~ U(-pi, pi), reward cos(s')."""

    features_dim = 2

    def __init__(self, K: float = 3.0, a_max: float = 1.0):
        self.K, self.a_max = K, a_max

    def initial(self, B: int, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        u = torch.rand((B, 1), generator=generator, dtype=like.dtype, device=like.device)
        return (2 * u - 1) * math.pi

    def features(self, s: Tensor) -> Tensor:
        return torch.cat([torch.sin(s), torch.cos(s)], dim=1)

    def step(self, s: Tensor, a: Tensor, graph=None, t: int = 0) -> Tensor:
        return s + self.K * torch.sin(s) + self.a_max * a

    def reward(self, s: Tensor) -> Tensor:
        return torch.cos(s[:, 0])


# name -> (f, f'): the RNNs' elementwise units
ACTIVATIONS = {
    "sin": (torch.sin, torch.cos),
    "tanh": (torch.tanh, lambda z: 1 - torch.tanh(z) ** 2),
    "sigmoid": (torch.sigmoid, lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z))),
}


class RNNCell(nn.Module):
    """(mu, sigma) = (act(gain W x + b), noise): the next state's distribution.

    W and b are fixed; the gain is the only trainable parameter."""

    def __init__(self, W, bias, gain: float, noise: float, activation: str, dtype=torch.float32):
        super().__init__()
        self.register_buffer("W", torch.tensor(W, dtype=dtype))
        self.register_buffer("b", torch.tensor(bias, dtype=dtype))
        self.gain = nn.Parameter(torch.tensor(gain, dtype=dtype))
        self.noise = noise
        self.act, self.act_derivative = ACTIVATIONS[activation]

    def forward(self, x: Tensor):
        mu = self.act(self._pre(x))
        return mu, torch.full_like(mu, self.noise)

    def _pre(self, x: Tensor) -> Tensor:
        return self.gain * (x @ self.W.T) + self.b

    def derivative(self, x: Tensor) -> Tensor:
        """act'(z) at z = gain W x + b, detached: d mu / d z, elementwise."""
        with torch.no_grad():
            return self.act_derivative(self._pre(x))


def _rotation(angle: float):
    c, s = math.cos(angle), math.sin(angle)
    return [[c, -s], [s, c]]


class NoisyRNN(ToySystem):
    """x' = sin(g W x + b) + noise eps (the node is the state), W a rotation by 1 rad,
    x_0 ~ U(-1, 1)^2, and one objective term on the final state, -|x_H - target|^2. The
    gradient is taken with respect to the gain g (the only parameter). Largest Lyapunov
    exponent ~0.05 per step at the default g = 1.85 (it grows with g: ~0.14 at g = 2,
    ~0.4 at g = 2.5, below 0 at g <= 1.7); the sine's folding makes the RP gradient
    heavy-tailed, so its variance explodes much faster than e^(2 * 0.05 H)."""

    squash = False
    terminal = True
    features_dim = 2
    action_dim = 2
    activation = "sin"

    def __init__(self, gain: float = 1.85, W=None, bias=(0.3, -0.2), noise: float = 0.1,
                 target=(0.5, -0.5)):
        self.gain, self.W = gain, W if W is not None else _rotation(1.0)
        self.bias, self.noise, self.target = bias, noise, target

    def initial(self, B: int, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        u = torch.rand((B, self.features_dim), generator=generator, dtype=like.dtype,
                       device=like.device)
        return 2 * u - 1

    def step(self, s: Tensor, x: Tensor, graph=None, t: int = 0) -> Tensor:
        return x  # the node's sample is the next state

    def reward(self, s: Tensor) -> Tensor:
        return -((s - s.new_tensor(self.target)) ** 2).sum(1)

    def make_policy(self, hidden: int = 0, dtype=torch.float32) -> nn.Module:
        return RNNCell(self.W, self.bias, self.gain, self.noise, self.activation, dtype)

    def jacobian(self, policy: nn.Module, x: Tensor) -> Optional[Tensor]:
        return policy.derivative(x)


class TanhRNN(NoisyRNN):
    """The same with x' = tanh(g W x + b) + noise eps and W, b from a random search for a
    2-D tanh network with a positive Lyapunov exponent under this noise at g = 1. At the
    default g = 0.55 the exponent is negative on average (~-0.12 per step), but expansion
    is intermittent and the RP gradient heavy-tailed: its variance grows ~20x from H = 10
    to 30 and ~100x from 30 to 100, so RP is the better estimator up to H ~ 30 and LR
    beyond: the regime where weights from single batches can import LR noise."""

    activation = "tanh"

    def __init__(self, gain: float = 0.55, W=((1.3254, 11.9891), (-0.8789, -2.4027)),
                 bias=(-0.4284, -0.5745), noise: float = 0.1, target=(0.5, -0.5)):
        super().__init__(gain, [list(r) for r in W], bias, noise, target)


class SigmoidRNN(NoisyRNN):
    """proppo's `examples/rnn_demo.py` (the TP authors' demo), exactly: s' = sigmoid(g s W) +
    noise eps with W = [[-5, -25], [5, 25]] (row vector times W), g = 2.4, noise 0.001,
    s_0 = (0.35, 0.55) for every sample, and the loss 0.5 |1 - s_H|^2 on the final state (the
    objective is its negative). The map is rank one: s W = (s2 - s1) (5, 25), so the node's two
    coordinates move together, and the noise is tiny against the state's range (0, 1): the
    class of system where per-coordinate variances misjudge what each estimator adds to the
    parameter's gradient. Not chaotic: d = s2 - s1 follows d' = sigmoid(25 g d) - sigmoid(5 g d),
    which at g = 2.4 has a stable 4-cycle that the tiny noise does not leave (largest Lyapunov
    exponent ~-0.2 per step); RP and LR variances grow alike with the horizon."""

    activation = "sigmoid"
    baseline = "leave-one-out"  # as the demo's LR and TP

    def __init__(self, gain: float = 2.4, W=((-5.0, -25.0), (5.0, 25.0)), bias=(0.0, 0.0),
                 noise: float = 0.001, start=(0.35, 0.55), target=(1.0, 1.0)):
        # RNNCell computes x W^T: store the demo's W transposed.
        super().__init__(gain, [list(c) for c in zip(*W)], bias, noise, target)
        self.start = start

    def initial(self, B: int, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return like.new_tensor(self.start).expand(B, -1).clone()

    def reward(self, s: Tensor) -> Tensor:
        return -0.5 * ((s - s.new_tensor(self.target)) ** 2).sum(1)


def _low_rank(us, vs):
    """W = sum_k u_k v_k^T as nested lists: x W^T = sum_k (x . v_k) u_k."""
    return [[sum(u[i] * v[j] for u, v in zip(us, vs)) for j in range(len(vs[0]))]
            for i in range(len(us[0]))]


class LowRankSigmoidRNN(SigmoidRNN):
    """`SigmoidRNN` in 4-D: s' = sigmoid(g W s + b) + noise eps with W = u v^T of rank one,
    u = (-14, 10, 19, 15), v = (0.5, 0.5, -1, 0.5), b = (-1.9, -1.6, 0.2, -1.6) (from a random
    search for a map that stays chaotic under this noise for gains within 5% of g = 1), small
    noise 0.002, s_0 = (0.35, 0.55, 0.45, 0.65) for every sample, and the loss
    0.5 |1 - s_H|^2 on the final state. W s = (v . s) u: every coordinate of the next state is
    a function of the one scalar v . s, so the node's four coordinates move together (their
    means lie on a curve) and the dynamics is the 1-D map z' = v . sigmoid(g z u + b) + v . eps.
    Largest Lyapunov exponent ~0.2 per step."""

    features_dim = 4
    action_dim = 4

    def __init__(self, gain: float = 1.0, u=(-14.0, 10.0, 19.0, 15.0), v=(0.5, 0.5, -1.0, 0.5),
                 bias=(-1.9, -1.6, 0.2, -1.6), noise: float = 0.002,
                 start=(0.35, 0.55, 0.45, 0.65), target=(1.0, 1.0, 1.0, 1.0)):
        # SigmoidRNN takes the demo's s W: W = v u^T gives (s . v) u.
        super().__init__(gain, _low_rank((v,), (u,)), bias, noise, start, target)


class LowRankTanhRNN(NoisyRNN):
    """A 6-D tanh network of rank two: s' = tanh(g W s + b) + noise eps with
    W = u1 v1^T + u2 v2^T (the numbers below, from a random search for a map that stays
    chaotic under this noise for gains within 5% of g = 1), moderate noise 0.03,
    s_0 ~ U(-1, 1)^6, and one objective term on the final state, -|s_H - target|^2.
    W s = (v1 . s) u1 + (v2 . s) u2: the next state depends on s only through two
    projections, so the node's six coordinates are driven by two shared inputs and move
    together (the dynamics is a 2-D map through six tanh units). Largest Lyapunov exponent
    ~0.18 per step."""

    features_dim = 6
    action_dim = 6
    activation = "tanh"

    def __init__(self, gain: float = 1.0,
                 u=((-0.5, 0.0, 2.0, 2.0, 1.0, 2.5), (-1.0, 2.5, -3.0, 1.0, -0.5, -2.0)),
                 v=((0.5, 0.5, -0.5, -1.0, 0.5, 0.5), (0.0, 1.0, 1.0, 1.0, 0.5, -0.5)),
                 bias=(0.5, 0.1, 0.4, -0.7, 0.3, -0.3), noise: float = 0.03,
                 target=(0.5, -0.5, 0.5, -0.5, 0.5, -0.5)):
        super().__init__(gain, _low_rank(u, v), bias, noise, target)


class LogisticMap(ToySystem):
    """s' = r s (1 - s) with growth rate r = r0 + dr tanh(u) set by the policy, s in (0, 1),
    s_0 ~ U(0.05, 0.95), reward 1 - 4 (s' - 1/2)^2. For r in (3.65, 3.95) the map is chaotic
    (Lyapunov exponent ~0.36 per step), the fastest chaos of the suite: RP gradients grow
    like e^(0.36 H) and can overflow float32 (non-finite) at the longest horizons."""

    features_dim = 2

    def __init__(self, r0: float = 3.8, dr: float = 0.15):
        self.r0, self.dr = r0, dr

    def initial(self, B: int, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        u = torch.rand((B, 1), generator=generator, dtype=like.dtype, device=like.device)
        return 0.05 + 0.9 * u

    def features(self, s: Tensor) -> Tensor:
        return torch.cat([2 * s - 1, torch.cos(math.pi * s)], dim=1)

    def step(self, s: Tensor, a: Tensor, graph=None, t: int = 0) -> Tensor:
        return (self.r0 + self.dr * a) * s * (1 - s)

    def reward(self, s: Tensor) -> Tensor:
        return 1 - 4 * (s[:, 0] - 0.5) ** 2


class Lorenz(ToySystem):
    """Lorenz-63 (sigma 10, rho 28, beta 8/3) with the action added to dx/dt (times
    `force`), one midpoint (RK2) step of dt per step; start states on the attractor;
    reward tanh(x / 8) (stay on the x > 0 wing). Lyapunov exponent ~0.045 per step
    (Lorenz's 0.9 per unit time, plus the policy's push): RP degrades slowly."""

    features_dim = 3

    def __init__(self, dt: float = 0.05, force: float = 10.0, sigma: float = 10.0,
                 rho: float = 28.0, beta: float = 8.0 / 3.0):
        self.dt, self.force, self.sigma, self.rho, self.beta = dt, force, sigma, rho, beta
        self._attractor: Dict = {}

    def _derivative(self, s: Tensor, push: Tensor) -> Tensor:
        x, y, z = s.unbind(1)
        return torch.stack([self.sigma * (y - x) + push, x * (self.rho - z) - y,
                            x * y - self.beta * z], dim=1)

    def _advance(self, s: Tensor, push: Tensor) -> Tensor:
        half = s + 0.5 * self.dt * self._derivative(s, push)
        return s + self.dt * self._derivative(half, push)

    def attractor(self, like: Tensor, points: int = 4096) -> Tensor:
        """`points` states on the attractor (uncontrolled run from a fixed seed)."""
        key = (like.dtype, like.device)
        if key not in self._attractor:
            gen = torch.Generator().manual_seed(0)
            s = torch.randn(points, 3, generator=gen, dtype=torch.float64) + torch.tensor([0, 0, 25.0])
            zero = torch.zeros(points, dtype=torch.float64)
            for _ in range(500):
                s = self._advance(s, zero)
            self._attractor[key] = s.to(dtype=like.dtype, device=like.device)
        return self._attractor[key]

    def initial(self, B: int, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        bank = self.attractor(like)
        idx = torch.randint(0, bank.shape[0], (B,), generator=generator,
                            device=generator.device if generator is not None else "cpu")
        return bank[idx.to(bank.device)]

    def features(self, s: Tensor) -> Tensor:
        return (s - s.new_tensor([0.0, 0.0, 25.0])) / 20.0

    def step(self, s: Tensor, a: Tensor, graph=None, t: int = 0) -> Tensor:
        return self._advance(s, self.force * a[:, 0])

    def reward(self, s: Tensor) -> Tensor:
        return torch.tanh(s[:, 0] / 8.0)


class NoisyDynamics(nn.Module):
    """(mu, sigma) of a simulator's next state, (mean_step(s, a), noise): no trainable
    parameters, like a frozen world model's transition."""

    def __init__(self, system: ToySystem):
        super().__init__()
        self.system = system

    def forward(self, s: Tensor, a: Tensor):
        mu = self.system.mean_step(s, a)
        return mu, torch.full_like(mu, self.system.noise)


class NoisySimulator(ToySystem):
    """A simulator with Gaussian process noise `noise`: the next state is a node of the step
    ("latent"), whose (mu, sigma) come from `NoisyDynamics`. Subclasses define the noiseless
    step `mean_step(s, a)`."""

    noise: float

    def __init__(self):
        self.dynamics = NoisyDynamics(self)

    def step(self, s: Tensor, a: Tensor, graph=None, t: int = 0) -> Tensor:
        if graph is None:
            mu, sigma = self.dynamics(s, a)
            return mu + sigma * torch.randn_like(mu)
        s = graph.cut(s)
        mu, sigma = self.dynamics(s, a)
        return graph.sample(mu, sigma, t, name="latent", source=(self.dynamics, (s, a)))


class DoublePendulum(NoisySimulator):
    """A double pendulum (unit masses and lengths, gravity g, angles from the downward
    vertical) whose two joints get angular accelerations torque * tanh(u) from the policy,
    with quadratic air drag (which keeps the explicit integration stable). State (theta1,
    theta2, omega1, omega2); a step is `substeps` semi-implicit Euler steps of dt / substeps,
    and the next state is a node of the same step (process noise `noise` on every
    coordinate, produced by `NoisyDynamics`, which has no trainable parameters).
    Start: both angles ~ U(-pi, pi), at rest. Reward: the tip's height / 2. Lyapunov
    exponent ~0.06 per step over the first 50 steps, ~0.02 over 200 (the drag drains the
    energy that the start and the random torques put in): the mildest chaos of the suite."""

    features_dim = 6
    action_dim = 2

    def __init__(self, dt: float = 0.1, substeps: int = 3, g: float = 9.81, torque: float = 2.0,
                 drag: float = 0.02, noise: float = 0.01):
        self.dt, self.substeps, self.g, self.torque = dt, substeps, g, torque
        self.drag, self.noise = drag, noise
        super().__init__()

    def initial(self, B: int, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        u = torch.rand((B, 2), generator=generator, dtype=like.dtype, device=like.device)
        return torch.cat([(2 * u - 1) * math.pi, torch.zeros_like(u)], dim=1)

    def features(self, s: Tensor) -> Tensor:
        th = s[:, :2]
        return torch.cat([torch.sin(th), torch.cos(th), s[:, 2:] / 5.0], dim=1)

    def _acceleration(self, th: Tensor, w: Tensor, push: Tensor) -> Tensor:
        th1, th2 = th.unbind(1)
        w1, w2 = w.unbind(1)
        g, delta = self.g, th1 - th2
        den = 3 - torch.cos(2 * delta)
        sd, cd = torch.sin(delta), torch.cos(delta)
        acc1 = (-3 * g * torch.sin(th1) - g * torch.sin(th1 - 2 * th2)
                - 2 * sd * (w2**2 + w1**2 * cd)) / den
        acc2 = 2 * sd * (2 * w1**2 + 2 * g * torch.cos(th1) + w2**2 * cd) / den
        return torch.stack([acc1, acc2], dim=1) + push - self.drag * w.abs() * w

    def mean_step(self, s: Tensor, a: Tensor) -> Tensor:
        th, w = s[:, :2], s[:, 2:]
        h, push = self.dt / self.substeps, self.torque * a
        for _ in range(self.substeps):
            w = w + h * self._acceleration(th, w, push)
            th = th + h * w
        return torch.cat([th, w], dim=1)

    def reward(self, s: Tensor) -> Tensor:
        return -(torch.cos(s[:, 0]) + torch.cos(s[:, 1])) / 2


class CartPoleSwingUp(NoisySimulator):
    """PILCO's cart-pole (cart and pole 0.5 kg, pole length 0.5 m as a uniform rod, cart
    friction 0.1, g = 9.82, force 10 tanh(u) N): state (x, theta, x', theta'), theta = 0
    hanging down. A step is `substeps` RK4 steps of dt / substeps, and the
    next state is a node of the same step (process noise `noise` on every coordinate, from
    `NoisyDynamics`), as in PIPPS's experiments. Start: N(0, 0.1^2) on every coordinate.
    Reward: PILCO's saturating reward exp(-d^2 / (2 * 0.25^2)), d the distance from the
    pole's tip to its upright position above x = 0, so 1 is balanced at the centre and a
    hanging pole scores exp(-8) ~ 3e-4."""

    features_dim = 5
    action_dim = 1

    def __init__(self, dt: float = 0.1, substeps: int = 2, noise: float = 0.01,
                 cart_mass: float = 0.5, pole_mass: float = 0.5, length: float = 0.5,
                 friction: float = 0.1, g: float = 9.82, force: float = 10.0, width: float = 0.25):
        self.dt, self.substeps, self.noise = dt, substeps, noise
        self.M, self.m, self.l, self.b, self.g = cart_mass, pole_mass, length, friction, g
        self.force, self.width = force, width
        super().__init__()

    def initial(self, B: int, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return 0.1 * torch.randn((B, 4), generator=generator, dtype=like.dtype).to(like.device)

    def features(self, s: Tensor) -> Tensor:
        x, th, v, w = s.unbind(1)
        return torch.stack([x, torch.sin(th), torch.cos(th), v / 2.0, w / 5.0], dim=1)

    def _acceleration(self, th: Tensor, v: Tensor, w: Tensor, f: Tensor):
        M, m, l, b, g = self.M, self.m, self.l, self.b, self.g
        sin, cos = torch.sin(th), torch.cos(th)
        den = 4 * (M + m) - 3 * m * cos**2
        acc_x = (2 * m * l * w**2 * sin + 3 * m * g * sin * cos + 4 * f - 4 * b * v) / den
        acc_th = (-3 * m * l * w**2 * sin * cos - 6 * (M + m) * g * sin
                  - 6 * (f - b * v) * cos) / (l * den)
        return acc_x, acc_th

    def _derivative(self, s: Tensor, f: Tensor) -> Tensor:
        x, th, v, w = s.unbind(1)
        acc_x, acc_th = self._acceleration(th, v, w, f)
        return torch.stack([v, w, acc_x, acc_th], dim=1)

    def mean_step(self, s: Tensor, a: Tensor) -> Tensor:
        # RK4: semi-implicit Euler at the same cost drains 40% of a large swing's energy in
        # 2 s (its Hamiltonian is not separable); RK4 at dt / 2 keeps it within 1%
        h, f = self.dt / self.substeps, self.force * a[:, 0]
        for _ in range(self.substeps):
            k1 = self._derivative(s, f)
            k2 = self._derivative(s + h / 2 * k1, f)
            k3 = self._derivative(s + h / 2 * k2, f)
            k4 = self._derivative(s + h * k3, f)
            s = s + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return s

    def reward(self, s: Tensor) -> Tensor:
        x, th = s[:, 0], s[:, 1]
        dx, dy = x + self.l * torch.sin(th), -self.l * torch.cos(th) - self.l
        return torch.exp(-(dx**2 + dy**2) / (2 * self.width**2))


SYSTEMS: Dict[str, Type[ToySystem]] = {
    "rotor": ChaoticRotor, "rnn": NoisyRNN, "rnn-tanh": TanhRNN, "rnn-sigmoid": SigmoidRNN,
    "rnn-sigmoid4": LowRankSigmoidRNN, "rnn-tanh6": LowRankTanhRNN, "logistic": LogisticMap,
    "lorenz": Lorenz, "pendulum": DoublePendulum, "cartpole": CartPoleSwingUp,
    "linear": LinearGaussian,
}
CHAOTIC = ("rotor", "rnn", "rnn-tanh", "rnn-sigmoid", "rnn-sigmoid4", "rnn-tanh6", "logistic",
           "lorenz", "pendulum")


def lyapunov_exponent(system: ToySystem, policy: nn.Module, steps: int = 200, batch: int = 256,
                      burn: int = 50, seed: int = 0) -> float:
    """Largest Lyapunov exponent per step of the closed loop s -> step(s, a(s)) with the
    policy's and the system's noise drawn once per step: the mean over `batch` start states
    of the log growth of a tangent vector over `steps` steps (after `burn` steps)."""
    torch.manual_seed(seed)  # the process noise that `step` draws itself
    gen = torch.Generator().manual_seed(seed)
    like = next(policy.parameters())
    s = system.initial(batch, like, gen)
    v = torch.randn(s.shape, generator=gen, dtype=s.dtype).to(s.device)
    v = v / v.norm(dim=1, keepdim=True)
    total = torch.zeros(batch, dtype=torch.float64, device=s.device)
    for t in range(burn + steps):
        mu_shape = policy(system.features(s))[0].shape
        eps = torch.randn(mu_shape, generator=gen, dtype=s.dtype).to(s.device)

        def closed_loop(state):
            mu, sigma = policy(system.features(state))
            u = mu + sigma * eps
            return system.step(state, torch.tanh(u) if system.squash else u)

        with torch.no_grad():
            s, jv = torch.func.jvp(closed_loop, (s,), (v,))
        norm = jv.norm(dim=1, keepdim=True)
        if t >= burn:
            total += norm[:, 0].double().log()
        v = jv / norm
    return (total / steps).mean().item()


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
        a = draw(mu, sigma, step=t, source=(policy, x), baseline=system.baseline,
                 jacobian=system.jacobian(policy, x))
        s = system.step(s, a, graph, t)
        if not system.terminal or t == horizon - 1:
            graph.add_objective(system.reward(s), step=t)
    return graph.backward()
