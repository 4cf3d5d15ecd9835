"""Gauss-Newton as an optax ``GradientTransformationExtraArgs``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from paribus.solvers import _common, _forms, _linear, _model
from paribus.solvers._info import StepInfo, empty_step_info, step_info

PyTree = Any


class GaussNewtonState(NamedTuple):
    """Arrays only. ``step_info`` (:class:`pb.StepInfo`) describes the last step: the loss and
    gradient norm it was computed from, ``accepted`` False only when the step came out
    non-finite (it is then zero), its norm and solve form; damping 0, no trial evaluated."""

    count: jax.Array
    step_info: StepInfo


def gauss_newton(
    *,
    solve: str = "auto",
    loss: Any = None,
    memory_budget: int | None = _common.DEFAULT_MEMORY_BUDGET,
    cg_max_steps: int = 50,
    cg_tol: float = 1e-10,
    rcond: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Gauss-Newton: the minimum-norm minimiser of the linearised residuals, every step.

        delta = -J^+ r = -(J^T J)^+ J^T r,       r (R,) residuals, J = dr/dtheta (R, P),

    the minimum-norm solution when J is rank-deficient or R < P (dual form: -J^T (J J^T)^+ r).
    Never NaN: pseudo-inverses use a dtype-aware eigenvalue cutoff (eps * n * largest), "qr"
    an SVD least-squares solve, "cg" conjugate gradients from zero. No step-size control: for
    that, use :func:`pb.levenberg_marquardt`.

    Args:
      solve: "primal", "qr", "dual", "cg" or "auto" (as in :func:`pb.levenberg_marquardt`).
      loss: None (1/2 ||r||^2) or an ``OutputLoss`` (generalised Gauss-Newton).
      memory_budget: bytes a dense form may use before "auto" picks cg; default half the
        device's free memory (``pb.memory.default_budget()``).
      cg_max_steps, cg_tol: iteration cap and relative residual tolerance of "cg".
      rcond: None (default), or the relative cutoff of a truncated pseudo-inverse: singular
        values of J below rcond * sigma_max are dropped, in every factorised form (from the
        Gram matrix when it resolves rcond in the dtype, else from an SVD of J). None keeps
        every direction the dtype resolves: the exact minimum-norm step, which on
        ill-conditioned problems (a PINN's J spans 1e13 in float64) points along directions of
        tiny curvature that the linear model trusts and the loss does not. The
        Gram-matrix pseudo-inverse of Mueller & Zeinhofer's ENGD is rcond = sqrt(eps P).
        Not with "cg" (which truncates by its iteration count); "auto" then takes the
        factorised form of the nonsingular side (primal when R >= P, else dual).

    Returns:
      ``optax.GradientTransformationExtraArgs`` with
      ``update(updates, state, params, *, residual_fn, batch) -> (step, GaussNewtonState)``.

    Example:
      >>> import jax.numpy as jnp, paribus as pb
      >>> opt = pb.gauss_newton()
      >>> residual_fn = lambda p, b: b[0] @ p - b[1]      # linear least squares
      >>> a, y = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), jnp.array([1.0, 2.0, 2.0])
      >>> p = jnp.zeros(2)
      >>> step, _ = opt.update(None, opt.init(p), p, residual_fn=residual_fn, batch=(a, y))
      >>> [round(float(v), 6) for v in p + step]
      [1.0, 1.0]
    """
    where = "pb.gauss_newton"
    _linear.check_solve(solve, where=where)
    _common.check_loss(loss, where=where)
    cg_options = _common.check_cg(cg_max_steps, cg_tol, where=where)
    cg_options = cg_options._replace(jacobi=False)  # a preconditioner would lose min-norm
    if rcond is not None:
        if not 0 < float(rcond) < 1:
            raise ValueError(f"{where}: rcond must be a number in (0, 1) or None; got {rcond}.")
        if solve == "cg":
            raise ValueError(
                f'{where}: rcond needs a factorised form ("primal", "qr", "dual" or '
                '"auto"); "cg" truncates by its iteration count instead.'
            )
        rcond = float(rcond)

    def init_fn(params: PyTree) -> GaussNewtonState:
        _common.check_params(params, where=where)
        dt = _model.work_dtype(ravel_pytree(params)[0].dtype)
        return GaussNewtonState(jnp.zeros((), jnp.int32), empty_step_info(dt))

    def update_fn(updates, state, params=None, *, residual_fn=None, batch=None, **extra):
        del updates, extra
        work = _common.setup(
            residual_fn,
            params,
            batch,
            loss,
            solve,
            memory_budget,
            where=where,
            cg_max_steps=cg_options.max_steps,
            state=state,
            state_type=GaussNewtonState,
        )
        model, form = work.model, work.form
        dt = model.r.dtype
        zero = jnp.zeros((), dt)
        if rcond is not None and form == "cg":
            form = "primal" if work.flat.size <= model.r.shape[0] else "dual"  # rcond: exact
        sol = _forms.solve(
            form, model, zero, None, min_norm=True, cg_options=cg_options, rcond=rcond
        )
        ok = _common.finite(sol.delta)
        delta = jnp.where(ok, sol.delta, 0)
        info = step_info(
            loss=model.value.astype(dt),
            grad_norm=sol.gnorm,
            damping=zero,
            accepted=ok,
            step_norm=jnp.linalg.norm(delta),
            form=_linear.CODES[form],
            repair=sol.repair,
        )
        new_state = GaussNewtonState(count=state.count + 1, step_info=info)
        return work.unravel(delta), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
