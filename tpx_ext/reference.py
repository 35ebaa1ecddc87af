"""Pure-PyTorch float64 reference of the fused ops: the specification in code.

Readable, not fast. Every input is converted to float64 first; the tests
compare the fused kernels against these functions. Spec: docs/TPX.md sec. 1-2.
"""

from typing import Optional

import torch
from torch import Tensor

from .ops import DEFAULT_UCB, GaussianTpxResult, IvwResult


def batch_variance(x: Tensor) -> Tensor:
    """Unbiased variance over dim 0 of x [B, C]; +inf in a column with a non-finite entry
    (or whose variance overflows float64: "not representable" counts as non-finite).

    The data are shifted by their first row before the two-pass formula, so a
    constant column has exactly zero variance. One row: variance 0.
    """
    finite = torch.isfinite(x)
    y = torch.where(finite, x, 0.0)
    y = y - y[:1]
    B = x.shape[0]
    var = ((y - y.mean(0)) ** 2).sum(0) / (B - 1) if B > 1 else torch.zeros_like(y[0])
    return torch.where(finite.all(0) & torch.isfinite(var), var, torch.inf)


def variance_bound(x: Tensor, var: Tensor, ucb: float) -> Tensor:
    """Upper confidence bound of each column's variance `var` [C] of x [B, C]:
    var (1 + ucb sqrt(max(m4 / var^2 - 1, 0) / B)), m4 = mean((x - mean)^4) (TPX.md
    sec. 2); `var` itself where ucb = 0, B < 2, or var is 0 or not finite. The
    deviations are divided by the column's largest one before the 4th power, so that
    gradients up to the float64 range cannot overflow it."""
    B = x.shape[0]
    if not ucb or B < 2:
        return var
    ok = torch.isfinite(var) & (var > 0)
    y = torch.where(ok, x, 0.0)
    dev = y - y.mean(0)
    dev = dev / dev.abs().amax(0).clamp_min(torch.finfo(torch.float64).tiny)
    s2 = dev.square().sum(0) / (B - 1)
    m4 = dev.pow(4).mean(0)
    excess = torch.where(ok, m4 / s2.square() - 1, 0.0).clamp_min(0)
    return torch.where(ok, var * (1 + ucb * (excess / B).sqrt()), var)


def smoothed_variance(batch_var: Tensor, running: Tensor, momentum: float) -> Tensor:
    """EMA of the variance, updated in place where the batch variance is finite.

    NaN in `running` means "no data yet". Returns the variance used for the weight.
    """
    finite = torch.isfinite(batch_var)
    ema = torch.where(torch.isnan(running), batch_var, momentum * running + (1 - momentum) * batch_var)
    running.copy_(torch.where(finite, ema, running))
    return torch.where(finite, running, batch_var)


def lr_weight(v_lr: Tensor, v_rp: Tensor) -> Tensor:
    """k = v_rp / (v_lr + v_rp); 0.5 when equal (both 0 or both inf); inf -> the other wins."""
    k = v_rp / (v_lr + v_rp)
    k = torch.where(torch.isinf(v_rp) & ~torch.isinf(v_lr), 1.0, k)
    k = torch.where(torch.isinf(v_lr) & ~torch.isinf(v_rp), 0.0, k)
    k = torch.where(v_lr == v_rp, 0.5, k)
    return k.clamp(0.0, 1.0)


