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
from typing import Optional

import torch
from torch import Tensor

from .modes import KNOBS



@dataclass(frozen=True)
class WeightRule:
    """The weight rule of a tpx estimator (see the module docstring); its values are
    checked by the mode table (`modes.resolve`)."""

    momentum: float = KNOBS["momentum"].default
    ucb: float = KNOBS["ucb"].default
    weights: str = KNOBS["weights"].default


# ------------------------------------------------------------------ matrix weights
def pinv_weights(A: Tensor, Z: Tensor, S: Tensor):
    """(A S^+ + N / 2, Z S^+ + N / 2) for a symmetric PSD S [C, C] with A + Z = S, so that the
    two weights add up to the identity exactly (in exact arithmetic).

    N / 2 is the null space of S: where S has no variance in a direction, the two
    estimators agree along it and each gets half. S is scaled to unit diagonal before its
    eigendecomposition, so entries from 1e-60 to 1e60 keep their relative precision;
    eigenvalues below C * 1e-12 of the largest count as zero (singular covariances, e.g. a
    rank-one map's RP gradients, or B <= C). Both weights are formed as products, so a
    weight of 1e-30 on an estimator of 1e15 is exact, not the rounding error of 1 - (1 - x).
    """
    S_pinv, null = pinv_and_null(S)
    return A @ S_pinv + 0.5 * null, Z @ S_pinv + 0.5 * null


def pinv_and_null(S: Tensor):
    """(S^+, N) of `pinv_weights`: the pseudo-inverse of a symmetric PSD S and the null-space
    completion N with S S^+ + N = I."""
    C = S.shape[0]
    eye = torch.eye(C, dtype=S.dtype, device=S.device)
    diag = S.diagonal().clamp_min(0)
    live = diag > 0
    inv_scale = torch.where(live, diag.rsqrt(), 0.0)
    scale = torch.where(live, diag.sqrt(), 0.0)
    Sn = S * inv_scale[:, None] * inv_scale[None, :]
    lam, U = torch.linalg.eigh(0.5 * (Sn + Sn.T))
    keep = lam > max(C, 1) * 1e-12 * lam.abs().max().clamp_min(torch.finfo(S.dtype).tiny)
    lam_inv = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0)
    S_pinv = (U * lam_inv) @ U.T * inv_scale[:, None] * inv_scale[None, :]
    # S S^+ = D^1/2 P D^-1/2 (P projects onto the range of the scaled S), so the null part
    # D^1/2 (I - P) D^-1/2 completes it to the identity; formed from the null eigenvectors,
    # not as I - P, whose rounding errors D^1/2 would amplify. A dead coordinate (no
    # variance) is its own null space.
    null = (U * (~keep).to(S.dtype)) @ U.T * scale[:, None] * inv_scale[None, :]
    null = torch.where(live[:, None] & live[None, :], null, eye * (~live).to(S.dtype))
    return S_pinv, null


def matrix_weight(cov: Tensor, bound: Tensor, finite: Tensor, running: Optional[Tensor] = None,
                  momentum: float = 0.0) -> Tensor:
    """The weight matrices [2, C, C] on LR (K) and on RP (L = I - K) from the joint
    covariance of z = [g_LR, g_RP].

    cov [2C, 2C], bound [2C], finite [2C]: `tpx_ext.gaussian_tpx_comoments`'s outputs (or
    the reference's). With S_LR, S_RP the two diagonal blocks and X = Cov(LR, RP) (the two
    share samples), K = (S_RP - X^T) (S_LR + S_RP - X - X^T)^+ minimises the covariance of
    g = K g_LR + (I - K) g_RP in the Loewner order, i.e. the variance of every linear map of
    g at once (the node's Jacobian to the parameters among them). ucb bounds enter as
    cov -> cov + diag(bound - var). running [3, C, C] float64 (LR, RP, X; NaN:
    no data yet) keeps their exponential moving averages (momentum > 0), updated in place.
    Coordinates with a non-finite estimator are left out of the matrix: LR non-finite -> k 0,
    RP non-finite -> k 1, both -> NaN (their gradient is zeroed by `apply_matrix_weight`).
    """
    C = cov.shape[0] // 2
    # The bounds' excess over the variances goes onto the diagonal only: a heavy-tailed
    # coordinate's covariances with the others shrink relative to its variance, so the
    # matrix leans toward the coordinate-wise weights exactly where its cross terms rest on
    # a few outliers.
    var = cov.diagonal()
    cov = cov + torch.diag(torch.where(finite, bound - var, 0.0))
    ok_lr, ok_rp = finite[:C], finite[C:]
    good = ok_lr & ok_rp
    everything = bool(good.all())  # the common case: no coordinate to leave out
    if everything:
        sub, n = cov, C
    else:
        idx = good.nonzero()[:, 0]
        both = torch.cat([idx, C + idx])
        sub, n = cov[both[:, None], both[None, :]], idx.numel()
    S = torch.stack([sub[:n, :n], sub[n:, n:], sub[:n, n:]])
    if running is not None:
        old = running if everything else running[:, idx[:, None], idx[None, :]]
        S = torch.where(torch.isnan(old), S, momentum * old + (1 - momentum) * S)
        if everything:
            running.copy_(S)
        else:
            running[:, idx[:, None], idx[None, :]] = S
    S_lr, S_rp, X = S
    KL_good = torch.stack(pinv_weights(S_rp - X.T, S_lr - X, S_lr + S_rp - X - X.T))
    if everything:
        return KL_good
    eye = torch.eye(C, dtype=torch.bool, device=cov.device)
    KL = torch.zeros((2, C, C), dtype=cov.dtype, device=cov.device)
    KL[:, idx[:, None], idx[None, :]] = KL_good
    edge = torch.where(ok_rp & ~ok_lr, 0.0, torch.where(ok_lr & ~ok_rp, 1.0, torch.nan))
    KL[0] = torch.where(eye & ~good[:, None], torch.diag(edge), KL[0])
    KL[1] = torch.where(eye & ~good[:, None], torch.diag(1 - edge), KL[1])
    return KL


