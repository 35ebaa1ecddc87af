"""Python entry points of the fused ops, and their fake kernels.

`torch.ops.tpx_ext.ivw_combine`, `torch.ops.tpx_ext.gaussian_tpx_backward` and
`torch.ops.tpx_ext.gaussian_tpx_comoments` are registered by the C++ extension
(CPU and CUDA). The fake kernels below give their output shapes to
`torch.compile` without running them.

Coordinates: `ivw_combine` has C of them (the columns); a Gaussian node over
D dimensions has 2D (mu coordinates first, then sigma coordinates).
"""

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

# The default of every `ucb` argument (the ops, tpx_ext.reference and Estimator("tpx")): each
# variance that enters a tpx weight is its batch value plus ~2 standard errors of it.
DEFAULT_UCB = 2.0


class IvwResult(NamedTuple):
    g: Tensor  # [B, C] combined per-sample gradients, input dtype
    k: Tensor  # [C] float64 weight on LR (NaN: both estimators non-finite, g = 0)
    var_lr: Tensor  # [C] float64 batch variance of the LR samples (+inf if non-finite)
    var_rp: Tensor  # [C] float64 batch variance of the RP samples
    nonfinite: Tensor  # [] int64, coordinates where both estimators were non-finite


class GaussianTpxResult(NamedTuple):
    grad_mu: Tensor  # [B, D] combined gradient with respect to mu
    grad_sigma: Tensor  # [B, D] combined gradient with respect to sigma
    k: Tensor  # [2D] float64 weight on LR: mu coordinates, then sigma coordinates
    var_lr: Tensor  # [2D] float64
    var_rp: Tensor  # [2D] float64
    nonfinite: Tensor  # [] int64


class ComomentsResult(NamedTuple):
    cov: Tensor  # [2C, 2C] float64 covariance of z = [g_LR, g_RP] (C = groups * D columns each)
    bound: Tensor  # [2C] float64 upper bound of each column's variance (+inf: not finite)
    finite: Tensor  # [2C] bool, False for a column with a non-finite sample


def new_running_stats(coords: int, device=None) -> Tuple[Tensor, Tensor]:
    """Empty running-variance buffers (LR, RP) for `coords` coordinates.

    NaN marks "no batch seen yet": the first finite batch variance replaces it.
    """
    empty = torch.full((coords,), float("nan"), dtype=torch.float64, device=device)
    return empty, empty.clone()


def ivw_combine(
    g_lr: Tensor,
    g_rp: Tensor,
    running_var_lr: Optional[Tensor] = None,
    running_var_rp: Optional[Tensor] = None,
    momentum: float = 0.0,
    fixed_weight: Optional[float] = None,
    ucb: float = DEFAULT_UCB,
) -> IvwResult:
    """Coordinate-wise inverse-variance weighting of per-sample LR and RP gradients.

    g_lr, g_rp: [B, C], same dtype (float32/64, float16, bfloat16) and device.
    running_var_lr/rp: optional [C] float buffers updated in place with an
        exponential moving average of momentum `momentum` (0: batch statistics).
    fixed_weight: use this weight on LR instead of the inverse-variance one.
    ucb: >= 0. Where > 0, each variance that enters the weight (and the running
        averages) is its upper bound s^2 (1 + ucb sqrt(max(m4 / s^4 - 1, 0) / B)),
        m4 the batch's 4th central moment (docs/TPX.md sec. 2); this costs one
        more pass over the batch. var_lr / var_rp are the plain batch variances.
    Statistics are accumulated in float64 for every input dtype; the combined
    gradient is within one ulp of its dtype of the float64 result (on the CPU,
    bfloat16's is computed in float, falling back to float64 outside its range).
    """
    out = torch.ops.tpx_ext.ivw_combine.default(
        g_lr, g_rp, running_var_lr, running_var_rp, float(momentum), fixed_weight, float(ucb)
    )
    return IvwResult(*out)


def gaussian_tpx_backward(
    d: Tensor,
    eps: Tensor,
    sigma: Tensor,
    adv: Tensor,
    running_var_lr: Optional[Tensor] = None,
    running_var_rp: Optional[Tensor] = None,
    momentum: float = 0.0,
    fixed_weight: Optional[float] = None,
    check_sigma: bool = True,
    ucb: float = DEFAULT_UCB,
) -> GaussianTpxResult:
    """The whole backward of one Gaussian TPX node x = mu + sigma * eps.

    d: [B, D] dJ/dx from downstream; eps, sigma: [B, D]; adv: [B] advantages
    A_i (any float dtype). Returns the combined gradients for (mu, sigma).
    check_sigma: raise if sigma has an entry <= 0, inf or NaN (on CUDA this
    reads one flag back from the device, i.e. synchronises the stream).
    ucb: as ivw_combine's.
    """
    out = torch.ops.tpx_ext.gaussian_tpx_backward.default(
        d, eps, sigma, adv, running_var_lr, running_var_rp, float(momentum), fixed_weight,
        bool(check_sigma), float(ucb),
    )
    return GaussianTpxResult(*out)