def ivw_combine(
    g_lr: Tensor,
    g_rp: Tensor,
    running_var_lr: Optional[Tensor] = None,
    running_var_rp: Optional[Tensor] = None,
    momentum: float = 0.0,
    fixed_weight: Optional[float] = None,
    ucb: float = DEFAULT_UCB,
) -> IvwResult:
    """Reference of tpx_ext.ivw_combine. Running buffers must be float64 (updated in place)."""
    g_lr, g_rp = g_lr.double(), g_rp.double()
    var_lr, var_rp = batch_variance(g_lr), batch_variance(g_rp)
    if fixed_weight is None:
        v_lr, v_rp = variance_bound(g_lr, var_lr, ucb), variance_bound(g_rp, var_rp, ucb)
    else:
        v_lr, v_rp = var_lr, var_rp
    if running_var_lr is not None:
        v_lr = smoothed_variance(v_lr, running_var_lr, momentum)
        v_rp = smoothed_variance(v_rp, running_var_rp, momentum)
    both_bad = torch.isinf(var_lr) & torch.isinf(var_rp)
    if fixed_weight is not None:
        k = torch.full_like(var_lr, fixed_weight)
    else:
        k = torch.where(both_bad, torch.nan, lr_weight(v_lr, v_rp))
    mixed = k * g_lr + (1 - k) * g_rp
    g = torch.where(k == 0, g_rp, torch.where(k == 1, g_lr, mixed))
    g = torch.where(torch.isnan(k), 0.0, g)
    return IvwResult(g, k, var_lr, var_rp, both_bad.sum())


def gaussian_per_sample(d: Tensor, eps: Tensor, sigma: Tensor, adv: Tensor):
    """Per-sample (LR, RP) gradients [B, 2D] of a Gaussian node (TPX.md sec. 1 table)."""
    a = adv[:, None]
    g_lr = torch.cat([a * eps / sigma, a * (eps**2 - 1) / sigma], dim=1)
    g_rp = torch.cat([d, d * eps], dim=1)
    return g_lr, g_rp


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
    """Reference of tpx_ext.gaussian_tpx_backward."""
    d, eps, sigma, adv = d.double(), eps.double(), sigma.double(), adv.double()
    if check_sigma and not bool(((sigma > 0) & torch.isfinite(sigma)).all()):
        raise ValueError("gaussian_tpx_backward: sigma must be finite and > 0 everywhere")
    D = d.shape[1]
    g_lr, g_rp = gaussian_per_sample(d, eps, sigma, adv)
    r = ivw_combine(g_lr, g_rp, running_var_lr, running_var_rp, momentum, fixed_weight, ucb)
    return GaussianTpxResult(r.g[:, :D], r.g[:, D:], r.k, r.var_lr, r.var_rp, r.nonfinite)


