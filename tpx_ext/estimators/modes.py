"""What an estimator is: one table of modes, their knobs and the named variants.

`Estimator`, the Dreamer config (`estimator` + `estimator_args`), gradvar, the control and
frozen-model tools and the docs all read this table; adding a mode is one entry here plus
its node math (`node.py`) and tests.

A mode says how a node's gradient is formed (docs/TPX.md sec. 5):
    weight "none":   plain autograd through x = mu + sigma * eps (no node statistics)
    weight "fixed":  k LR + (1 - k) RP with a fixed k (lr: 1, mix: its rho)
    weight "traces": one k per node from per-sample parameter-gradient traces (tp)
    weight "fused":  inverse-variance weights from the fused op's batch statistics (tpx)
and whether its samples are returned detached (lr: REINFORCE does not backprop through
the model). A named variant is a mode plus knob values (`parse`).
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from ..ops import DEFAULT_UCB


@dataclass(frozen=True)
class Knob:
    default: object  # None: required by the modes that take it
    check: Callable[[object], bool]
    valid: str  # what `check` accepts, for error messages
    doc: str


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# "matrix": weights from each node's joint LR-RP covariance; "matrix-loo": the same, each
# sample weighed by the matrices of the other B - 1 (unbiased); "coordinate": one weight per
# coordinate from the two variances (the paper's rule; with ucb = 0 exactly it).
WEIGHTS = ("matrix", "matrix-loo", "coordinate")

KNOBS: Dict[str, Knob] = {
    "rho": Knob(None, lambda v: _number(v) and 0.0 <= v <= 1.0, "a number in [0, 1]",
                "the weight on LR at every node"),
    "weights": Knob("matrix", lambda v: v in WEIGHTS, f"one of {', '.join(WEIGHTS)}",
                    "the weight rule (docs/TPX.md sec. 2)"),
    "ucb": Knob(DEFAULT_UCB, lambda v: _number(v) and v >= 0.0, "a finite number >= 0",
                "standard errors added to each variance (from the batch's 4th moment); 0: "
                "plain variances"),
    "momentum": Knob(0.0, lambda v: _number(v) and 0.0 <= v < 1.0, "a number in [0, 1)",
                     "EMA of the node statistics across graphs; 0: batch statistics"),
}


@dataclass(frozen=True)
class Mode:
    knobs: Tuple[str, ...]
    weight: str  # none | fixed | traces | fused
    detached: bool  # samples returned detached
    doc: str
    lr_weight: object = None  # "fixed": the weight on LR, a number or the knob holding it

    def fixed_weight(self, knobs: Dict[str, object]) -> Optional[float]:
        if self.weight != "fixed":
            return None
        return float(knobs[self.lr_weight] if isinstance(self.lr_weight, str) else self.lr_weight)


MODE_TABLE: Dict[str, Mode] = {
    "rp": Mode((), "none", False, "backprop through the model (reparameterisation)"),
    "lr": Mode((), "fixed", True, "REINFORCE with baselines", lr_weight=1.0),
    "mix": Mode(("rho",), "fixed", False, "rho LR + (1 - rho) RP at every node, total propagation",
                lr_weight="rho"),
    "tp": Mode((), "traces", False, "total propagation (2018): one inverse-variance weight per "
               "node from per-sample parameter gradients, O(B x P): small models only"),
    "tpx": Mode(("weights", "ucb", "momentum"), "fused",  False,
                "inverse-variance weights at every node, total propagation"),
}
MODES = tuple(MODE_TABLE)

# name -> (mode, knobs): the variants the experiments and the docs compare
VARIANTS: Dict[str, Tuple[str, Dict]] = {
    "tpx-coord": ("tpx", {"weights": "coordinate"}),  # the paper's weights, with bounds
    "tpx-paper": ("tpx", {"weights": "coordinate", "ucb": 0.0}),  # exactly the paper's rule
    "tpx-loo": ("tpx", {"weights": "matrix-loo"}),  # the unbiased matrix weights
}
NAMES = MODES + tuple(VARIANTS)


def resolve(mode: str, knobs: Dict[str, object]) -> Dict[str, object]:
    """Every knob of `mode` with its value (given or default), checked: ValueError naming
    the knob and what is valid for an unknown mode or knob, a missing or an invalid value."""
    if mode in VARIANTS:
        base, preset = VARIANTS[mode]
        args = "".join(f", {k}={v!r}" for k, v in preset.items())
        raise ValueError(f"{mode!r} is a named variant, not a mode: Estimator.from_name({mode!r}) "
                         f"builds Estimator({base!r}{args})")
    if mode not in MODE_TABLE:
        raise ValueError(f"unknown estimator mode {mode!r}; valid modes: {', '.join(MODES)} "
                         f"(named variants: {', '.join(VARIANTS)})")
    spec = MODE_TABLE[mode]
    foreign = [k for k, v in knobs.items() if k not in spec.knobs and v is not None]
    if foreign:
        owners = {k: [m for m, s in MODE_TABLE.items() if k in s.knobs] for k in foreign}
        raise ValueError("; ".join(
            f"{k} applies to mode {' / '.join(map(repr, owners[k]))} only (mode {mode!r})"
            if k in KNOBS else f"unknown estimator knob {k!r}; knobs: {', '.join(KNOBS)}"
            for k in foreign))
    out = {}
    for name in spec.knobs:
        knob, value = KNOBS[name], knobs.get(name)
        if value is None:
            if knob.default is None:
                raise ValueError(f"{name} is required by mode {mode!r} ({knob.doc}; {knob.valid})")
            value = knob.default
        if not knob.check(value):
            raise ValueError(f"{name} must be {knob.valid}, got {value!r}")
        out[name] = float(value) if isinstance(knob.default, float) or name == "rho" else value
    if out.get("weights") == "matrix-loo" and out.get("momentum"):
        raise ValueError("weights='matrix-loo' weighs each sample by the other samples of its "
                         "batch; it keeps no running statistics (momentum must be 0)")
    return out


def parse(name: str) -> Tuple[str, Dict[str, object]]:
    """(mode, knobs) of a mode or a named variant."""
    if name in MODE_TABLE:
        return name, {}
    if name in VARIANTS:
        mode, knobs = VARIANTS[name]
        return mode, dict(knobs)
    raise ValueError(f"unknown estimator {name!r}; valid: {', '.join(NAMES)}")
