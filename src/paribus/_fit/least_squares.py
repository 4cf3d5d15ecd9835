"""``pb.least_squares``: a classic least-squares fit, MINPACK's algorithm by default.

A front door for the problems ``scipy.optimize.least_squares`` and MINPACK were built for (a
model with a handful of parameters fitted to data, a system of equations): the same loop as
:func:`paribus.fit` with :func:`paribus.levenberg_marquardt` ``(damping="minpack")``, whose
defaults there are MINPACK's, not the network-training defaults of ``pb.levenberg_marquardt()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from paribus import _residual_losses
from paribus._fit.fitting import fit
from paribus._fit.records import FitResult
from paribus._tree import num_params
from paribus.solvers.levenberg_marquardt import levenberg_marquardt

PyTree = Any

__all__ = ["least_squares"]

WHERE = "pb.least_squares"


def _residual_loss(loss: Any, f_scale: float) -> _residual_losses.ResidualLoss | None:
    """None for plain 1/2 ||r||^2, else the robust loss (a name with ``f_scale``, or a
    :class:`paribus.losses.ResidualLoss` as given)."""
    if isinstance(loss, _residual_losses.ResidualLoss):
        if f_scale != 1.0:
            raise ValueError(
                f"{WHERE}: f_scale applies to a loss given by name; the loss "
                f"{loss.name!r} given as an object already has its scale {loss.scale}. Got "
                f"f_scale={f_scale}."
            )
        return None if loss.name == "linear" else loss
    if not isinstance(loss, str):
        raise TypeError(
            f"{WHERE}: loss must be a name ({', '.join(_residual_losses.NAMES)}) or a "
            f"pb.losses.ResidualLoss such as pb.losses.huber(0.1); got {type(loss).__name__}. "
            "For a network's outputs with a GGN loss (softmax cross-entropy, ...), use "
            "pb.fit(..., pb.levenberg_marquardt(loss=...), loss=...)."
        )
    if loss not in _residual_losses.NAMES:
        raise ValueError(
            f"{WHERE}: unknown loss {loss!r}; expected one of {_residual_losses.NAMES} (as "
            "scipy.optimize.least_squares's loss)."
        )
    robust = _residual_losses.robust(loss, f_scale)  # checks f_scale
    return None if loss == "linear" else robust


def least_squares(
    residual_fn: Callable[[PyTree, PyTree], Any],
    x0: PyTree,
    batch: PyTree = None,
    *,
    loss: str | _residual_losses.ResidualLoss = "linear",
    f_scale: float = 1.0,
    damping: str = "minpack",
    scaling: str | None = None,
    max_steps: int | None = None,
    target_loss: float | None = None,
    grad_tol: float = 0.0,
    step_tol: float | None = None,
) -> FitResult:
    """Minimise 1/2 sum_k rho((r_k / C)^2) C^2 over x, r = ``residual_fn(x, batch)``, from x0.

    With ``loss="linear"`` this is 1/2 ||r(x)||^2, the classic nonlinear least-squares
    problem: a model with P parameters fitted to R >= P data points (a curve fit), or a
    system of R = P equations. Each trial is MINPACK's (``lmder``, Moré 1978, behind
    ``scipy.optimize.least_squares(method="lm")``): Moré's trust region on the Jacobian J
    (R, P), the step on its boundary with Marquardt's scaling D = diag(J^T J), Gauss-Newton's
    step whenever it fits. It is :func:`paribus.fit` with
    ``pb.levenberg_marquardt(damping="minpack", scaling=scaling, loss=...)``, so the result,
    its stop reason and ``converged`` flag, ``jit`` and ``vmap`` (over starts or data) are
    ``pb.fit``'s.

    Why a separate entry point: on these problems MINPACK's trust region needs MINPACK's
    trials (the MGH problems, 43 starts, float64: median 1.0x scipy's lmder, 41 solved),
    while ``pb.levenberg_marquardt()``'s defaults (Nielsen's damping; Gauss-Newton's path
    where the residuals can be met exactly) need 1.11x there; on networks with R > P it is
    the other way round (the trust region ends 3.2x higher after 100 trials, up to 2,700x on
    MLPs, and each update costs 4.6-9.3x more; also on MLPs as small as P = 7), and no rule
    measured tells a curve fit from a network by its shapes (``benchmarks/RESULTS.md``,
    2026-12-03). Train networks with ``pb.fit(..., pb.levenberg_marquardt(), ...)``.

    Args:
      residual_fn: ``residual_fn(x, batch)`` -> residuals, a float array or pytree of them
        (R in all), e.g. ``model(x, t) - y``.
      x0: the start, a pytree of float arrays (P parameters in all). Its dtype is the fit's:
        enable ``jax_enable_x64`` for a float64 fit.
      batch: the data ``residual_fn`` reads (any pytree, or None).
      loss: ``"linear"`` (1/2 ||r||^2), or a robust loss as scipy's: ``"huber"``,
        ``"soft_l1"``, ``"cauchy"``, ``"arctan"`` with scale C = ``f_scale``, or a
        :class:`paribus.losses.ResidualLoss` (then ``f_scale`` stays 1). A robust loss is
        fitted by iteratively reweighted Gauss-Newton (see ``ResidualLoss``) with D = I.
      f_scale: C > 0, the residual size beyond which a robust loss counts less.
      damping: ``"minpack"``; another rule of ``pb.levenberg_marquardt`` (``"nielsen"``,
        ...) for a comparison on the same problem.
      scaling: None (Marquardt's for ``loss="linear"``, else the identity), ``"identity"``
        or ``"marquardt"``; see ``pb.levenberg_marquardt``.
      max_steps: at most this many trials (each one evaluation of r and J); default
        100 (P + 1), scipy's ``max_nfev`` for ``method="lm"``.
      target_loss, grad_tol, step_tol: ``pb.fit``'s stopping tests. By default a fit ends
        when no step can move x in its dtype or lower the loss ("step", converged with a
        small gradient), at the damping limit, or on divergence or a minimum at infinity
        (not converged): scipy's tolerances of 1e-8 stop sooner, a few digits short of what
        the dtype can reach.

    Returns:
      :class:`paribus.FitResult`: ``params`` (the minimiser, shaped like x0), ``history``
      (the loss, 1/2 ||r||^2 or the robust cost, and each trial's damping, gain ratio, ...),
      ``steps`` (trials), ``stop_reason``, ``converged``, ``state``.

    Raises:
      ValueError or TypeError: an unknown loss, a bad scale, an option
        ``pb.levenberg_marquardt`` or ``pb.fit`` refuses (each names what it expected).

    Example:
      >>> import jax.numpy as jnp, paribus as pb
      >>> t = jnp.linspace(0.0, 3.0, 20)
      >>> y = 2.0 * jnp.exp(-1.5 * t)
      >>> fit = pb.least_squares(lambda x, y: x[0] * jnp.exp(-x[1] * t) - y,
      ...                        jnp.array([1.0, 1.0]), y)
      >>> [round(float(v), 4) for v in fit.params], fit.converged
      ([2.0, 1.5], True)
    """
    robust = _residual_loss(loss, f_scale)
    if max_steps is None:
        max_steps = 100 * (num_params(x0) + 1)
    opt = levenberg_marquardt(damping=damping, scaling=scaling, loss=robust)
    return fit(
        residual_fn,
        x0,
        opt,
        batch,
        max_steps=max_steps,
        target_loss=target_loss,
        grad_tol=grad_tol,
        step_tol=step_tol,
        loss=robust,
    )
