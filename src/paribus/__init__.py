"""paribus: the derivatives of neural-network training, in JAX.

Partial derivatives (exact and by nudging one parameter), gradients, per-example gradients,
Jacobians, the NTK, and Gauss-Newton / Levenberg-Marquardt steps.
"""

from importlib.metadata import PackageNotFoundError, version

from paribus import curvature, losses, memory, nets, sharding, solvers
from paribus._fit import (
    CONVERGED,
    STOP_REASONS,
    FitProgress,
    FitResult,
    FitState,
    History,
    StopReason,
    fit,
    least_squares,
)
from paribus._jacobian import Jacobian, jacobian
from paribus._linearize import Linearization, Plan, linearize
from paribus._tree import num_params
from paribus.curvature import (
    ggn_operator,
    ggn_vector_product,
    jtj_diag,
    ntk,
    per_example_grad_norms,
    residual_jtj_diag,
    residual_ntk,
)
from paribus.derivatives import (
    JacobianCheck,
    check_jacobian,
    nudge,
    partial,
    per_example_grads,
)
from paribus.residuals import (
    PerExample,
    loss,
    loss_and_grad,
    per_example,
    regression_residuals,
    residual_jacobian,
)
from paribus.solvers import (
    GaussNewtonState,
    HessianFreeState,
    LevenbergMarquardtState,
    LineSearchState,
    StepInfo,
    gauss_newton,
    hessian_free,
    levenberg_marquardt,
    line_search,
)

try:
    __version__ = version("paribus")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "CONVERGED",
    "STOP_REASONS",
    "FitProgress",
    "FitResult",
    "FitState",
    "GaussNewtonState",
    "HessianFreeState",
    "History",
    "Jacobian",
    "JacobianCheck",
    "LevenbergMarquardtState",
    "LineSearchState",
    "Linearization",
    "PerExample",
    "Plan",
    "StepInfo",
    "StopReason",
    "__version__",
    "check_jacobian",
    "curvature",
    "fit",
    "gauss_newton",
    "ggn_operator",
    "ggn_vector_product",
    "hessian_free",
    "jacobian",
    "jtj_diag",
    "least_squares",
    "levenberg_marquardt",
    "line_search",
    "linearize",
    "loss",
    "loss_and_grad",
    "losses",
    "memory",
    "nets",
    "ntk",
    "nudge",
    "num_params",
    "partial",
    "per_example",
    "per_example_grad_norms",
    "per_example_grads",
    "regression_residuals",
    "residual_jacobian",
    "residual_jtj_diag",
    "residual_ntk",
    "sharding",
    "solvers",
]
