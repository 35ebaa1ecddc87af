"""Public estimator API: one gradient of J through a stochastic computation graph.

    est = Estimator("tpx")                          # rp | lr | mix | tp | tpx
    graph = est.graph()                             # one graph per gradient
    x = graph.sample(mu, sigma, step=t, baseline=b) # Gaussian node of step t
    graph.add_objective(rho_k, step=k)              # [B] objective term of step k
    stats = graph.backward()                        # .grad += dJ/dtheta; per-node diagnostics

J = mean over the batch of sum_k rho_k (plus `extra`). A node of step t is
credited with the terms of steps k >= t: G_t = sum_{k>=t} rho_k, and its LR
gradient uses A_t = stopgrad(G_t - b_t) (see `returns.py` and TPX.md sec. 4).
"""

import bisect
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor, nn

from ..ops import new_running_stats
from .node import GaussianNode, Node, NodeStats
from .returns import returns_to_go
from .weights import DEFAULT_UCB, DEFAULT_WEIGHTS, WeightRule

MODES = ("rp", "lr", "mix", "tp", "tpx")

Source = Tuple[nn.Module, Union[Tensor, Sequence[Tensor]]]


class Estimator:
    """Which gradient estimator to use, and its state across gradients.

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
    """

    def __init__(self, mode: str, *, rho: Optional[float] = None, momentum: float = 0.0,
                 ucb: Optional[float] = None, weights: Optional[str] = None,
                 check_sigma: bool = True):
        if mode not in MODES:
            raise ValueError(f"unknown estimator mode {mode!r}; valid modes: {', '.join(MODES)}")
        if (rho is not None) != (mode == "mix"):
            raise ValueError(f"rho is required by mode 'mix' and only by it (mode {mode!r}, rho={rho})")
        if mode == "mix" and not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must be in [0, 1], got {rho}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if momentum and mode != "tpx":
            raise ValueError(f"momentum applies to mode 'tpx' only (mode {mode!r})")
        if ucb is not None and mode != "tpx":
            raise ValueError(f"ucb applies to mode 'tpx' only (mode {mode!r})")
        if weights is not None and mode != "tpx":
            raise ValueError(f"weights applies to mode 'tpx' only (mode {mode!r})")
        self.rule = WeightRule(momentum, DEFAULT_UCB if ucb is None else ucb,
                               DEFAULT_WEIGHTS if weights is None else weights)
        self.rule.validate()
        self.mode, self.rho, self.momentum, self.check_sigma = mode, rho, momentum, check_sigma
        self.ucb = self.rule.ucb if mode == "tpx" else None
        # (name, step) -> float64 EMA buffers of the node's 2D coordinates: matrix weights
        # [3, 2D, 2D] (LR, RP, LR-RP cross covariances), coordinate weights (var_lr, var_rp).
        self.running_stats: Dict[Tuple[str, int], object] = {}

    def graph(self, generator: Optional[torch.Generator] = None) -> "StochasticGraph":
        """A new graph for one gradient; `generator` draws the eps of its nodes."""
        return StochasticGraph(self, generator)

    def __repr__(self):
        extra = f", rho={self.rho}" if self.mode == "mix" else ""
        extra += f", momentum={self.momentum}" if self.momentum else ""
        extra += f", ucb={self.ucb}" if self.mode == "tpx" and self.ucb != DEFAULT_UCB else ""
        if self.mode == "tpx" and self.rule.weights != DEFAULT_WEIGHTS:
            extra += f", weights={self.rule.weights!r}"
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

    # ----------------------------------------------------------------- building
    def sample(self, mu: Tensor, sigma: Tensor, step: int, *,
               baseline: Union[Tensor, str, None] = None,
               name: Optional[str] = None, eps: Optional[Tensor] = None,
               source: Optional[Source] = None) -> Tensor:
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
            eps = torch.randn(mu.shape, generator=self._generator, dtype=mu.dtype, device=mu.device)
        elif eps.shape != mu.shape:
            raise ValueError(f"sample: eps must have shape {tuple(mu.shape)}, got {tuple(eps.shape)}")
        else:
            eps = eps.to(dtype=mu.dtype, device=mu.device)
        source = self._check_source(source)
        name = self._check_name(name, step)

        est = self.estimator
        stats = NodeStats(name, step)
        self.stats.append(stats)
        if est.mode == "rp":  # plain reparameterisation: nothing to estimate
            return mu + sigma * eps
        node = Node(stats, fixed_weight={"lr": 1.0, "mix": est.rho}.get(est.mode),
                    running=self._running(name, step, mu),
                    rule=est.rule if est.mode == "tpx" else None,
                    check_sigma=est.check_sigma, source=source)
        self._nodes.append((node, baseline))
        x = GaussianNode.apply(mu, sigma, eps, node)
        if x.requires_grad:
            self._outputs.append(x)
        return x.detach() if est.mode == "lr" else x

    def sample_tanh(self, mu: Tensor, sigma: Tensor, step: int, **kwargs) -> Tensor:
        """a = tanh(u) for a Gaussian node u = mu + sigma * eps (same arguments as `sample`).

        The node is the pre-tanh u, so its LR scores are exact.
        """
        return torch.tanh(self.sample(mu, sigma, step, **kwargs))

    def cut(self, state: Tensor) -> Tensor:
        """Mark a model state that feeds a network producing node parameters.

        lr mode returns it detached: REINFORCE treats states as given, so the LR
        gradient stays out of the model and the start states. Other modes return it as is.
        """
        return state.detach() if self.estimator.mode == "lr" else state

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
        """
        self._check_open("backward")
        if not self.stats:
            raise ValueError("backward: the graph has no nodes (call sample() first)")
        if not self._terms and extra is None:
            raise ValueError("backward: no objective (call add_objective() or pass extra)")
        if extra is not None and (not isinstance(extra, Tensor) or extra.dim() != 0):
            raise ValueError("backward: extra must be a scalar tensor")
        self._done = True
        steps = sorted(self._terms)
        totals = [self._terms[k] for k in steps]
        if self._nodes:
            self._set_advantages(steps, totals)

        roots = []
        if totals and self.estimator.mode != "lr":
            roots.append(sum(totals).mean() if extra is None else sum(totals).mean() + extra)
        elif extra is not None:
            roots.append(extra)
        roots = [r for r in roots if r.requires_grad]
        seeds = [None] * len(roots)
        # Zero seeds make autograd call every node's backward exactly once, also the nodes
        # that J does not reach (lr mode, unused samples): their LR gradient is still due.
        roots += self._outputs
        seeds += [torch.zeros_like(x) for x in self._outputs]
        if roots:
            torch.autograd.backward(roots, seeds)
        self._outputs = []
        return self.stats

    def _set_advantages(self, steps: List[int], totals: List[Tensor]) -> None:
        """A_t = G_t - b_t for every node, G_t = sum of the terms of steps >= t."""
        B = self._batch
        if totals:
            G = returns_to_go(torch.stack(totals).detach())
            G = torch.cat([G, torch.zeros_like(G[:1])])  # the row of nodes after the last term
        else:
            G = torch.zeros((1, B), device=self._device)
        for node, baseline in self._nodes:
            G_t = G[bisect.bisect_left(steps, node.stats.step)]
            if isinstance(baseline, str):  # leave-one-out
                baseline = (G_t.sum() - G_t) / (B - 1)
            adv = G_t if baseline is None else G_t - baseline
            node.stats.adv = adv
            node.adv = adv / B  # J averages over the batch; d carries the same 1/B

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
        if self.estimator.mode != "tp":
            return None
        if (not isinstance(source, (tuple, list)) or len(source) != 2
                or not isinstance(source[0], nn.Module)):
            raise ValueError("sample: tp mode needs source=(module, inputs), where module(*inputs) "
                             "returns this node's (mu, sigma)")
        module, inputs = source
        return module, (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)

    def _running(self, name: str, step: int, mu: Tensor):
        est = self.estimator
        if est.mode != "tpx" or est.momentum == 0.0:
            return None
        coords = 2 * mu[0].numel()
        buffers = est.running_stats.get((name, step))
        if buffers is None and est.rule.weights != "coordinate":  # (LR, RP, cross) C x C
            buffers = est.running_stats[(name, step)] = torch.full(
                (3, coords, coords), float("nan"), dtype=torch.float64, device=mu.device)
            return buffers
        if buffers is None:
            buffers = est.running_stats[(name, step)] = new_running_stats(coords, mu.device)
        elif buffers[0].shape[0] != coords or buffers[0].device != mu.device:
            raise ValueError(f"sample: node {name!r} at step {step} has {coords} coordinates on "
                             f"{mu.device}, but its running statistics have {buffers[0].shape[0]} "
                             f"on {buffers[0].device}")
        return buffers