def apply_matrix_weight(g_lr: Tensor, g_rp: Tensor, KL: Tensor,
                        finite_samples: bool = False) -> Tensor:
    """g_i = K g_LR,i + L g_RP,i [B, C] (float64) with (K, L) = KL from `matrix_weight`
    (L = I - K, formed on its own); non-finite samples of a coordinate that `matrix_weight`
    left out enter with weight 0, and a coordinate with NaN weight (both estimators
    non-finite) gets gradient 0. finite_samples: the caller knows every sample is finite
    (skips that check)."""
    C = g_lr.shape[1]
    KL = torch.nan_to_num(KL, nan=0.0).transpose(1, 2).reshape(2 * C, C)  # [K^T; L^T]
    g = torch.cat([g_lr, g_rp], dim=1)
    if not finite_samples:
        g = torch.where(torch.isfinite(g), g, 0.0)
    return g @ KL


def loo_matrix_combine(g_lr: Tensor, g_rp: Tensor, cov: Tensor, bound: Tensor) -> Tensor:
    """g_i = K_-i g_LR,i + L_-i g_RP,i [B, C] (float64): each sample weighed by the matrix
    weights of the other B - 1 samples, so that its weights do not depend on it and the
    combination is unbiased (K_-i + L_-i = I, and K_-i is independent of sample i). With
    the full weights fitted to the batch they weigh, a node's gradient leans toward
    whichever estimator's noise happens to cancel the signal in that batch: at batch 64 on
    the cart-pole its mean points away from the true gradient (docs/RESULTS.md sec. 8).

    cov [2C, 2C], bound [2C]: the batch's joint covariance and bounds (all finite), as
    `matrix_weight` takes them. The other samples' covariance is the exact leave-one-out
    covariance plus the batch's bound excess E (scaled by (B - 1) / (B - 2)):
    Sigma_-i = a (cov + E) - b dz_i dz_i^T, a = (B - 1) / (B - 2), b = B / ((B - 1)(B - 2)),
    dz_i the sample's deviation from the batch mean; so K_-i and L_-i are rank-one updates
    of the batch's, and Sherman-Morrison gives every g_i in O(B C^2) without forming them.
    A sample whose removal makes the covariance lose rank (it alone spans a direction, as
    when B <= C + 1) gets its matrices formed explicitly."""
    B, C = g_lr.shape
    var = cov.diagonal()
    cov = cov + torch.diag(bound - var)
    S_lr, S_rp, X = cov[:C, :C], cov[C:, C:], cov[:C, C:]
    A, Z, S = S_rp - X.T, S_lr - X, S_lr + S_rp - X - X.T
    M, null = pinv_and_null(S)
    if B < 3:  # no covariance from one other sample: the batch's matrices
        return torch.cat([g_lr, g_rp], 1) @ torch.cat([A @ M + 0.5 * null, Z @ M + 0.5 * null], 1).T
    a, b = (B - 1) / (B - 2), B / ((B - 1) * (B - 2))
    dl, dr = g_lr - g_lr.mean(0), g_rp - g_rp.mean(0)
    u = dl - dr                                   # dw_i, w = g_LR - g_RP
    Mu = u @ M                                    # M u_i (M symmetric)
    den = 1 - (b / a) * (Mu * u).sum(1)           # Sherman-Morrison's denominator
    ok = den > 1e-9

    def solve(v):  # Sigma_w,-i^+ v_i for every i: (a S - b u u^T)^+ v
        coef = torch.where(ok, (Mu * v).sum(1) / torch.where(ok, den, 1.0), 0.0)
        return (v @ M + (b / a) * Mu * coef[:, None]) / a

    y_lr, y_rp = solve(g_lr), solve(g_rp)
    # K_-i = A_-i S_-i^+ + N/2 with A_-i = a A + b dr_i u_i^T; L_-i with Z_-i = a Z - b dl_i u_i^T
    g = (a * (y_lr @ A.T) + b * dr * (u * y_lr).sum(1, keepdim=True)
         + a * (y_rp @ Z.T) - b * dl * (u * y_rp).sum(1, keepdim=True)
         + 0.5 * (g_lr + g_rp) @ null.T)
    for i in (~ok).nonzero()[:, 0].tolist():
        dz = torch.cat([dl[i], dr[i]])
        sig = a * cov - b * torch.outer(dz, dz)
        sl, sr, x = sig[:C, :C], sig[C:, C:], sig[:C, C:]
        K, L = pinv_weights(sr - x.T, sl - x, sl + sr - x - x.T)
        g[i] = K @ g_lr[i] + L @ g_rp[i]
    return g
