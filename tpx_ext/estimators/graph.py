"""Public estimator API: one gradient of J through a stochastic computation graph.

    est = Estimator("tpx")                          # rp | lr | mix | tp | tpx
    graph = est.graph()                             # one graph per gradient
    x = graph.sample(mu, sigma, step=t, baseline=b) # Gaussian node of step t
    graph.add_objective(rho_k, step=k)              # [B] objective term of step k
    stats = graph.backward()                        # .grad += dJ/dtheta; per-node diagnostics

J = mean over the batch of sum_k rho_k (plus `extra`). A node of step t is
credited with the terms of steps k >= t: G_t = sum_{k>=t} rho_k, and its LR
gradient uses A_t = stopgrad(G_t - b_t) (see `returns.py` and TPX.md sec. 4).

The same in the shape of existing Dreamer code (docs/DREAMER_INTEGRATION.md):

    act = graph.sampler("action")                   # a = act(policy(s)) for policy(s).rsample()
    R = graph.lambda_return(reward, value, disc, lam, convention="dreamerv1")
    graph.loss(-(weight * R).mean()).backward()     # the user's loss; terms placed per step
"""

import bisect
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor, nn

from ..ops import new_running_stats
from .node import GaussianNode, Node, NodeStats
from .returns import CONVENTIONS, discounted_lambda_return, node_step_of_state, returns_to_go
from .sampler import Sampler
from .modes import KNOBS, MODE_TABLE, parse, resolve
from .weights import WeightRule

CHECKS = ("first", "every", "off")

Source = Tuple[nn.Module, Union[Tensor, Sequence[Tensor]]]


class Estimator:
    """Which gradient estimator to use, and its state across gradients. The modes and
    knobs, their defaults and checks are `modes.py`'s table; `from_name` takes its variants.

    mode: "rp" (backprop through the model), "lr" (REINFORCE with baselines),
        "mix" (rho * LR + (1 - rho) * RP at every node, with total propagation),
        "tp" (2018: one inverse-variance weight per node from per-sample parameter
        gradients; O(B x P), small models only), "tpx" (inverse-variance weights at every
        node, with total propagation).
    rho: the weight on LR; "mix" only, in [0, 1].
    weights: "tpx" only: "matrix" (default) weighs the node's per-sample LR and RP
        gradients with matrices from their joint batch covariance (cross-covariance
        included), K = (S_RP - X^T)(S_LR + S_RP - X - X^T)^+: the combination of least
        variance for every linear map of the node's gradient, so coordinates that move
        together are weighed together; "matrix-loo": the same matrices, each sample weighed
        by those of the other B - 1 samples (exactly unbiased; the batch's own matrices fit
        its noise); "coordinate": the paper's rule, one weight per coordinate from the two
        variances, k = v_RP / (v_LR + v_RP) (docs/TPX.md sec. 2).
    momentum: "tpx" only, in [0, 1): the weights use exponential moving averages of the
        node's statistics, kept per node (name, step) across graphs; 0 uses batch
        statistics, whose correlation with the batch they weight biases tpx by O(1/B)
        (docs/API.md).
    ucb: "tpx" only, >= 0 (default 2): each variance is raised by `ucb` standard errors of
        it (from the batch's 4th moment), which raises the variance of a heavy-tailed
        estimator in the batches where its outliers would leak into the combined gradient
        (`tpx_ext.estimators.weights`); 0: plain variances.
    check_sigma: raise in backward if a sigma is <= 0, inf or NaN.
    check: which graphs verify that no objective term depends on a node of a later step
        (and no value baseline on its own node), which would bias LR silently: "first"
        (default: the first graph of this Estimator; a misplaced term is a bug of the code,
        the same in every graph), "every", or "off". It follows the terms of the first three
        and the last two steps, one backward pass each (in lr mode through the model, which
        its samples otherwise skip).
    """

    def __init__(self, mode: str, *, check_sigma: bool = True, check: str = "first", **knobs):
        # the mode table checks the mode and its knobs and fills the defaults (modes.py)
        self.knobs = resolve(mode, knobs)
        if check not in CHECKS:
            raise ValueError(f"check must be one of {', '.join(CHECKS)}, got {check!r}")
        self.mode, self.spec, self.check_sigma = mode, MODE_TABLE[mode], check_sigma
        self.rho = self.knobs.get("rho")
        self.momentum = self.knobs.get("momentum", 0.0)
        self.ucb = self.knobs.get("ucb")
        self.rule = (WeightRule(self.momentum, self.ucb, self.knobs["weights"])
                     if self.spec.weight == "fused" else None)
        # (name, step) -> float64 EMA buffers of the node's 2D coordinates: matrix weights
        # [3, 2D, 2D] (LR, RP, LR-RP cross covariances; [D + 1, 3, 2D, 2D] for rows fit at z),
        # coordinate weights (var_lr, var_rp).
        self.running_stats: Dict[Tuple[str, int], object] = {}
        self.check, self.graphs = check, 0

    @classmethod
    def from_name(cls, name: str, **kwargs) -> "Estimator":
        """A mode or a named variant (`modes.VARIANTS`, e.g. "tpx-coord"); keyword arguments
        set further knobs or override the variant's."""
        mode, knobs = parse(name)
        return cls(mode, **{**knobs, **kwargs})

    def graph(self, generator: Optional[torch.Generator] = None) -> "StochasticGraph":
        """A new graph for one gradient; `generator` draws the eps of its nodes."""
        self.graphs += 1
        return StochasticGraph(self, generator)

    def __repr__(self):
        extra = "".join(f", {k}={v!r}" for k, v in self.knobs.items()
                        if KNOBS[k].default is None or v != KNOBS[k].default)
        return f"Estimator({self.mode!r}{extra})"


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    return step


