"""Policy-gradient estimators (rp, lr, mix, tp, tpx) for stochastic computation graphs.

`graph.py` is the public API, `node.py` the node's autograd function, `tp.py`
the 2018 per-parameter weighting, `returns.py` the returns-to-go (TPX.md sec. 4).
"""

from .graph import MODES, Estimator, StochasticGraph
from .node import NodeStats
from .returns import (
    baseline_coefficients,
    lambda_return_terms,
    lambda_returns,
    returns_to_go,
    step_credit,
)

__all__ = [
    "MODES",
    "Estimator",
    "NodeStats",
    "StochasticGraph",
    "baseline_coefficients",
    "lambda_return_terms",
    "lambda_returns",
    "returns_to_go",
    "step_credit",
]
