"""Dispatch on the (static) solve form: one place that knows every form's module."""

from __future__ import annotations

from paribus.solvers._cg import CGOptions, cg
from paribus.solvers._dual import DEFAULT_DUAL, DualOptions, dual
from paribus.solvers._linear import Solution, primal, qr
from paribus.solvers._model import Model

__all__ = ["CGOptions", "DualOptions", "solve"]


def solve(
    form: str,
    model: Model,
    lam,
    d,
    *,
    min_norm: bool,
    cg_options: CGOptions,
    dual_options: DualOptions = DEFAULT_DUAL,
    rcond: float | None = None,
) -> Solution:
    """The step of ``form`` ("primal", "qr", "dual" or "cg"); see ``paribus.solvers._linear``.
    ``rcond``: the minimum-norm step's relative singular-value cutoff (factorised forms)."""
    if form == "cg":
        return cg(model, lam, d, min_norm, cg_options)
    if form == "dual":
        return dual(model, lam, d, min_norm, dual_options, rcond)
    return {"primal": primal, "qr": qr}[form](model, lam, d, min_norm, rcond)
