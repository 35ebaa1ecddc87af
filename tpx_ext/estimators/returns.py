"""Returns-to-go and Dreamer's per-step objective terms (TPX.md sec. 4).

Index convention: `terms[k]` is the objective term rho_k of step k, and a node
at step t is credited with every term of a step k >= t:
G_t = sum_{k>=t} rho_k. In Dreamer the action a_t and the latent z_{t+1}
(drawn from the prior at imagination step t) are both nodes of step t.
"""

import torch
from torch import Tensor


def returns_to_go(terms: Tensor) -> Tensor:
    """G[t] = sum_{k>=t} terms[k] for terms [H, ...] (reverse cumulative sum over dim 0)."""
    return terms.flip(0).cumsum(0).flip(0)


def step_credit(weights: Tensor, gamma: float, lam: float) -> Tensor:
    """c_k = sum_{t<=k} w_t (gamma lambda)^(k-t): how much of step k's lambda-return
    terms the objective J = sum_t w_t V_t contains. weights [H] -> c [H]."""
    c = torch.empty_like(weights)
    acc = weights.new_zeros(())
    for k in range(weights.shape[0]):
        acc = acc * (gamma * lam) + weights[k]
        c[k] = acc
    return c


def lambda_return_terms(
    rewards: Tensor, values: Tensor, gamma: float, lam: float, weights: Tensor
) -> Tensor:
    """Per-step terms rho [H, B] with sum_k rho_k = sum_t w_t V_t (lambda-returns V_t).

    rewards [H, B]: r_t = r(s_{t+1}); values [H+1, B]: v(s_0) .. v(s_H);
    weights [H]: w_t (ones, gamma^t, or (1, 0, ...) for the start-state objective V_0).
    rho_k depends on the nodes of steps <= k only, so it is credited correctly.
    """
    H = rewards.shape[0]
    if rewards.dim() != 2:
        raise ValueError(f"lambda_return_terms: rewards must be [H, B], got {tuple(rewards.shape)} "
                         "(graph.lambda_return takes trailing dims of size 1)")
    if values.shape[0] != H + 1 or weights.shape != (H,):
        raise ValueError(
            f"lambda_return_terms: rewards {tuple(rewards.shape)} needs values of H+1 = {H + 1} "
            f"rows and weights of shape ({H},); got values {tuple(values.shape)}, "
            f"weights {tuple(weights.shape)}"
        )
    c = step_credit(weights.to(rewards.dtype), gamma, lam)
    bootstrap = torch.cat([gamma * (1 - lam) * values[1:H], gamma * values[H:]])
    return c.view(H, *([1] * (rewards.dim() - 1))) * (rewards + bootstrap)


def baseline_coefficients(gamma: float, lam: float, weights: Tensor) -> Tensor:
    """kappa [H] with b_t = kappa_t v(s_t) (TPX.md sec. 4):
    kappa_t = (1 - gamma lambda) sum_{k=t}^{H-2} c_k + c_{H-1}.

    With these, b_t = G_t exactly when every value and lambda-return equals v(s_t).
    """
    c = step_credit(weights, gamma, lam)
    kappa = torch.full_like(c, 0.0)
    kappa[:-1] = (1 - gamma * lam) * returns_to_go(c[:-1])
    return kappa + c[-1]


def lambda_returns(rewards: Tensor, values: Tensor, gamma: float, lam: float) -> Tensor:
    """TD(lambda) returns V [H, ...]: V_t = r_t + gamma ((1 - lam) v_{t+1} + lam V_{t+1}),
    bootstrapped with V_H = v_H. rewards [H, ...]: r_t = r(s_{t+1}); values [H+1, ...]."""
    H = rewards.shape[0]
    if values.shape[0] != H + 1:
        raise ValueError(f"lambda_returns: rewards {tuple(rewards.shape)} needs values of "
                         f"H+1 = {H + 1} rows, got {tuple(values.shape)}")
    out, nxt = [], values[H]
    for t in reversed(range(H)):
        nxt = rewards[t] + gamma * ((1 - lam) * values[t + 1] + lam * nxt)
        out.append(nxt)
    return torch.stack(out[::-1])


# Where the arrays of a lambda-return sit among the imagined states s_0 .. s_H (s_0: the
# start state, s_{j+1} after the j-th action): reward[t] is r(s_{t + r}), value[t] is
# v(s_{t + v}) for (r, v) below. Every convention runs the same recursion
#     R_t = reward[t] + discount[t] * ((1 - lam) * value[t + 1] + lam * R_{t+1}),  R_T = value[T]
# over rewards [T] and values [T + 1] (the last value is the bootstrap).
CONVENTIONS = {
    # TPX.md sec. 4 and this project's Dreamer: values of s_0 .. s_H, rewards of the next
    # state, r_t = r(s_{t+1}).
    "next_reward": (1, 0),
    # DreamerV1's code: its imagined states exclude the start state, so reward[t] and
    # value[t] both belong to s_{t+1} (called as reward[:-1], value, pcont[:-1]).
    "dreamerv1": (1, 1),
    # DreamerV2/V3's code: the imagined states include the start state, reward[t] and
    # value[t] both belong to s_t (called as reward[:-1], value, disc[:-1]).
    "dreamerv2": (0, 0),
}


def node_step_of_state(state: int) -> int:
    """The step whose nodes a function of s_j depends on last: the action a_{j-1} and the
    latent z_j are nodes of step j - 1; s_0 depends on none (it is credited to step 0)."""
    return max(state - 1, 0)


def discounted_lambda_return(rewards: Tensor, values: Tensor, discounts: Tensor, lam: float) -> Tensor:
    """R [T, N] of the recursion above; rewards [T, N], values [T + 1, N], discounts [T, N].

    The operations are DreamerV1/V2's `lambda_return`, in their order, so that code
    switched to it computes bit-identical returns.
    """
    inputs = rewards + discounts * values[1:] * (1 - lam)
    out, agg = [], values[-1]
    for t in reversed(range(rewards.shape[0])):
        agg = inputs[t] + discounts[t] * lam * agg
        out.append(agg)
    return torch.stack(out[::-1])
