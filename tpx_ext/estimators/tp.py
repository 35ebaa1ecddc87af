"""TP (PIPPS, 2018): one scalar weight per node from per-sample *parameter* gradients.

v_LR and v_RP are the traces of the batch covariance of the per-sample
gradients with respect to the parameters of the module that produced
(mu, sigma). Forming those gradients costs O(B x P) memory and time
(P = number of parameters), which is why TP does not scale to large models;
TPX (the node's own backward, coordinate-wise) costs O(B x 2D).
The per-sample formulas, the variance and the weight rule (edge cases of
TPX.md sec. 2 included) are those of `tpx_ext.reference`, in float64.
A node whose module has no trainable parameters (process noise of a fixed
model) takes the traces over its own (mu, sigma) coordinates instead.
"""

from typing import Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .. import reference


def _per_sample_param_grads(
    module: nn.Module, inputs: Tuple[Tensor, ...], cot_a, cot_b
) -> Tuple[Tensor, Tensor]:
    """Per-sample gradients [B, P] of <cot, (mu_i, sigma_i)> for two cotangents (a, b)."""
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in module.named_buffers()}

    def one_sample(args, ca, cb):
        def zeta(p):
            mu, sigma = functional_call(module, (p, buffers), tuple(a[None] for a in args))
            return mu[0], sigma[0]

        _, pullback = vjp(zeta, params)
        return pullback(ca)[0], pullback(cb)[0]

    ga, gb = vmap(one_sample)(inputs, cot_a, cot_b)
    return _flatten(ga), _flatten(gb)


def _flatten(grads) -> Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


def tp_weight(
    module: nn.Module, inputs: Tuple[Tensor, ...], d: Tensor, eps: Tensor, sigma: Tensor, adv: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """(k, v_lr, v_rp), each float64 of shape [1], for a node whose (mu, sigma) = module(*inputs).

    d, eps, sigma: [B, *event] as the node's; adv: [B]. k is NaN when both traces
    are infinite (the node's gradient is then zeroed, TPX.md sec. 2).
    """
    shape = sigma.shape
    g_lr, g_rp = reference.gaussian_per_sample(
        d.reshape(shape[0], -1), eps.reshape(shape[0], -1), sigma.reshape(shape[0], -1),
        adv.to(d.dtype),
    )
    D = g_lr.shape[1] // 2
    cot_lr = (g_lr[:, :D].reshape(shape), g_lr[:, D:].reshape(shape))  # (mu, sigma) cotangents
    cot_rp = (g_rp[:, :D].reshape(shape), g_rp[:, D:].reshape(shape))
    inputs = tuple(x.detach() for x in inputs)
    if any(p.requires_grad for p in module.parameters()):
        p_lr, p_rp = _per_sample_param_grads(module, inputs, cot_lr, cot_rp)
    else:
        p_lr, p_rp = g_lr, g_rp
    v_lr = reference.batch_variance(p_lr.double()).sum().reshape(1)
    v_rp = reference.batch_variance(p_rp.double()).sum().reshape(1)
    both_bad = torch.isinf(v_lr) & torch.isinf(v_rp)
    k = torch.where(both_bad, torch.nan, reference.lr_weight(v_lr, v_rp))
    return k, v_lr, v_rp
