"""Policy-gradient estimators (rp, lr, mix, tp, tpx) for stochastic computation graphs.

`modes.py` is the table of modes, their knobs and named variants; `graph.py` the public
API (`sampler.py` its samplers for model code); `node.py` the node's autograd function,
`weights.py` the tpx weight rules, `tp.py` the 2018 per-parameter weighting, `returns.py`
the returns-to-go and lambda-return conventions (TPX.md sec. 4).
"""

from .graph import Estimator, StochasticGraph
from .modes import MODES, NAMES
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
    "NAMES",
    "Estimator",
    "NodeStats",
    "StochasticGraph",
    "baseline_coefficients",
    "lambda_return_terms",
    "lambda_returns",
    "returns_to_go",
    "step_credit",
]
