"""The same rules on the suite's RNN systems: python bench/prototypes/jacobian_rules_suite.py
SYSTEM H BATCH REPS [RULE ...]."""
import sys, math, torch
from jacobian_rules import cov, RULES
from tpx_ext.experiments.systems import SYSTEMS
torch.set_num_threads(1); torch.set_default_dtype(torch.float64)
ACT = {"sin": (torch.sin, torch.cos), "tanh": (torch.tanh, lambda z: 1 - torch.tanh(z) ** 2),
       "sigmoid": (torch.sigmoid, lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)))}
def gradient(sysobj, rule, H, B, gen):
    W = torch.tensor(sysobj.W); b = torch.tensor(sysobj.bias); g0 = sysobj.gain
    act, dact = ACT[sysobj.activation]; sig = sysobj.noise
    x = sysobj.initial(B, torch.zeros(1), generator=gen)
    xs, zs, es = [], [], []
    for t in range(H):
        z = g0 * x @ W.T + b; e = sig * torch.randn(x.shape, generator=gen)
        xs.append(x); zs.append(z); es.append(e); x = act(z) + e
    R = sysobj.reward(x)  # objective
    if sysobj.baseline == "leave-one-out": base = (R.sum() - R) / (B - 1)
    else: base = torch.zeros_like(R)
    g_next = torch.autograd.functional.vjp(sysobj.reward, x, torch.ones(B))[1]
    gb = 0.0
    for t in reversed(range(H)):
        D = dact(zs[t]); J = D * (xs[t] @ W.T)
        glr = (R - base)[:, None] * es[t] / sig ** 2
        try: g = rule(glr, g_next, J, D=D)
        except TypeError: g = rule(glr, g_next, J)
        gb = gb + (J * g).sum() / B
        g_next = (D * g) @ (g0 * W)
    return gb.item()
if __name__ == "__main__":
    name, H, B, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    names = sys.argv[5:] or list(RULES)
    s = SYSTEMS[name]() if callable(SYSTEMS[name]) else SYSTEMS[name]
    res = {}
    for n in names:
        gs = torch.tensor([gradient(s, RULES[n], H, B, torch.Generator().manual_seed(r)) for r in range(reps)])
        res[n] = gs.var().item()
    m = min(res['rp'], res['lr'])
    print(f"{name} H={H} rp/lr {res['rp']/res['lr']:.3g} " + " ".join(f"{n} {res[n]/m:.2f}" for n in names if n not in ('rp','lr')), flush=True)
