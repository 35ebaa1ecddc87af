"""Prototype (float64, by hand) of per-node weight rules under total propagation on proppo's demo,
with the exact per-sample Jacobians: python bench/prototypes/jacobian_rules.py H REPS [RULE ...]
(batch 1000). D = f'(z) of mu = f(z); J = d mu / d beta per sample."""
import sys, torch, math
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
W = torch.tensor([[-5.0, -25.0], [5.0, 25.0]]); BETA = 2.4; SIG = 1e-3
def cov(x, y):  # x [B,p], y [B,q] -> [p,q]
    xc = x - x.mean(0); yc = y - y.mean(0)
    return xc.T @ yc / (x.shape[0] - 1)
def rule_rp(glr, grp, J, D=None): return grp
def rule_lr(glr, grp, J, D=None): return glr
def rule_coord(glr, grp, J, D=None):
    vl, vr = glr.var(0), grp.var(0); k = vr / (vl + vr)
    k = torch.nan_to_num(k, nan=0.0); return k * glr + (1 - k) * grp
def rule_matrix(glr, grp, J, D=None):
    a = glr - grp  # g = grp + K a ; minimise Cov: K = -Cov(grp, a) Cov(a)^+
    K = -cov(grp, a) @ torch.linalg.pinv(cov(a, a)); return grp + a @ K.T
def rule_tp(glr, grp, J, D=None):
    pl, pr = (J * glr).sum(1), (J * grp).sum(1); vl, vr = pl.var(), pr.var()
    k = vr / (vl + vr); return k * glr + (1 - k) * grp
def rule_tpx_scalar(glr, grp, J, D=None):  # TP criterion with cross-covariance
    pl, pr = (J * glr).sum(1), (J * grp).sum(1); a = pl - pr
    k = -cov(pr[:, None], a[:, None]) / cov(a[:, None], a[:, None]); k = k.item()
    return k * glr + (1 - k) * grp
def rule_param_matrix(glr, grp, J, D=None):  # K minimising Var(J.g) over K (C*C features)
    a = glr - grp; y = (J * grp).sum(1, keepdim=True)
    x = (J[:, :, None] * a[:, None, :]).reshape(len(a), -1)  # J_c a_d -> K_cd
    k = -torch.linalg.pinv(cov(x, x)) @ cov(x, y); K = k.reshape(a.shape[1], a.shape[1])
    return grp + a @ K.T
def rule_pre_matrix(glr, grp, J, D=None):  # trace of Cov(D g) over K, D = diag act'
    a = glr - grp; C = a.shape[1]; K = torch.zeros(C, C)
    for c in range(C):
        y = (D[:, c] * grp[:, c])[:, None]; x = D[:, c:c+1] * a
        K[c] = (-torch.linalg.pinv(cov(x, x)) @ cov(x, y))[:, 0]
    return grp + a @ K.T
def rule_pre_joint(glr, grp, J, D=None):  # matrix rule on u = D g: K_u over D a, mapped back
    a = glr - grp; u_rp = D * grp; u_a = D * a
    K = -cov(u_rp, u_a) @ torch.linalg.pinv(cov(u_a, u_a))
    return grp + (u_a @ K.T) / D
def rule_pre_scalar(glr, grp, J, D=None):  # matrix rule on s_i z_i, s_i = rms_c D_ic
    sc = D.pow(2).mean(1, keepdim=True).sqrt(); a = glr - grp
    K = -cov(sc * grp, sc * a) @ torch.linalg.pinv(cov(sc * a, sc * a)); return grp + a @ K.T
RULES = dict(pre_scalar=rule_pre_scalar, pre_matrix=rule_pre_matrix, pre_joint=rule_pre_joint, rp=rule_rp, lr=rule_lr, coord=rule_coord, matrix=rule_matrix, tp=rule_tp,
             tpx_scalar=rule_tpx_scalar, param_matrix=rule_param_matrix)
def gradient(rule, H, B, gen):
    s = torch.tensor([0.35, 0.55]).expand(B, 2); states, zs, eps = [], [], []
    for t in range(H):
        z = BETA * s @ W; e = SIG * torch.randn(B, 2, generator=gen)
        states.append(s); zs.append(z); eps.append(e); s = torch.sigmoid(z) + e
    L = 0.5 * ((1 - s) ** 2).sum(1)
    b = (L.sum() - L) / (B - 1)
    g_next = -(1 - s)  # dL/ds_H
    gb = 0.0
    for t in reversed(range(H)):
        z, st, e = zs[t], states[t], eps[t]
        sp = torch.sigmoid(z) * (1 - torch.sigmoid(z))
        J = sp * (st @ W)  # d mu / d beta per sample [B,2]
        glr = (L - b)[:, None] * e / SIG**2
        g = rule(glr, g_next, J, D=sp)
        gb = gb + (J * g).sum() / B
        g_next = BETA * (sp * g) @ W.T
    return gb.item()
if __name__ == "__main__":
    H = int(sys.argv[1]); reps = int(sys.argv[2]) if len(sys.argv) > 2 else 60
    names = sys.argv[3:] or list(RULES)
    res = {}
    for n in names:
        gs = torch.tensor([gradient(RULES[n], H, 1000, torch.Generator().manual_seed(r)) for r in range(reps)])
        res[n] = gs.var().item(); print(f"H={H} {n:13s} var {res[n]:.3e} mean {gs.mean():.4f}", flush=True)
    m = min(res.get('rp', math.inf), res.get('lr', math.inf))
    for n in res: print(f"  {n:13s} / min(rp,lr) {res[n]/m:.2f}  / tp {res[n]/res.get('tp', math.nan):.2f}")