# ------------------------------------------------------------------ matrix weights
def covariance(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased cross-covariance [C1, C2] over dim 0 of finite x [B, C1], y [B, C2] (float64),
    each shifted by its first row first (a constant column has exactly zero covariance)."""
    B = x.shape[0]
    if B < 2:
        return x.new_zeros((x.shape[1], y.shape[1]))
    x = x - x[:1]
    y = y - y[:1]
    x = x - x.mean(0)
    y = y - y.mean(0)
    return x.T @ y / (B - 1)


def gaussian_comoments(d: Tensor, eps: Tensor, sigma: Tensor, adv: Tensor, groups: int = 2,
                       ucb: float = DEFAULT_UCB):
    """Reference of tpx_ext.gaussian_tpx_comoments: the joint batch covariance of a Gaussian
    node's per-sample gradients z_i = [g_LR,i, g_RP,i], each over the node's first `groups`
    coordinate groups (1: the D mu coordinates; 2: mu then sigma, C = 2D), so z has 2C columns.

    Returns (cov [2C, 2C], bound [2C], finite [2C] bool), float64: cov the unbiased
    covariance; a column with a non-finite sample is not finite, its row and column of cov
    are 0 but for the diagonal, +inf (as `batch_variance`); bound is `variance_bound` of each
    column's variance (+inf where not finite).
    """
    d, eps, sigma, adv = d.double(), eps.double(), sigma.double(), adv.double()
    if groups not in (1, 2):
        raise ValueError(f"gaussian_comoments: groups must be 1 (mu) or 2 (mu, sigma), got {groups!r}")
    C = groups * d.shape[1]
    g_lr, g_rp = gaussian_per_sample(d, eps, sigma, adv)
    return joint_covariance(g_lr[:, :C], g_rp[:, :C], ucb)


def joint_covariance(g_lr: Tensor, g_rp: Tensor, ucb: float = DEFAULT_UCB):
    """(cov [2C, 2C], bound [2C], finite [2C]) of z = [g_LR, g_RP] ([B, C] each), as
    `gaussian_comoments` defines them."""
    z = torch.cat([g_lr, g_rp], dim=1).double()
    var = batch_variance(z)
    finite = torch.isfinite(var)
    zf = torch.where(finite[None, :], z, 0.0)
    cov = covariance(zf, zf)
    cov = torch.where(finite[:, None] & finite[None, :], cov, 0.0)
    cov = cov + torch.diag(torch.where(finite, 0.0, torch.inf))
    bound = variance_bound(zf, torch.where(finite, var, 0.0), ucb)
    return cov, torch.where(finite, bound, torch.inf), finite


def matrix_tpx_backward(d: Tensor, eps: Tensor, sigma: Tensor, adv: Tensor,
                        running: Optional[Tensor] = None, momentum: float = 0.0,
                        ucb: float = DEFAULT_UCB, groups: int = 2,
                        jacobian: Optional[Tensor] = None):
    """Reference of a tpx node's backward with matrix weights (Estimator("tpx")): the joint
    covariance of `gaussian_comoments`, K from `tpx_ext.estimators.weights.matrix_weight`
    (the float64 PyTorch solve the node itself runs), and g = K g_LR + (I - K) g_RP.
    jacobian [B, D] (`StochasticGraph.sample`'s): row c of (K, L) from the co-moments of
    jacobian[:, c] z_i instead, running [D + 1, 3, C, C] (block D: the sigma rows' plain
    statistics). Returns (grad_mu [B, D], grad_sigma [B, D] or None for groups 1, K [C, C],
    cov), cov the plain co-moments."""
    from .estimators.weights import apply_matrix_weight, matrix_weight

    D = d.shape[1]
    cov, bound, finite = gaussian_comoments(d, eps, sigma, adv, groups, ucb)
    if jacobian is None:
        KL = matrix_weight(cov, bound, finite, running, momentum)
    else:
        rows = []
        for c in range(D + (groups == 2)):  # the mu rows, then one block for the sigma rows
            if c < D:
                s = jacobian[:, c].double()
                stats = gaussian_comoments(d.double() * s[:, None], eps, sigma,
                                           adv.double() * s, groups, ucb)
            else:  # the sigma rows: the plain co-moments above
                stats = cov, bound, finite
            KL_c = matrix_weight(*stats, None if running is None else running[c], momentum)
            rows.append(KL_c[:, c:c + 1] if c < D else KL_c[:, D:])
        KL = torch.cat(rows, dim=1)
    g_lr, g_rp = gaussian_per_sample(d.double(), eps.double(), sigma.double(), adv.double())
    g = apply_matrix_weight(g_lr[:, :groups * D], g_rp[:, :groups * D], KL)
    return g[:, :D], (g[:, D:] if groups == 2 else None), KL[0], cov


def loo_matrix_combine(g_lr: Tensor, g_rp: Tensor, ucb: float = DEFAULT_UCB) -> Tensor:
    """Reference of `tpx_ext.estimators.weights.loo_matrix_combine` (weights="matrix-loo"),
    formed sample by sample: Sigma_-i = the covariance of the other B - 1 samples' z plus the
    batch's bound excess times (B - 1) / (B - 2), its blocks into `pinv_weights`, and
    g_i = K_-i g_LR,i + L_-i g_RP,i (finite samples, B >= 3)."""
    from .estimators.weights import pinv_weights

    g_lr, g_rp = g_lr.double(), g_rp.double()
    B, C = g_lr.shape
    cov, bound, _ = joint_covariance(g_lr, g_rp, ucb)
    excess = torch.diag(bound - cov.diagonal()) * (B - 1) / (B - 2)
    z = torch.cat([g_lr, g_rp], dim=1)
    out = []
    for i in range(B):
        rest = torch.cat([z[:i], z[i + 1:]])
        sig = covariance(rest, rest) + excess
        S_lr, S_rp, X = sig[:C, :C], sig[C:, C:], sig[:C, C:]
        K, L = pinv_weights(S_rp - X.T, S_lr - X, S_lr + S_rp - X - X.T)
        out.append(K @ g_lr[i] + L @ g_rp[i])
    return torch.stack(out)
