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

from ..ops import gaussian_tpx_backward, gaussian_tpx_comoments
from .tp import tp_weight
from .weights import WeightRule, apply_matrix_weight, loo_matrix_combine, matrix_weight


def per_sample_gradients(d: Tensor, eps: Tensor, sigma: Tensor, adv: Tensor, groups: int):
    """float64 per-sample (LR, RP) gradients [B, groups * D] of a Gaussian node (TPX.md sec. 1):
    the mu coordinates, then (groups 2) the sigma coordinates."""
    d, eps, sigma = d.double(), eps.double(), sigma.double()
    a = adv.double()[:, None]
    g_lr = [a * eps / sigma, a * (eps * eps - 1) / sigma][:groups]
    g_rp = [d, d * eps][:groups]
    return torch.cat(g_lr, dim=1), torch.cat(g_rp, dim=1)


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
    jacobian: Optional[Tensor] = None  # [B, D] f'(z) of mu = f(z): matrix rows fit at z
    adv: Optional[Tensor] = None  # [B] kernel advantages, set by StochasticGraph.backward
    # d root / d J of the pass that runs the node (-g for a loss seeded with g): the node
    # works in units of J, so its statistics do not see a loss's sign or AMP's grad scale.
    scale: float = 1.0
    # Set while the graph checks which terms depend on which nodes: the check's backward
    # passes through this node as through x = mu + sigma * eps.
    passthrough: bool = False

    def combine(self, d: Tensor, eps: Tensor, sigma: Tensor, needs_sigma: bool = True) -> Tuple[Tensor, Tensor]:
        if self.passthrough:
            return d, d * eps if needs_sigma else None
        if self.scale == 1.0:
            return self._combine(d, eps, sigma, needs_sigma)
        dtype = d.dtype
        if dtype in (torch.float16, torch.bfloat16):  # a scaled half gradient: divide in float
            d, eps, sigma = d.float(), eps.float(), sigma.float()
        grad_mu, grad_sigma = self._combine(d / self.scale, eps, sigma, needs_sigma)
        return ((grad_mu * self.scale).to(dtype),
                None if grad_sigma is None else (grad_sigma * self.scale).to(dtype))

    def _combine(self, d: Tensor, eps: Tensor, sigma: Tensor, needs_sigma: bool) -> Tuple[Tensor, Tensor]:
        if self.adv is None:
            raise RuntimeError(
                f"node {self.stats.name!r} (step {self.stats.step}): its backward ran before its "
                "advantage was set. Wrap the loss: graph.loss(loss).backward(), or call graph.backward()."
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
        if fixed is None and self.rule.weights in ("matrix", "matrix-loo"):
            return self._matrix_combine(*flat, needs_sigma, d.shape)
        if fixed is None:  # tpx
            running = self.running if self.running is not None else (None, None)
            r = gaussian_tpx_backward(*flat, *running, self.rule.momentum, None,
                                      self.check_sigma, self.rule.ucb)
        else:
            r = gaussian_tpx_backward(*flat, None, None, 0.0, fixed, self.check_sigma)
        if self.source is None:  # tpx, lr, mix (tp recorded its own statistics above)
            self._record(r.k, r.var_lr, r.var_rp, r.nonfinite)
        return r.grad_mu.view(d.shape), r.grad_sigma.view(d.shape)

    def _matrix_combine(self, d, eps, sigma, adv, needs_sigma: bool, shape):
        """tpx with matrix weights: the joint covariance from the fused op, K from it in
        float64 PyTorch (`weights.matrix_weight`), the per-sample combination in float64.
        Where sigma needs no gradient (a fixed noise scale), its coordinates are left out."""
        if self.check_sigma and not bool(((sigma > 0) & torch.isfinite(sigma)).all()):
            raise ValueError("tpx node: sigma must be finite and > 0 everywhere (found an entry "
                             "<= 0, inf or NaN); pass check_sigma=False to skip this check")
        D, groups = d.shape[1], 2 if needs_sigma else 1
        C = groups * D
        r = gaussian_tpx_comoments(d, eps, sigma, adv, groups, self.rule.ucb)
        if self.jacobian is None:
            running = self.running[:, :C, :C] if self.running is not None else None  # a view
            KL = matrix_weight(r.cov, r.bound, r.finite, running, self.rule.momentum)
        else:
            KL = self._row_weights(r, d, eps, sigma, adv, groups)
        g_lr, g_rp = per_sample_gradients(d, eps, sigma, adv, groups)
        if self.rule.weights == "matrix-loo" and bool(r.finite.all()):
            g = loo_matrix_combine(g_lr, g_rp, r.cov, r.bound).to(d.dtype)
        else:  # a node with non-finite samples keeps the batch's matrices
            g = apply_matrix_weight(g_lr, g_rp, KL, bool(r.finite.all())).to(d.dtype)
        var, k = r.cov.diagonal(), KL[0].diagonal()
        self._record(k, var[:C], var[C:], torch.isnan(k).sum())
        grad_sigma = g[:, D:].reshape(shape) if needs_sigma else None
        return g[:, :D].reshape(shape), grad_sigma

    def _row_weights(self, plain, d, eps, sigma, adv, groups: int) -> Tensor:
        """(K, L) [2, C, C] whose row c, for mu coordinate c, minimises the variance of the
        gradient at z_c, f'(z_c) g_c with mu = f(z): row c of the matrix rule on the
        co-moments of f'(z_c) [g_LR, g_RP] (the fused op on d and adv scaled by f'(z_c): one
        pass per coordinate). The sigma rows are the plain rule's (`plain`: the unscaled
        co-moments). Running buffers: [D + 1, 3, C', C'], block D the plain one."""
        D, C = d.shape[1], groups * d.shape[1]
        rule, running = self.rule, self.running

        def weights(r, block):
            return matrix_weight(r.cov, r.bound, r.finite,
                                 None if running is None else running[block, :, :C, :C],
                                 rule.momentum)

        KL = (weights(plain, D) if groups == 2
              else torch.empty((2, C, C), dtype=torch.float64, device=d.device))
        for c in range(D):
            scale = self.jacobian[:, c]
            r = gaussian_tpx_comoments(d * scale[:, None], eps, sigma, adv * scale, groups,
                                       rule.ucb)
            KL[:, c] = weights(r, c)[:, c]
        return KL

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
        grad_mu, grad_sigma = ctx.node.combine(d, eps, sigma, ctx.needs_input_grad[1])
        return grad_mu, grad_sigma, None, None
