"""Gauss-Newton and Levenberg-Marquardt steps as optax transformations.

``FORMS`` names the solve forms; ``state.solve_form`` and ``history.solve_form`` hold the index
into it (-1: no Jacobian-based step).
"""

from paribus.solvers._damping import RULES
from paribus.solvers._hessian_free import HessianFreeState, hessian_free
from paribus.solvers._info import REPAIRS, StepInfo, step_info
from paribus.solvers._line_search import LineSearchState, line_search
from paribus.solvers._linear import FORMS, SOLVES
from paribus.solvers.gauss_newton import GaussNewtonState, gauss_newton
from paribus.solvers.levenberg_marquardt import (
    LevenbergMarquardtState,
    gain_ratio,
    levenberg_marquardt,
)

DAMPING_RULES = tuple(sorted(RULES))

__all__ = [
    "DAMPING_RULES",
    "FORMS",
    "REPAIRS",
    "SOLVES",
    "StepInfo",
    "GaussNewtonState",
    "HessianFreeState",
    "LevenbergMarquardtState",
    "LineSearchState",
    "gain_ratio",
    "gauss_newton",
    "hessian_free",
    "levenberg_marquardt",
    "line_search",
    "step_info",
]
