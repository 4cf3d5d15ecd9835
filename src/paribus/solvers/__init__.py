"""Gauss-Newton and Levenberg-Marquardt steps as optax transformations.

``FORMS`` names the solve forms; ``state.solve_form`` and ``history.solve_form`` hold the index
into it (-1: no Jacobian-based step).
"""

from paribus.solvers._damping import RULES
from paribus.solvers._info import REPAIRS, StepInfo, step_info
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
    "LevenbergMarquardtState",
    "gain_ratio",
    "gauss_newton",
    "levenberg_marquardt",
    "step_info",
]
