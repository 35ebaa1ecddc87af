"""How a tpx node turns its batch statistics into the weight on LR (TPX.md sec. 2).

Default rule: each coordinate's variance is replaced by an upper confidence
bound, the batch variance plus about `ucb` standard errors of it,

    v = s^2 (1 + ucb sqrt(max(m4 / s^4 - 1, 0) / B)),

with s^2 the unbiased batch variance and m4 the batch's 4th central moment
(1/B), so that k = v_RP / (v_LR + v_RP) comes from the bounds. For
near-Gaussian samples the bound is s^2 (1 + ucb sqrt(2 / B)) for both
estimators and moves k little; for heavy-tailed samples (an RP gradient through
chaotic dynamics, whose batch variance underestimates the true one in most
batches and explodes in a few) it raises that estimator's variance in the very
batch whose outliers would otherwise leak into the combined gradient.
ucb = 0 is plain batch statistics. With momentum > 0 the bounds, not the plain
variances, go into the running averages.

The fused ops compute the rule (their `ucb` argument, one more pass over the
batch for the 4th moment); `tpx_ext.reference.variance_bound` is its float64
specification.
"""

from dataclasses import dataclass

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
