"""tpx_ext: TPX (Total Propagation X) policy-gradient estimators with fused kernels.

Loading the compiled extension `tpx_ext._C` registers the ops `torch.ops.tpx_ext.*` in
torch's dispatcher; `tpx_ext.ops` wraps them, `tpx_ext.reference` is their float64
specification, and `build_info()` (bound with pybind11) says how the extension was built.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C
except ImportError as exc:  # no silent fallback: the ops are the product
    raise ImportError(
        "tpx_ext: the compiled extension tpx_ext._C is missing or does not load "
        f"({exc}).\nBuild it from the source checkout with:\n"
        "    pip install --no-build-isolation -e .\n"
        "(torch must be installed first; see README.md). If tpx_ext was installed "
        "without -e, run Python from outside the source tree: the checkout's "
        "tpx_ext/ folder, which holds no compiled module, shadows the installed one."
    ) from exc

from .ops import (  # noqa: E402
    ComomentsResult,
    GaussianTpxResult,
    IvwResult,
    gaussian_tpx_backward,
    gaussian_tpx_comoments,
    ivw_combine,
    new_running_stats,
)


def build_info() -> "_C.BuildInfo":
    """How the extension was built and what its kernels use here: torch version compiled
    against, CUDA kernels and their architectures, CUDA toolkit/runtime/driver versions, the
    CPU kernels' instruction set chosen for this CPU, and their thread count."""
    return _C.build_info()


def cuda_compiled() -> bool:
    """True when the CUDA kernels were compiled into the extension."""
    return _C.build_info().cuda_compiled


__all__ = [
    "ComomentsResult",
    "Estimator",
    "GaussianTpxResult",
    "IvwResult",
    "MODES",
    "NodeStats",
    "StochasticGraph",
    "baseline_coefficients",
    "build_info",
    "cuda_compiled",
    "gaussian_tpx_backward",
    "gaussian_tpx_comoments",
    "ivw_combine",
    "lambda_return_terms",
    "new_running_stats",
    "returns_to_go",
]
from .estimators import MODES, Estimator, NodeStats, StochasticGraph, baseline_coefficients, lambda_return_terms, returns_to_go  # noqa: E402,E501