class StochasticGraph:
    """Nodes and objective terms of one gradient; `backward` runs once."""

    def __init__(self, estimator: Estimator, generator: Optional[torch.Generator] = None):
        self.estimator = estimator
        self._generator = generator
        self._batch: Optional[int] = None
        self._device: Optional[torch.device] = None  # of the first mu or objective term
        self._nodes: List[Tuple[Node, Union[Tensor, str, None]]] = []  # (node, baseline)
        self._outputs: List[Tensor] = []  # node outputs, each seeded in backward
        self._terms: Dict[int, Tensor] = {}
        self.stats: List[NodeStats] = []
        self._keys: Set[Tuple[str, int]] = set()  # (name, step) of every node
        self._done = False
        self._checked = estimator.check == "every" or (estimator.check == "first"
                                                       and estimator.graphs == 1)
        self._watch: List[Tuple[NodeStats, Tensor]] = []  # the samples the check follows
        self._returns: Optional[dict] = None  # what lambda_return registered

    # ----------------------------------------------------------------- building
    def sample(self, mu: Tensor, sigma: Tensor, step: int, *,
               baseline: Union[Tensor, str, None] = None,
               name: Optional[str] = None, eps: Optional[Tensor] = None,
               source: Optional[Source] = None, jacobian: Optional[Tensor] = None) -> Tensor:
        """Draw x = mu + sigma * eps, eps ~ N(0, I), as a node of step `step`.

        mu, sigma: [B, *event], same shape, dtype and device (expand a shared sigma).
        step: the node is credited with the objective terms of steps >= step.
        baseline: [B] b_t for the LR gradient (detached; default 0), or "leave-one-out":
            b_t,i = the mean of the other samples' returns-to-go G_t,j (j != i), which
            needs no value function and keeps LR unbiased (independent samples; the
            baseline of proppo's TP demos and of RLOO).
        name: identifies the node with `step` (for running statistics and diagnostics);
            default "node<n>", n counting the nodes of that step.
        eps: the standard-normal noise to use instead of a fresh draw.
        source: (module, inputs) with module(*inputs) == (mu, sigma); required in tp mode
            (its per-sample parameter gradients), ignored otherwise.
        jacobian: [B, *event], mu's shape: f'(z), where mu = f(z) with f elementwise (a
            sigmoid or tanh state, a squashed mean; detached). tpx's matrix weights then fit
            row c to the variance of the gradient at z_c, f'(z_c) g_c, which is what reaches
            the parameters and the inputs, instead of at mu_c: where f' differs by orders of
            magnitude between samples (saturating units), the samples whose gradient moves
            z count, not those that f flattens. One more pass over the batch and one more
            solve per mu coordinate. Used by weights="matrix" (the default) only.
        Returns x; in lr mode detached (REINFORCE does not backprop through the model).
        """
        self._check_open("sample")
        step = _check_step(step)
        if not (isinstance(mu, Tensor) and isinstance(sigma, Tensor)):
            raise TypeError("sample: mu and sigma must be tensors")
        if mu.shape != sigma.shape or mu.dim() < 1:
            raise ValueError(
                f"sample: mu and sigma must have the same shape [B, *event], got "
                f"{tuple(mu.shape)} and {tuple(sigma.shape)} (expand a shared sigma explicitly)"
            )
        if mu.dtype != sigma.dtype or mu.device != sigma.device or not mu.is_floating_point():
            raise ValueError(f"sample: mu and sigma must be floating tensors of one dtype and device, "
                             f"got {mu.dtype}/{mu.device} and {sigma.dtype}/{sigma.device}")
        B = self._check_batch(mu.shape[0], "mu", mu)
        if isinstance(baseline, str):
            if baseline != "leave-one-out" or B < 2:
                raise ValueError(f"sample: baseline must be a [B] tensor or 'leave-one-out' "
                                 f"(batch >= 2), got {baseline!r} with batch {B}")
        elif baseline is not None:
            if not isinstance(baseline, Tensor) or baseline.shape != (B,):
                shape = tuple(baseline.shape) if isinstance(baseline, Tensor) else type(baseline)
                raise ValueError(f"sample: baseline must have shape ({B},), got {shape}")
            baseline = baseline.detach()
        if eps is None:
            # drawn in float32 at least: autocast's float16/bfloat16 nodes see the same noise,
            # rounded, as float32 ones
            draw = torch.promote_types(mu.dtype, torch.float32)
            eps = torch.randn(mu.shape, generator=self._generator, dtype=draw,
                              device=mu.device).to(mu.dtype)
        elif eps.shape != mu.shape:
            raise ValueError(f"sample: eps must have shape {tuple(mu.shape)}, got {tuple(eps.shape)}")
        else:
            eps = eps.to(dtype=mu.dtype, device=mu.device)
        source = self._check_source(source)
        jacobian = _check_jacobian(jacobian, mu)
        name = self._check_name(name, step)

        est = self.estimator
        stats = NodeStats(name, step)
        self.stats.append(stats)
        if est.spec.weight == "none":  # plain reparameterisation: nothing to estimate
            return mu + sigma * eps
        if est.rule is None or est.rule.weights != "matrix":
            jacobian = None
        node = Node(stats, fixed_weight=est.spec.fixed_weight(est.knobs),
                    running=self._running(name, step, mu, jacobian is not None),
                    rule=est.rule,
                    check_sigma=est.check_sigma, source=source,
                    jacobian=None if jacobian is None else jacobian.reshape(B, -1))
        self._nodes.append((node, baseline))
        x = GaussianNode.apply(mu, sigma, eps, node)
        if x.requires_grad:
            self._outputs.append(x)
        if not est.spec.detached:
            if self._checked:
                self._watch.append((stats, x))
            return x
        if self._checked:  # a leaf: no gradient reaches the node, but the check sees the path
            leaf = x.detach().requires_grad_()
            self._watch.append((stats, leaf))
            return leaf
        return x.detach()

    def sampler(self, name: str, start: int = 0, baseline=None) -> Sampler:
        """A callable that draws a node named `name` per call, at steps start, start + 1, ...,
        from a torch Normal (also inside Independent or a TransformedDistribution such as a
        tanh-Normal) or (mu, sigma): `sampler(dist)` replaces `dist.rsample()`
        (`tpx_ext.estimators.sampler`)."""
        return Sampler(self, name, start, baseline)

    def lambda_return(self, rewards: Tensor, values: Tensor, discount, lam: float, *,
                      convention: str) -> Tensor:
        """Lambda-returns R [T, N] (in the shape of `rewards`), with their terms placed at
        the steps of the nodes they depend on, for `loss`.

        R_t = rewards[t] + discount[t] ((1 - lam) values[t + 1] + lam R_{t+1}), R_T = values[T]
        (DreamerV1/V2's `lambda_return`, same operations). rewards [T, N], values [T + 1, N]
        (the last is the bootstrap), both optionally with trailing dims of size 1;
        discount: a number, or [T] / [T, N] per step or sample (Dreamer's pcont).
        convention: which imagined state each entry belongs to (s_0: the start state):
            "next_reward": reward[t] = r(s_{t+1}), value[t] = v(s_t)   (TPX.md, this Dreamer)
            "dreamerv1":   reward[t] = r(s_{t+1}), value[t] = v(s_{t+1}) (states exclude s_0)
            "dreamerv2":   reward[t] = r(s_t),     value[t] = v(s_t)     (states include s_0)
        Nodes sampled without a baseline get the matching value baseline.
        """
        self._check_open("lambda_return")
        if self._returns is not None:
            raise ValueError("lambda_return: a graph takes one call (concatenate the returns)")
        if convention not in CONVENTIONS:
            raise ValueError(f"lambda_return: convention must be one of {', '.join(CONVENTIONS)}, "
                             f"got {convention!r} (see its docstring for the index alignment)")
        r = _rows(rewards, "rewards")
        v = _rows(values, "values")
        T, N = r.shape
        if v.shape != (T + 1, N):
            raise ValueError(f"lambda_return: rewards {tuple(rewards.shape)} need values of shape "
                             f"({T + 1}, {N}) (the last row is the bootstrap value), got "
                             f"{tuple(values.shape)}; DreamerV1/V2 code passes reward[:-1], value")
        self._check_batch(N, "lambda_return rewards", r)
        d = _discounts(discount, T, N, r)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise ValueError(f"lambda_return: lam must be a number in [0, 1], got {lam!r}")
        R = discounted_lambda_return(r, v, d, float(lam))
        probe = torch.zeros_like(R, requires_grad=True)  # dloss/dprobe = the returns' weights
        self._returns = dict(rewards=r, values=v, discounts=d, lam=float(lam),
                             convention=convention, probe=probe)
        return (R + probe).view(rewards.shape)

    def sample_tanh(self, mu: Tensor, sigma: Tensor, step: int, **kwargs) -> Tensor:
        """a = tanh(u) for a Gaussian node u = mu + sigma * eps (same arguments as `sample`).

        The node is the pre-tanh u, so its LR scores are exact.
        """
        return torch.tanh(self.sample(mu, sigma, step, **kwargs))

    def cut(self, state):
        """Mark a model state that feeds a network producing node parameters.

        lr mode returns it detached: REINFORCE treats states as given, so the LR
        gradient stays out of the model and the start states. Other modes return it as is.
        `state` is a tensor or a tuple, list, dict or NamedTuple of them (nested; other
        leaves pass unchanged).
        """
        return _detach_tree(state) if self.estimator.spec.detached else state

    def add_objective(self, value: Tensor, step: int) -> None:
        """Add the per-sample objective term rho_k [B] of step k (terms of one step add up).

        rho_k must depend only on nodes of steps <= k. A step without nodes is fine.
        """
        self._check_open("add_objective")
        step = _check_step(step)
        if not isinstance(value, Tensor) or value.dim() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value)
            raise ValueError(f"add_objective: value must be a [B] tensor, got {shape}")
        self._check_batch(value.shape[0], "objective value", value)
        self._terms[step] = self._terms[step] + value if step in self._terms else value

    # ----------------------------------------------------------------- backward
    def backward(self, extra: Optional[Tensor] = None) -> List[NodeStats]:
        """Accumulate dJ/dtheta into .grad with one backward pass; returns per-node diagnostics.

        J = mean_i sum_k rho_k[i] + extra. `extra` (a scalar) takes plain autograd and
        must not depend on the samples (e.g. an entropy bonus computed from mu, sigma).
        lr mode differentiates `extra` only: J enters through the advantages.
        `graph.loss(-extra).backward()` does the same as a loss to minimise.
        """
        self._check_open("backward")
        if self._returns is not None:
            raise ValueError("backward: the returns of graph.lambda_return are weighted by the "
                             "loss that uses them; call graph.loss(your_loss).backward()")
        root = self._objective(extra)
        self._execute(root, None, 1.0)
        return self.stats

    def loss(self, loss: Optional[Tensor] = None) -> Tensor:
        """A scalar loss whose `.backward()` runs the estimator (alone, in a sum with other
        losses, or scaled by AMP's GradScaler): the gradient of `loss` with every node's
        gradient estimated by the mode.

        loss: the user's own scalar loss to minimise, built from `graph.lambda_return`'s
            returns (any linear function of them, e.g. -(weight * R).mean(), plus terms such
            as an entropy bonus that do not depend on the samples) and/or from terms given to
            `add_objective`; its autograd graph is the RP path. Default: -J of the
            `add_objective` terms.
        The diagnostics are in `graph.stats` after the backward. Works with `.backward()`
        (not with torch.autograd.grad, which does not accumulate into .grad).
        """
        self._check_open("loss")
        if loss is None:
            if self._returns is not None:
                raise ValueError("loss: pass the loss built from graph.lambda_return's returns")
            root = -self._objective(None)
            value = -sum(self._terms[k] for k in sorted(self._terms)).detach().mean()
            anchor = torch.zeros((), dtype=value.dtype, device=value.device, requires_grad=True)
            self._root = root
            return _GraphLoss.apply(anchor, self, value)
        if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.is_floating_point():
            raise ValueError(f"loss: expected a floating scalar tensor, got "
                             f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss)}")
        if not self.stats:
            raise ValueError("loss: the graph has no nodes (draw samples first)")
        anchor = torch.zeros((), dtype=loss.dtype, device=loss.device, requires_grad=True)
        self._root = loss  # not an input: the outer pass must not walk its graph
        return _GraphLoss.apply(anchor, self, loss.detach())

    def _objective(self, extra: Optional[Tensor]) -> Tensor:
        """J = mean_i sum_k rho_k + extra, the RP path (lr mode: extra only, or a constant)."""
        if not self.stats:
            raise ValueError("backward: the graph has no nodes (call sample() first)")
        if not self._terms and extra is None:
            raise ValueError("backward: no objective (call add_objective() or pass extra)")
        if extra is not None and (not isinstance(extra, Tensor) or extra.dim() != 0):
            raise ValueError("backward: extra must be a scalar tensor")
        J = None
        if self._terms and not self.estimator.spec.detached:
            J = sum(self._terms[k] for k in sorted(self._terms)).mean()
        if extra is not None:
            J = extra if J is None else J + extra
        return J if J is not None else torch.zeros((), device=self._device)

    def _execute(self, root: Tensor, seed: Optional[Tensor], scale: float) -> None:
        """One autograd pass from `root` (seeded with `seed`) in which every node combines
        its gradients; `scale` = d root / d J (1 for J itself, -g for a loss seeded with g)."""
        self._done = True
        if self._returns is not None:
            self._place_returns(root)
        steps = sorted(self._terms)
        totals = [self._terms[k] for k in steps]
        if self._checked:
            self._check_placement(steps)
        if self._nodes:
            self._set_advantages(steps, totals, scale)
        roots, seeds = [], []
        if root.requires_grad:
            roots.append(root)
            seeds.append(seed)
        # Zero seeds make autograd call every node's backward exactly once, also the nodes
        # that J does not reach (lr mode, unused samples): their LR gradient is still due.
        roots += self._outputs
        seeds += [torch.zeros_like(x) for x in self._outputs]
        if roots:
            torch.autograd.backward(roots, seeds)
        self._outputs, self._watch, self._returns = [], [], None

    def _place_returns(self, loss: Tensor) -> None:
        """The terms of J = -loss from the lambda-returns: with W = dloss/dR, each reward's
        and value's share of J (J is linear in them for given discounts), added at the step
        of the state it belongs to; and each step's value baseline."""
        ret = self._returns
        (W,) = torch.autograd.grad(loss, ret["probe"], retain_graph=True, allow_unused=True)
        if W is None:
            raise ValueError("loss: it does not use the returns of graph.lambda_return")
        r, v, d = (ret[k].detach().double() for k in ("rewards", "values", "discounts"))
        with torch.enable_grad():
            r_, v_ = r.clone().requires_grad_(), v.clone().requires_grad_()
            R = discounted_lambda_return(r_, v_, d, ret["lam"])
            c_r, c_v = torch.autograd.grad((-W.double() * R).sum(), (r_, v_))
        N = r.shape[1]
        r_off, v_off = CONVENTIONS[ret["convention"]]
        shares = [(node_step_of_state(t + r_off), N * c_r[t] * r[t], N * c_r[t] * (1 - d[t]))
                  for t in range(r.shape[0])]
        shares += [(node_step_of_state(t + v_off), N * c_v[t] * v[t], N * c_v[t])
                   for t in range(v.shape[0])]
        # The baseline of a node at step t is G_t with every reward r = (1 - discount) v and
        # every value v(s_t): exact when returns and values all equal v(s_t) (TPX.md sec. 4).
        unit: Dict[int, Tensor] = {}
        for step, share, share_unit in shares:
            dtype = ret["rewards"].dtype
            # grad on (this runs inside loss().backward()): a term given to add_objective
            # keeps its graph, so the placement check still follows it
            with torch.enable_grad():
                self._terms[step] = self._terms.get(step, 0) + share.to(dtype)
            unit[step] = unit.get(step, 0) + share_unit
        steps = sorted(unit)
        G_unit = returns_to_go(torch.stack([unit[k] for k in steps]))
        ret["baselines"] = {}
        for node, _ in self._nodes:
            t = node.stats.step
            i = bisect.bisect_left(steps, t)
            # No later term, or no value of s_t (dreamerv1's s_0): leave-one-out below. A
            # node with a later term has t - v_off <= T - 1, inside values' T + 1 rows.
            if i == len(steps) or t < v_off:
                continue
            ret["baselines"][t] = (G_unit[i] * v[t - v_off]).to(ret["rewards"].dtype)
        if self._checked:  # which rows the check follows: (row, its step, what it is)
            with torch.enable_grad():  # rows of the graph also inside loss().backward()
                ret["rows"] = self._return_rows(r_off, v_off)

    def _return_rows(self, r_off: int, v_off: int) -> List[Tuple[Tensor, int, str]]:
        ret = self._returns
        rows = [(ret["rewards"][t], node_step_of_state(t + r_off), f"rewards[{t}]")
                for t in range(ret["rewards"].shape[0])]
        # The value of s_0 (step -1) depends on no node: any node it reaches is misplaced.
        rows += [(ret["values"][t], node_step_of_state(t + v_off) if t + v_off else -1,
                  f"values[{t}]") for t in range(ret["values"].shape[0])]
        return rows

    def _check_placement(self, steps: List[int]) -> None:
        """Raise if an objective term (or the value used as a node's baseline) depends on a
        node of a later step: its LR share would be missing, biasing the gradient silently."""
        if not self._watch:
            return
        rows = [(self._terms[k], k, f"the objective term of step {k}") for k in steps
                if isinstance(self._terms[k], Tensor) and self._terms[k].requires_grad]
        if self._returns is not None:
            conv = self._returns["convention"]
            rows += [(row, k, f"{what} (convention {conv!r}: "
                              + (f"a term of step {k})" if k >= 0 else
                                 "the value of s_0, a baseline of step 0)"))
                     for row, k, what in self._returns["rows"]]
        for node, _ in self._nodes:
            node.passthrough = True
        try:
            self._check_rows(rows)
        finally:
            for node, _ in self._nodes:
                node.passthrough = False

    def _check_rows(self, rows: List[Tuple[Tensor, int, str]]) -> None:
        # Each row costs a backward pass (a row of a stacked tensor reaches the whole
        # rollout), so only the rows of the first three and the last two steps are followed:
        # a wrong convention or offset misplaces every step, and the last ones catch a wrong
        # bootstrap.
        steps = sorted({k for _, k, _ in rows})
        followed = set(steps[:3] + steps[-2:])
        gen = torch.Generator().manual_seed(0)
        for row, k, what in rows:
            if k not in followed:
                continue
            if not row.requires_grad:
                continue
            later = [(stats, x) for stats, x in self._watch if stats.step > k]
            if not later:
                continue
            weight = torch.rand(row.shape, generator=gen, dtype=torch.float64).to(row)
            with torch.enable_grad():  # also inside loss().backward(), where it is off
                probe = (row * weight).sum()
            grads = torch.autograd.grad(probe, [x for _, x in later], retain_graph=True,
                                        allow_unused=True)
            for (stats, _), g in zip(later, grads):
                if g is not None and bool((g != 0).any()):
                    raise ValueError(
                        f"misplaced term: {what} depends on node {stats.name!r} of step "
                        f"{stats.step}, a later step, so that node's LR gradient misses it. "
                        "Place each term at the step of the last node it depends on (with "
                        "lambda_return: check the convention against your arrays' index "
                        "alignment, docs/DREAMER_INTEGRATION.md)")

    def _set_advantages(self, steps: List[int], totals: List[Tensor], scale: float) -> None:
        """A_t = G_t - b_t for every node, G_t = sum of the terms of steps >= t."""
        B = self._batch
        if totals:
            G = returns_to_go(torch.stack(totals).detach())
            G = torch.cat([G, torch.zeros_like(G[:1])])  # the row of nodes after the last term
        else:
            G = torch.zeros((1, B), device=self._device)
        auto = self._returns["baselines"] if self._returns is not None else {}
        for node, baseline in self._nodes:
            t = node.stats.step
            G_t = G[bisect.bisect_left(steps, t)]
            if baseline is None and self._returns is not None:
                baseline = auto.get(t, "leave-one-out")
            if isinstance(baseline, str):  # leave-one-out
                baseline = (G_t.sum() - G_t) / (B - 1)
            adv = G_t if baseline is None else G_t - baseline
            node.stats.adv = adv
            node.adv = adv / B  # J averages over the batch; d carries the same 1/B
            node.scale = scale

    # ----------------------------------------------------------------- helpers
    def _check_open(self, what: str) -> None:
        if self._done:
            raise RuntimeError(f"{what}: backward already ran on this graph; "
                               "build a new graph (Estimator.graph()) for every gradient")

    def _check_batch(self, B: int, what: str, like: Tensor) -> int:
        if self._batch is None:
            self._batch, self._device = B, like.device
        elif B != self._batch:
            raise ValueError(f"{what} has batch size {B}, but the graph's batch size is {self._batch}")
        return B

    def _check_name(self, name: Optional[str], step: int) -> str:
        if name is None:
            name = f"node{sum(1 for _, s in self._keys if s == step)}"
        if (name, step) in self._keys:
            raise ValueError(f"sample: a node named {name!r} already exists at step {step}")
        self._keys.add((name, step))
        return name

    def _check_source(self, source: Optional[Source]):
        if self.estimator.spec.weight != "traces":
            return None
        if (not isinstance(source, (tuple, list)) or len(source) != 2
                or not isinstance(source[0], nn.Module)):
            raise ValueError("sample: tp mode needs source=(module, inputs), where module(*inputs) "
                             "returns this node's (mu, sigma)")
        module, inputs = source
        return module, (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)

    def _running(self, name: str, step: int, mu: Tensor, rows: bool):
        """The node's running statistics, made at its first graph: (var_lr, var_rp) [2D]
        for coordinate weights; (LR, RP, cross) [3, 2D, 2D] for matrix weights, one such
        block per mu coordinate and one for the sigma rows (leading dim D + 1) where the
        rows have their own statistics (`jacobian`)."""
        est = self.estimator
        if est.rule is None or est.momentum == 0.0:
            return None
        coords = 2 * mu[0].numel()
        if est.rule.weights == "coordinate":
            shape = (coords,)
        else:
            shape = (mu[0].numel() + 1, 3, coords, coords) if rows else (3, coords, coords)
        buffers = est.running_stats.get((name, step))
        if buffers is None:
            if est.rule.weights == "coordinate":
                buffers = new_running_stats(coords, mu.device)
            else:
                buffers = torch.full(shape, float("nan"), dtype=torch.float64, device=mu.device)
            est.running_stats[(name, step)] = buffers
            return buffers
        have = buffers[0] if est.rule.weights == "coordinate" else buffers
        if tuple(have.shape) != shape or have.device != mu.device:
            raise ValueError(f"sample: node {name!r} at step {step} needs running statistics of "
                             f"shape {shape} on {mu.device}, but has {tuple(have.shape)} on "
                             f"{have.device} (a different event shape, device or jacobian use)")
        return buffers


