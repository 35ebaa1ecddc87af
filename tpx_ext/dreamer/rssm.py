"""Recurrent state-space model (DreamerV1/V2 with a Gaussian stochastic latent).

A latent state is (deter h, stoch z) plus the Gaussian (mean, std) z was drawn from.
One step from (z_{t-1}, a_t, h_{t-1}):
    h_t = GRU(ELU(W [z_{t-1}, a_t]), h_{t-1})          deterministic path
    prior      p(z_t | h_t)       = N(mean, std)        used in imagination
    posterior  q(z_t | h_t, e_t)  = N(mean, std)        e_t: embedding of obs_t
The replay convention matches: step t holds obs_t with the action a_t that led to it.
"""

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .networks import mlp


class LatentState(NamedTuple):
    """Tensors [..., S] (mean, std, stoch) and [..., Dh] (deter)."""

    mean: Tensor
    std: Tensor
    stoch: Tensor
    deter: Tensor

    @property
    def feat(self) -> Tensor:
        """[..., S + Dh]: what the heads, the actor and the critic read."""
        return torch.cat([self.stoch, self.deter], -1)

    def map(self, fn) -> "LatentState":
        return LatentState(*(fn(x) for x in self))


def stack_states(states, dim: int = 0) -> LatentState:
    return LatentState(*(torch.stack(xs, dim) for xs in zip(*states)))


class RSSM(nn.Module):
    def __init__(self, action_dim: int, embed_dim: int, stoch: int = 30, deter: int = 200,
                 hidden: int = 200, min_std: float = 0.1):
        super().__init__()
        self.stoch_dim, self.deter_dim, self.min_std = stoch, deter, min_std
        self.img_in = nn.Linear(stoch + action_dim, hidden)
        self.gru = nn.GRUCell(hidden, deter)
        self.prior_net = mlp(deter, 2 * stoch, hidden, 1)
        self.post_net = mlp(deter + embed_dim, 2 * stoch, hidden, 1)

    @property
    def feat_dim(self) -> int:
        return self.stoch_dim + self.deter_dim

    def initial(self, n: int, device=None) -> LatentState:
        z = torch.zeros(n, self.stoch_dim, device=device)
        return LatentState(z, torch.ones_like(z), z, torch.zeros(n, self.deter_dim, device=device))

    def _gaussian(self, raw: Tensor) -> Tuple[Tensor, Tensor]:
        mean, raw_std = raw.chunk(2, -1)
        return mean, F.softplus(raw_std) + self.min_std

    def deter_step(self, stoch: Tensor, action: Tensor, deter: Tensor) -> Tensor:
        """h_t from (z_{t-1} [N, S], a_t [N, A], h_{t-1} [N, Dh])."""
        return self.gru(F.elu(self.img_in(torch.cat([stoch, action], -1))), deter)

    def prior(self, deter: Tensor) -> Tuple[Tensor, Tensor]:
        """(mean, std) [N, S] of p(z_t | h_t)."""
        return self._gaussian(self.prior_net(deter))

    def obs_step(self, prev: LatentState, action: Tensor, embed: Tensor):
        """One filtering step: (posterior, prior) of z_t given obs_t's embedding [N, E]."""
        deter = self.deter_step(prev.stoch, action, prev.deter)
        prior_mean, prior_std = self.prior(deter)
        mean, std = self._gaussian(self.post_net(torch.cat([deter, embed], -1)))
        post = LatentState(mean, std, mean + std * torch.randn_like(mean), deter)
        return post, LatentState(prior_mean, prior_std, prior_mean, deter)

    def observe(self, embed: Tensor, action: Tensor, start: Optional[LatentState] = None):
        """Posterior and prior states [B, T, ...] of sequences embed [B, T, E], action [B, T, A].

        Each sequence starts from `start` (default: the zero state, the replay batch's
        sequences being sampled from arbitrary points of their episodes)."""
        B, T = embed.shape[:2]
        state = self.initial(B, embed.device) if start is None else start
        posts, priors = [], []
        for t in range(T):
            state, prior = self.obs_step(state, action[:, t], embed[:, t])
            posts.append(state)
            priors.append(prior)
        return stack_states(posts, 1), stack_states(priors, 1)


def gaussian_kl(mean_q: Tensor, std_q: Tensor, mean_p: Tensor, std_p: Tensor) -> Tensor:
    """KL(N(mean_q, std_q) || N(mean_p, std_p)) summed over the last dim."""
    var_ratio = (std_q / std_p) ** 2
    t = ((mean_q - mean_p) / std_p) ** 2
    return 0.5 * (var_ratio + t - 1 - torch.log(var_ratio)).sum(-1)


def balanced_kl(post: LatentState, prior: LatentState, balance: float, free_nats: float):
    """The KL term of the world-model loss; returns (loss, mean KL value).

    0 < balance < 1: DreamerV2's KL balancing, balance * max(KL(sg(q) || p), free_nats) +
    (1 - balance) * max(KL(q || sg(p)), free_nats), the KLs averaged over the batch.
    balance 0: no balancing, DreamerV1's max(KL(q || p), free_nats) with gradients into both
    q and p. (Balance 0.5 is not that: it halves the gradient.)"""
    q, p = post, prior
    if balance == 0:
        kl = gaussian_kl(*q[:2], *p[:2]).mean()
        return torch.maximum(kl, torch.tensor(free_nats, device=kl.device)), kl.detach()
    sg = lambda s: s.map(torch.Tensor.detach)  # noqa: E731
    kl_prior = gaussian_kl(*sg(q)[:2], *p[:2]).mean()   # trains the prior towards q
    kl_post = gaussian_kl(*q[:2], *sg(p)[:2]).mean()    # regularises the posterior
    free = torch.tensor(free_nats, device=kl_prior.device)
    loss = balance * torch.maximum(kl_prior, free) + (1 - balance) * torch.maximum(kl_post, free)
    return loss, kl_prior.detach()