def gaussian_tpx_comoments(
    d: Tensor,
    eps: Tensor,
    sigma: Tensor,
    adv: Tensor,
    groups: int = 2,
    ucb: float = DEFAULT_UCB,
) -> ComomentsResult:
    """The joint batch covariance of a Gaussian node's per-sample LR and RP gradients,
    the statistics of the matrix weight rules (docs/TPX.md sec. 1-2), in one fused pass
    without forming the per-sample gradients.

    d, eps, sigma: [B, D] (same dtype and device, as gaussian_tpx_backward's; sigma's
    values are not checked); adv: [B] advantages (any float dtype). Per sample,
    z = [g_LR (C), g_RP (C)] over the node's first `groups` coordinate groups (1: the D mu
    coordinates; 2: mu then sigma, C = 2D), so 2C columns. Returns cov: the unbiased
    covariance of z (zeros for B = 1); a column with a non-finite sample is not finite:
    its row and column of cov are 0 but for its diagonal entry, +inf. bound: each
    column's variance upper bound var (1 + ucb sqrt(max(m4 / var^2 - 1, 0) / B)) (var
    itself where ucb = 0, var = 0 or B < 2; +inf where not finite; ucb > 0 costs one
    more pass). finite: [2C] bool. Accumulated in float64 for every input dtype
    (reference: tpx_ext.reference.gaussian_comoments).
    """
    out = torch.ops.tpx_ext.gaussian_tpx_comoments.default(d, eps, sigma, adv, int(groups), float(ucb))
    return ComomentsResult(*out)


def _coordinate_outputs(like: Tensor, coords: int):
    f64 = like.new_empty((coords,), dtype=torch.float64)
    return f64, torch.empty_like(f64), torch.empty_like(f64), like.new_empty((), dtype=torch.int64)


@torch.library.register_fake("tpx_ext::ivw_combine")
def _ivw_combine_fake(g_lr, g_rp, running_var_lr, running_var_rp, momentum, fixed_weight,
                      ucb=DEFAULT_UCB):
    torch._check(g_lr.dim() == 2, lambda: "ivw_combine: g_lr must be 2-D [B, C]")
    torch._check(g_rp.shape == g_lr.shape, lambda: "ivw_combine: g_rp must match g_lr")
    return (torch.empty_like(g_lr, memory_format=torch.contiguous_format),
            *_coordinate_outputs(g_lr, g_lr.shape[1]))


@torch.library.register_fake("tpx_ext::gaussian_tpx_backward")
def _gaussian_tpx_backward_fake(d, eps, sigma, adv, running_var_lr, running_var_rp, momentum,
                                fixed_weight, check_sigma, ucb=DEFAULT_UCB):
    torch._check(d.dim() == 2, lambda: "gaussian_tpx_backward: d must be 2-D [B, D]")
    torch._check(eps.shape == d.shape and sigma.shape == d.shape,
                 lambda: "gaussian_tpx_backward: eps and sigma must match d")
    grad = torch.empty_like(d, memory_format=torch.contiguous_format)
    return (grad, torch.empty_like(grad), *_coordinate_outputs(d, 2 * d.shape[1]))


@torch.library.register_fake("tpx_ext::gaussian_tpx_comoments")
def _gaussian_tpx_comoments_fake(d, eps, sigma, adv, groups, ucb):
    torch._check(d.dim() == 2, lambda: "gaussian_tpx_comoments: d must be 2-D [B, D]")
    torch._check(eps.shape == d.shape and sigma.shape == d.shape,
                 lambda: "gaussian_tpx_comoments: eps and sigma must match d")
    torch._check(groups in (1, 2), lambda: "gaussian_tpx_comoments: groups must be 1 or 2")
    K = 2 * groups * d.shape[1]
    cov = d.new_empty((K, K), dtype=torch.float64)
    return cov, d.new_empty((K,), dtype=torch.float64), d.new_empty((K,), dtype=torch.bool)
