"""How a tpx node turns its statistics into the weight on LR (TPX.md sec. 2).

The fused op `gaussian_tpx_backward` does batch statistics and running
statistics that include the current batch. The other rules are prototyped
here in float64 PyTorch, from the per-sample formulas of `tpx_ext.reference`:

- lagged: the weight comes from the running statistics *before* the current
  batch is folded in, so it is independent of the batch it weights and the
  estimate is exactly unbiased. A node without history (its first batch) uses
  the batch's own statistics.
- warm start: the running average uses momentum min(m, n / (n + 1)) after n
  batches, i.e. the plain mean of all batches until there have been
  1 / (1 - m) of them; otherwise the first batch would dominate a momentum-0.99
  average for hundreds of iterations.
- guard: lagged, but the current batch's variance replaces the history's where it
  is larger: a batch with an outlier (a heavy-tailed RP sample) still moves its
  own weight away from that estimator, while a batch whose variance happens to
  be small cannot pull the weight towards it. Biased like batch statistics, in
  the batches that raise a variance.
- log domain: the running average is taken over log-variances (a geometric
  mean across iterations), which a single heavy-tailed batch moves less.
- projections: the statistics are those of each sample's contribution to the
  gradient of the parameters of the module that produced (mu, sigma), g_i . t_i,
  with t_i = d zeta_i / d theta . v along `projections` random directions
  v ~ N(0, I) in parameter space (forward-mode JVPs); the mean over directions
  of the batch variance of g_i . t_i is an unbiased estimate of the trace of the
  covariance of the per-sample parameter gradients, i.e. of what `tp` computes
  exactly at O(B x P). "node": one weight per node from the scalar products (as
  tp); "coordinate": one weight per coordinate from g_ic t_ic. A node whose
  module has no trainable parameters (or no source) uses its coordinates' own
  statistics.

Whatever the rule, a coordinate where the current batch has a non-finite
sample of one estimator gives all weight to the other one, and both
non-finite zero the gradient there (as in the op).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from .. import reference
from ..ops import gaussian_tpx_backward

PROJECTIONS = ("node", "coordinate")


@dataclass(frozen=True)
class WeightRule:
    """The weight rule of a tpx estimator (see the module docstring)."""

    momentum: float = 0.0
    lagged: bool = False
    guard: bool = False
    warm_start: bool = False
    log_domain: bool = False
    projections: int = 0
    projection: str = "node"
    ucb: float = 0.0

    def validate(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.projections < 0:
            raise ValueError(f"projections must be >= 0, got {self.projections}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}")
        needs_history = self.lagged or self.guard or self.warm_start or self.log_domain
        if needs_history and not self.running:
            raise ValueError("lagged, guard, warm_start and log_domain need running statistics "
                             "(momentum > 0)")

    @property
    def running(self) -> bool:
        return self.momentum > 0.0

    @property
    def fused(self) -> bool:
        """Whether the fused op implements this rule as it stands."""
        return not (self.lagged or self.guard or self.warm_start or self.log_domain
                    or self.projections or self.ucb)


def _trainable(module: nn.Module):
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def tangents(module: nn.Module, inputs: Tuple[Tensor, ...], count: int,
             generator: torch.Generator) -> Optional[Tensor]:
    """[count, B, 2D] float64: d (mu_i, sigma_i) / d theta . v_k for v_k ~ N(0, I) over the
    module's trainable parameters (forward mode, one JVP per direction); None if it has none."""
    params = _trainable(module)
    if not params:
        return None
    buffers = {n: b.detach() for n, b in module.named_buffers()}
    inputs = tuple(x.detach() for x in inputs)

    def zeta(p):
        mu, sigma = functional_call(module, (p, buffers), inputs)
        B = mu.shape[0]
        return torch.cat([mu.reshape(B, -1), sigma.reshape(B, -1)], dim=1)

    directions = {n: torch.randn((count, *p.shape), generator=generator, dtype=p.dtype,
                                 device=p.device) for n, p in params.items()}
    return vmap(lambda v: jvp(zeta, (params,), (v,))[1])(directions).double()


def _variance(x: Tensor) -> Tensor:
    """reference.batch_variance over dim 1 of x [N, B, *rest] -> [N, *rest], in one call."""
    N, B, rest = x.shape[0], x.shape[1], x.shape[2:]
    flat = x.movedim(1, 0).reshape(B, -1)
    return reference.batch_variance(flat).reshape(N, *rest)


def _projected_variance(g: Tensor, t: Tensor, per_coordinate: bool) -> Tensor:
    """Mean over directions of the batch variance of the projected per-sample gradients:
    [2, 2D] (per coordinate) or [2, 1] (scalar products). g: [2, B, 2D] (LR, RP);
    t: [K, B, 2D]."""
    contrib = g[:, None] * t[None]  # [2, K, B, 2D]
    if not per_coordinate:
        contrib = contrib.sum(-1, keepdim=True)  # [2, K, B, 1]
    K = t.shape[0]
    var = _variance(contrib.flatten(0, 1))  # [2K, C]
    return var.view(2, K, -1).mean(1)