def _check_jacobian(jacobian: Optional[Tensor], mu: Tensor) -> Optional[Tensor]:
    if jacobian is None:
        return None
    if not isinstance(jacobian, Tensor) or jacobian.shape != mu.shape:
        shape = tuple(jacobian.shape) if isinstance(jacobian, Tensor) else type(jacobian).__name__
        raise ValueError(f"sample: jacobian must be a tensor of mu's shape {tuple(mu.shape)}, "
                         f"got {shape}")
    jacobian = jacobian.detach().to(dtype=mu.dtype, device=mu.device)
    if not bool(torch.isfinite(jacobian).all()):
        raise ValueError("sample: jacobian must be finite everywhere (found inf or NaN)")
    return jacobian


def _detach_tree(state):
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a NamedTuple
        return type(state)(*(_detach_tree(x) for x in state))
    if isinstance(state, (tuple, list)):
        return type(state)(_detach_tree(x) for x in state)
    if isinstance(state, dict):
        return {k: _detach_tree(v) for k, v in state.items()}
    return state


def _rows(x, what: str) -> Tensor:
    """[T, N] from [T, N, 1, ...] (a view)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"lambda_return: {what} must be a floating tensor")
    while x.dim() > 2 and x.shape[-1] == 1:
        x = x.squeeze(-1)
    if x.dim() != 2:
        raise ValueError(f"lambda_return: {what} must be [T, N] (optionally with trailing dims "
                         f"of size 1), got {tuple(x.shape)}")
    return x


def _discounts(discount, T: int, N: int, like: Tensor) -> Tensor:
    """[T, N] discounts from a number, a 0-d tensor, [T], or [T, N] (+ trailing ones)."""
    if isinstance(discount, bool):
        raise ValueError("lambda_return: discount must be a number or a tensor, got a bool")
    if isinstance(discount, (int, float)):
        return like.new_full((T, N), float(discount))
    if not isinstance(discount, Tensor):
        raise ValueError(f"lambda_return: discount must be a number or a tensor, got "
                         f"{type(discount).__name__}")
    if discount.dim() == 0:
        return discount.to(like).expand(T, N)
    if discount.dim() == 1 and discount.shape[0] == T:
        return discount.to(like)[:, None].expand(T, N)
    d = _rows(discount, "discount")
    if d.shape != (T, N):
        raise ValueError(f"lambda_return: discount must be a number, [{T}] or [{T}, {N}] "
                         f"(one per reward), got {tuple(discount.shape)}")
    return d.to(like)


class _GraphLoss(torch.autograd.Function):
    """The value of the user's loss; its backward runs the estimator's own backward pass
    (re-entrant, as activation checkpointing does), seeded with the incoming gradient."""

    @staticmethod
    def forward(ctx, anchor: Tensor, graph: "StochasticGraph", value: Tensor) -> Tensor:
        ctx.graph = graph
        return value.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        graph = ctx.graph
        ctx.graph = None
        graph._check_open("loss().backward")
        loss, graph._root = graph._root, None
        scale = -float(g)
        if scale == 0.0:  # the loss enters with weight 0: nothing to add
            graph._done = True
        else:
            graph._execute(loss, g.to(loss.dtype), scale)
        return None, None, None
