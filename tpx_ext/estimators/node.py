"""The stochastic node x = mu + sigma * eps as a custom autograd function.

Its forward is the reparameterised sample. Its backward receives d = dJ/dx
after autograd has accumulated every downstream gradient (so d already holds
the combined gradients of all later nodes: total propagation) and returns the
gradient for (mu, sigma) that the estimator mode prescribes. The advantage
A = G_t - b_t is not known at forward time: `StochasticGraph.backward` fills
`Node.adv` before it starts autograd.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..ops import gaussian_tpx_backward
from .tp import tp_weight
from .weights import WeightRule


@dataclass(eq=False)
class NodeStats:
    """Diagnostics of one node after `StochasticGraph.backward` (tensors on the node's device).

    name, step: as given to `sample`.
    adv:        [B] advantages A_i = G_t - b_t (None in rp mode, which needs none).
    k:          float64 weight on LR: [2D] (mu coordinates, then sigma coordinates),
                or [1] in tp mode (one scalar per node); NaN where both estimators
                were non-finite (that gradient is zeroed). None in rp mode.
    var_lr, var_rp: float64 batch variances of the per-sample LR / RP gradients, same
                shape as k (tp mode: traces over the module's parameters). None in rp mode.
    nonfinite:  [] int64 count of coordinates where both were non-finite. None in rp mode.
    """

    name: str
    step: int
    adv: Optional[Tensor] = None
    k: Optional[Tensor] = None
    var_lr: Optional[Tensor] = None
    var_rp: Optional[Tensor] = None
    nonfinite: Optional[Tensor] = None


@dataclass(eq=False)
class Node:
    """What one node's backward needs besides its saved tensors.

    Holds no reference to its output, so output -> grad_fn -> ctx -> node is no cycle.
    """

    stats: NodeStats
    fixed_weight: Optional[float]  # None: inverse-variance weight (tpx, tp)
    running: Optional[Tuple[Tensor, Tensor]]  # EMA buffers (tpx with momentum > 0)
    rule: Optional[WeightRule]  # tpx: how the weight is computed
    check_sigma: bool
    source: Optional[Tuple[nn.Module, Tuple[Tensor, ...]]]  # tp mode: module(*inputs) = (mu, sigma)
    adv: Optional[Tensor] = None  # [B] kernel advantages, set by StochasticGraph.backward

    def combine(self, d: Tensor, eps: Tensor, sigma: Tensor) -> Tuple[Tensor, Tensor]:
        if self.adv is None:
            raise RuntimeError(
                f"node {self.stats.name!r} (step {self.stats.step}): its backward ran before its "
                "advantage was set. Call StochasticGraph.backward(), not .backward() on a loss."
            )
        B = d.shape[0]
        fixed = self.fixed_weight
        if self.source is not None:  # tp: one scalar weight from parameter-gradient traces
            k, v_lr, v_rp = tp_weight(*self.source, d, eps, sigma, self.adv)
            self._record(k, v_lr, v_rp, torch.isnan(k).sum())
            if bool(torch.isnan(k)):
                return torch.zeros_like(d), torch.zeros_like(d)
            fixed = float(k)
        flat = (d.reshape(B, -1), eps.reshape(B, -1), sigma.reshape(B, -1), self.adv)
        if fixed is None:  # tpx
            running = self.running if self.running is not None else (None, None)
            r = gaussian_tpx_backward(*flat, *running, self.rule.momentum, None,
                                      self.check_sigma, self.rule.ucb)
        else:
            r = gaussian_tpx_backward(*flat, None, None, 0.0, fixed, self.check_sigma)
        if self.source is None:  # tpx, lr, mix (tp recorded its own statistics above)
            self._record(r.k, r.var_lr, r.var_rp, r.nonfinite)
        return r.grad_mu.view(d.shape), r.grad_sigma.view(d.shape)

    def _record(self, k, var_lr, var_rp, nonfinite):
        s = self.stats
        s.k, s.var_lr, s.var_rp, s.nonfinite = k, var_lr, var_rp, nonfinite


class GaussianNode(torch.autograd.Function):
    """x = mu + sigma * eps forward; `Node.combine` backward. mu, sigma, eps: [B, *event]."""

    @staticmethod
    def forward(ctx, mu: Tensor, sigma: Tensor, eps: Tensor, node: Node) -> Tensor:
        ctx.save_for_backward(eps, sigma)
        ctx.node = node
        return mu + sigma * eps

    @staticmethod
    @once_differentiable
    def backward(ctx, d: Tensor):
        eps, sigma = ctx.saved_tensors
        grad_mu, grad_sigma = ctx.node.combine(d, eps, sigma)
        return grad_mu, grad_sigma, None, None
