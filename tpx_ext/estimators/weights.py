"""How a tpx node turns its batch statistics into the weight on LR (TPX.md sec. 2).

Default rule: each coordinate's variance is replaced by an upper confidence
bound, the batch variance plus `ucb` standard errors of it,

    v = s^2 + ucb * sqrt(max(m4 - s^4, 0) / B),

with s^2 the unbiased batch variance and m4 the batch's 4th central moment
(1/B), so that k = v_RP / (v_LR + v_RP) comes from the bounds. For
near-Gaussian samples the bound is s^2 (1 + ucb sqrt(2 / B)) for both
estimators and moves k little; for heavy-tailed samples (an RP gradient through
chaotic dynamics, whose batch variance underestimates the true one in most
batches and explodes in a few) it raises that estimator's variance in the very
batch whose outliers would otherwise leak into the combined gradient.
ucb = 0 is plain batch statistics. With momentum > 0 the bounds, not the plain
variances, go into the running averages.

The fused op `gaussian_tpx_backward` has no 4th moment yet: ucb > 0 runs here
in float64 PyTorch from the per-sample formulas of `tpx_ext.reference`, with
the op's edge cases (a coordinate with a non-finite sample of one estimator
gives all weight to the other; both non-finite zero the gradient there).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ..ops import gaussian_tpx_backward

DEFAULT_UCB = 2.0


@dataclass(frozen=True)
class WeightRule:
    """The weight rule of a tpx estimator (see the module docstring)."""

    momentum: float = 0.0
    ucb: float = DEFAULT_UCB

    def validate(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (self.ucb >= 0.0 and self.ucb < float("inf")):
            raise ValueError(f"ucb must be finite and >= 0, got {self.ucb}")


def variance_bounds(g: Tensor, ucb: float) -> Tuple[Tensor, Tensor]:
    """(batch variances, their upper confidence bounds) over dim 1 of g [N, B, C] float64,
    each [N, C]; +inf where a column has a non-finite entry (reference.batch_variance).

    The bound is computed as s^2 (1 + ucb sqrt(max(m4 / s^4 - 1, 0) / B)) from values
    divided by the column's largest deviation, so that 4th powers of gradients up to the
    float64 range cannot overflow."""
    B = g.shape[1]
    finite = torch.isfinite(g).all(1)
    y = torch.where(finite[:, None], g, 0.0)
    y = y - y[:, :1]  # shifted by the first row, as the reference: constant columns give 0
    dev = y - y.mean(1, keepdim=True)
    sq = dev.square()
    var = sq.sum(1) / (B - 1) if B > 1 else torch.zeros_like(y[:, 0])
    var = torch.where(finite & torch.isfinite(var), var, torch.inf)
    if not ucb or B < 2:
        return var, var
    scale = sq.amax(1)  # squared largest deviation
    scale = torch.where(scale > 0, scale, 1.0)
    sq = sq / scale[:, None]
    s2 = sq.sum(1) / (B - 1)
    m4 = sq.square().mean(1)
    excess = torch.where(s2 > 0, m4 / s2.square() - 1, 0.0).clamp_min(0)
    bound = var * (1 + ucb * (excess / B).sqrt())
    return var, torch.where(torch.isfinite(var), bound, var)


def _update(running: Tensor, batch: Tensor, momentum: float) -> None:
    """EMA of `batch` into `running`, in place, where `batch` is finite; NaN in `running`
    means no data yet (replaced). The op's rule (reference.smoothed_variance)."""
    finite = torch.isfinite(batch)
    ema = torch.where(torch.isnan(running), batch, momentum * running + (1 - momentum) * batch)
    running.copy_(torch.where(finite, ema, running))


def combine(rule: WeightRule, running: Optional[Tuple[Tensor, Tensor]], d: Tensor, eps: Tensor,
            sigma: Tensor, adv: Tensor, check_sigma: bool = True):
    """Combined (grad_mu, grad_sigma) [B, D] in d's dtype, and (k, var_lr, var_rp, nonfinite)
    as the op returns them (var_*: the plain batch variances). d, eps, sigma: [B, D];
    adv: [B]; running: the node's float64 buffers (var_lr, var_rp) [2D], updated in place."""
    if not rule.ucb:
        run = running if running is not None else (None, None)
        r = gaussian_tpx_backward(d, eps, sigma, adv, *run, rule.momentum, None, check_sigma)
        return r.grad_mu, r.grad_sigma, r.k, r.var_lr, r.var_rp, r.nonfinite

    d64, eps64, sigma64 = d.double(), eps.double(), sigma.double()
    if check_sigma and not bool(((sigma64 > 0) & torch.isfinite(sigma64)).all()):
        raise ValueError("gaussian_tpx_backward: sigma must be finite and > 0 everywhere")
    g_lr, g_rp = reference.gaussian_per_sample(d64, eps64, sigma64, adv.double())
    (var_lr, var_rp), (v_lr, v_rp) = variance_bounds(torch.stack([g_lr, g_rp]), rule.ucb)
    if running is not None:
        for buf, v in zip(running, (v_lr, v_rp)):
            _update(buf, v, rule.momentum)
        v_lr = torch.where(torch.isfinite(v_lr), running[0], v_lr)
        v_rp = torch.where(torch.isfinite(v_rp), running[1], v_rp)
    both_bad = torch.isinf(var_lr) & torch.isinf(var_rp)
    k = torch.where(both_bad, torch.nan, reference.lr_weight(v_lr, v_rp))
    g = torch.where(k == 0, g_rp, torch.where(k == 1, g_lr, k * g_lr + (1 - k) * g_rp))
    g = torch.where(torch.isnan(k), 0.0, g).to(d.dtype)
    D = d.shape[1]
    return g[:, :D], g[:, D:], k, var_lr, var_rp, both_bad.sum()
