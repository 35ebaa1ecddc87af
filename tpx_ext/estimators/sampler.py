"""A graph's nodes drawn in place of `rsample`: the sampler counts the steps itself.

    act = graph.sampler("action")
    a = act(policy(state))          # instead of policy(state).rsample(); step 0, 1, 2, ...

A sampler takes what models already produce: a `Normal`, an `Independent` of one,
a `TransformedDistribution` of either (a tanh-Normal policy), or `(mu, sigma)`. The
node is the Gaussian underneath; the transforms are applied to its sample, so the LR
scores are the Gaussian's and exact.
"""

import contextlib
import functools
from typing import List, Tuple, Union

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal, Transform, TransformedDistribution


def gaussian_parts(dist) -> Tuple[Tensor, Tensor, List[Transform]]:
    """(mu, sigma, transforms) of a Normal under any nesting of Independent and
    TransformedDistribution, or of a (mu, sigma) pair; x = transforms(mu + sigma * eps)."""
    if isinstance(dist, (tuple, list)) and len(dist) == 2:
        return dist[0], dist[1], []
    transforms: List[Transform] = []
    while True:
        if isinstance(dist, Independent):
            dist = dist.base_dist
        elif isinstance(dist, TransformedDistribution):
            transforms = list(dist.transforms) + transforms
            dist = dist.base_dist
        elif isinstance(dist, Normal):
            return dist.loc, dist.scale, transforms
        else:
            raise TypeError(
                f"sampler: cannot draw a node from {type(dist).__name__}: pass a "
                "torch.distributions.Normal, an Independent or TransformedDistribution of one "
                "(e.g. a tanh-Normal), or (mu, sigma); for a wrapper class, pass the torch "
                "distribution it holds")


class Sampler:
    """Draws one node of a `StochasticGraph` per call, at steps start, start + 1, ...

    name: the node's name (with the step, its identity across graphs).
    baseline: each call's default baseline (a [B] tensor, "leave-one-out" or None; with
        `graph.lambda_return`, None means the value baseline that matches its convention).
    """

    def __init__(self, graph, name: str, start: int, baseline):
        if not isinstance(name, str) or not name:
            raise ValueError(f"sampler: name must be a non-empty string, got {name!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"sampler: start must be an int >= 0, got {start!r}")
        self.graph, self.name, self.step, self.baseline = graph, name, start, baseline

    def __call__(self, dist: Union[Distribution, Tuple[Tensor, Tensor]], sigma: Tensor = None,
                 *, baseline=None, **kwargs) -> Tensor:
        """The transformed sample of a node at the next step; `sampler(mu, sigma)` also works.
        Other keywords (eps, source) go to `StochasticGraph.sample`."""
        mu, sig, transforms = gaussian_parts(dist if sigma is None else (dist, sigma))
        if not (isinstance(mu, Tensor) and isinstance(sig, Tensor)):
            raise TypeError("sampler: mu and sigma must be tensors")
        if mu.shape != sig.shape:  # a Normal broadcasts its loc and scale
            mu, sig = torch.broadcast_tensors(mu, sig)
        if mu.dtype != sig.dtype:  # e.g. under autocast: one float16 head, one float32 head
            dtype = torch.promote_types(mu.dtype, sig.dtype)
            mu, sig = mu.to(dtype), sig.to(dtype)
        x = self.graph.sample(mu, sig, self.step, name=self.name,
                              baseline=self.baseline if baseline is None else baseline, **kwargs)
        self.step += 1
        for transform in transforms:
            x = transform(x)
        return x

    rsample = __call__

    @contextlib.contextmanager
    def capture(self):
        """Inside the block, every `Normal.rsample()` call (also through Independent and
        TransformedDistribution) draws a node of this sampler instead: a model that calls
        `rsample` itself needs no change. Only this thread's calls are meant to run inside."""
        original = Normal.rsample
        sampler = self

        def rsample(dist, sample_shape=torch.Size()):
            if tuple(sample_shape):
                raise ValueError("sampler.capture: rsample with a sample_shape cannot be a node "
                                 "(each sample of a batch is already one)")
            return sampler(dist)

        Normal.rsample = rsample
        try:
            yield self
        finally:
            Normal.rsample = original

    def capturing(self, fn):
        """`fn` with every `Normal.rsample()` inside it drawn as this sampler's node
        (`capture`): `step = latent.capturing(model.img_step)` leaves the model untouched."""
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with self.capture():
                return fn(*args, **kwargs)
        return wrapped