def _update(running: Tensor, batch: Tensor, momentum: float, log_domain: bool) -> None:
    """EMA of `batch` (or of its log) into `running`, in place, where `batch` is finite;
    NaN in `running` means no data yet (replaced)."""
    if log_domain:
        batch = batch.clamp_min(1e-300).log()  # log 0 would stick at -inf
    finite = torch.isfinite(batch)
    ema = torch.where(torch.isnan(running), batch, momentum * running + (1 - momentum) * batch)
    running.copy_(torch.where(finite, ema, running))


def _as_variance(running: Tensor, log_domain: bool) -> Tensor:
    return running.exp() if log_domain else running


def statistic_size(rule: WeightRule, coords: int, source) -> int:
    """Length of the statistic a node's weight is computed from (and of its running buffers)."""
    if rule.projections and rule.projection == "node" and source is not None and _trainable(source[0]):
        return 1
    return coords


def combine(rule: WeightRule, running: Optional[Tuple[Tensor, Tensor]], count: int, d: Tensor,
            eps: Tensor, sigma: Tensor, adv: Tensor, source=None,
            generator: Optional[torch.Generator] = None, check_sigma: bool = True):
    """Combined (grad_mu, grad_sigma) [B, D] in d's dtype, and (k, var_lr, var_rp, nonfinite)
    as the op returns them. d, eps, sigma: [B, D]; adv: [B]. running: the node's float64
    buffers (var_lr, var_rp) of `statistic_size` (updated in place), `count` batches in them."""
    if rule.fused:
        run = running if running is not None else (None, None)
        r = gaussian_tpx_backward(d, eps, sigma, adv, *run, rule.momentum, None, check_sigma)
        return r.grad_mu, r.grad_sigma, r.k, r.var_lr, r.var_rp, r.nonfinite

    d64, eps64, sigma64 = d.double(), eps.double(), sigma.double()
    if check_sigma and not bool(((sigma64 > 0) & torch.isfinite(sigma64)).all()):
        raise ValueError("gaussian_tpx_backward: sigma must be finite and > 0 everywhere")
    g_both = torch.stack(reference.gaussian_per_sample(d64, eps64, sigma64, adv.double()))
    g_lr, g_rp = g_both
    var_lr, var_rp = _variance(g_both)
    if rule.ucb:
        # Upper confidence bound of each variance: + ucb standard errors of the sample
        # variance, sqrt((m4 - var^2) / B); heavy tails (large 4th moment) raise it most.
        B = g_both.shape[1]
        dev = torch.where(torch.isfinite(g_both), g_both, 0.0)
        dev = dev - dev.mean(1, keepdim=True)
        m4 = (dev**4).mean(1)
        both = torch.stack([var_lr, var_rp])
        se = ((m4 - both**2).clamp_min(0) / B).sqrt()
        both = torch.where(torch.isinf(both), both, both + rule.ucb * torch.nan_to_num(se, posinf=0.0))
        stat_ucb = both
    else:
        stat_ucb = None

    stat_lr, stat_rp = (var_lr, var_rp) if stat_ucb is None else stat_ucb  # the weight's inputs
    t = None
    if rule.projections and source is not None:
        t = tangents(source[0], source[1], rule.projections, generator)
    if t is not None:
        stat_lr, stat_rp = _projected_variance(g_both, t, rule.projection == "coordinate")

    if running is None:
        v_lr, v_rp = stat_lr, stat_rp
    else:
        run_lr, run_rp = running
        if run_lr.shape != stat_lr.shape:
            raise ValueError(f"running statistics of shape {tuple(run_lr.shape)} for a "
                             f"statistic of shape {tuple(stat_lr.shape)}")
        before = (_as_variance(run_lr.clone(), rule.log_domain),
                  _as_variance(run_rp.clone(), rule.log_domain))
        m = min(rule.momentum, count / (count + 1)) if rule.warm_start else rule.momentum
        _update(run_lr, stat_lr, m, rule.log_domain)
        _update(run_rp, stat_rp, m, rule.log_domain)
        if rule.lagged or rule.guard:
            # No history yet (NaN) or none usable: this batch's statistic decides.
            seen = ~torch.isnan(before[0]) & ~torch.isnan(before[1])
            if rule.guard:
                before = (torch.maximum(before[0], stat_lr), torch.maximum(before[1], stat_rp))
            v_lr = torch.where(seen, before[0], stat_lr)
            v_rp = torch.where(seen, before[1], stat_rp)
        else:
            after = (_as_variance(run_lr, rule.log_domain), _as_variance(run_rp, rule.log_domain))
            v_lr = torch.where(torch.isfinite(stat_lr), after[0], stat_lr)
            v_rp = torch.where(torch.isfinite(stat_rp), after[1], stat_rp)

    k = reference.lr_weight(v_lr, v_rp).expand_as(var_lr)
    # Non-finite samples of this batch: the other estimator gets all the weight there.
    k = torch.where(torch.isinf(var_rp) & ~torch.isinf(var_lr), 1.0, k)
    k = torch.where(torch.isinf(var_lr) & ~torch.isinf(var_rp), 0.0, k)
    both_bad = torch.isinf(var_lr) & torch.isinf(var_rp)
    k = torch.where(both_bad, torch.nan, k)
    g = torch.where(k == 0, g_rp, torch.where(k == 1, g_lr, k * g_lr + (1 - k) * g_rp))
    g = torch.where(torch.isnan(k), 0.0, g).to(d.dtype)
    D = d.shape[1]
    return g[:, :D], g[:, D:], k, var_lr, var_rp, both_bad.sum()
