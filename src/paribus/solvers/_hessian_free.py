"""Hessian-free optimisation (Martens 2010) as an optax ``GradientTransformationExtraArgs``.

Each update approximately minimises the damped quadratic model of the loss

    q(p) = g.p + 1/2 p.(G + lam I) p,        G = J^T J (or J'^T J', the generalised
                                             Gauss-Newton matrix of a loss at the outputs),

by conjugate gradients on (G + lam I) p = -g, with G v = J^T (J v) from one JVP and one VJP of
the linearisation (``pb.linearize``): G is never formed. Martens' ingredients, each of which can
be switched off for an ablation:

- Levenberg-Marquardt damping: rho = (L(theta) - L(theta + p)) / (-(g.p + 1/2 p.G p)), the
  decrease measured over the decrease the undamped model predicts; lam x 3/2 when rho < 1/4,
  lam x 2/3 when rho > 3/4;
- CG warm start from ``warm_start`` (0.95) times the previous CG solution;
- Martens' CG stopping test on the model's progress: stop at iteration i > k once
  (phi_i - phi_(i-k)) / phi_i < k ``cg_tol``, k = max(10, i / 10), phi the quadratic;
- CG backtracking: the iterates at i = ceil(1.3^j) are kept; from the last one, step back while
  the earlier iterate has the lower loss;
- a diagonal preconditioner (diag(G) + lam)^0.75.

Departures from the paper, and why: the preconditioner is the exact diagonal of G
(``Linearization.jtj_diag``, cheap for every layer paribus reads) rather than the empirical
Fisher diagonal sum_i g_i^2, which needs per-example gradients and is a worse estimate of G's
diagonal (Chapelle & Erhan 2011); a step that does not lower the loss is rejected (Martens 2010
always takes it), so that ``pb.fit``'s contract holds: a rejected trial returns zeros.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from paribus import _tree
from paribus._linearize import linearize
from paribus.solvers._info import StepInfo, step_info
from paribus.solvers._linear import FORMS

PyTree = Any
PRECONDITIONERS = ("ggn", None)
PRECONDITIONER_POWER = 0.75  # Martens (2010), section 4.7
SAVE_RATIO = 1.3  # CG iterates kept for backtracking: i = ceil(1.3^j)


class HessianFreeState(NamedTuple):
    """Arrays only, so the state jits, vmaps and serialises.

    ``damping`` is lam for the next step; ``previous`` the last CG solution (P,), the warm start
    of the next solve; ``cg_steps`` and ``backtracked`` describe the last step (CG iterations,
    and how many kept iterates backtracking stepped back); ``total_cg_steps`` counts every CG
    iteration so far. ``step_info`` (:class:`pb.StepInfo`) is what ``pb.fit`` records.
    """

    count: jax.Array
    damping: jax.Array
    previous: jax.Array
    cg_steps: jax.Array
    total_cg_steps: jax.Array
    backtracked: jax.Array
    step_info: StepInfo


def save_points(max_steps: int) -> np.ndarray:
    """The CG iterations whose iterates are kept for backtracking: ceil(1.3^j) <= max_steps."""
    points, j = set(), 0
    while math.ceil(SAVE_RATIO**j) <= max_steps:
        points.add(math.ceil(SAVE_RATIO**j))
        j += 1
    return np.asarray(sorted(points), np.int32)


class _CG(NamedTuple):
    x: jax.Array  # the last iterate
    steps: jax.Array  # iterations run
    saved: jax.Array  # (len(save_at) + 1, P): the kept iterates, then the last one
    n_saved: jax.Array  # rows of ``saved`` in use


def martens_cg(matvec, b, x0, precond, *, max_steps: int, tol: float) -> _CG:
    """Preconditioned CG on A x = b from x0, stopped by Martens' test on the quadratic
    phi(x) = 1/2 x.A x - b.x = -1/2 x.(b + r), r = b - A x (or when ||r|| falls to 16 eps
    ||b||); keeps the iterates at :func:`save_points` (the last iterate closes the list)."""
    save_at = jnp.asarray(save_points(max_steps))
    r0 = b - matvec(x0)
    y0 = precond(r0)
    phis = jnp.zeros(max_steps + 1, b.dtype).at[0].set(-0.5 * jnp.vdot(x0, b + r0))
    saved = jnp.zeros((save_at.shape[0] + 1, b.shape[0]), b.dtype)
    floor = (16 * jnp.finfo(b.dtype).eps) ** 2 * jnp.vdot(b, b)

    def body(c):
        i, x, r, y, p, phis, saved, n, _ = c
        ap = matvec(p)
        curvature, ry = jnp.vdot(p, ap), jnp.vdot(r, y)
        alpha = ry / jnp.where(curvature > 0, curvature, 1)
        x, r_new = x + alpha * p, r - alpha * ap
        y_new = precond(r_new)
        p = y_new + jnp.vdot(r_new, y_new) / jnp.where(ry != 0, ry, 1) * p
        i = i + 1
        phi = -0.5 * jnp.vdot(x, b + r_new)
        phis = phis.at[i].set(phi)
        keep = jnp.any(save_at == i)
        saved = jnp.where(keep, saved.at[n].set(x), saved)
        n = n + keep.astype(n.dtype)
        k = jnp.maximum(10, i // 10)
        progress = (phi - phis[jnp.maximum(i - k, 0)]) / jnp.where(phi < 0, phi, -1)
        done = ((i > k) & (phi < 0) & (progress < k * tol)) | (curvature <= 0)
        # Converged to rounding: further iterations would only move x by noise.
        done = done | (jnp.vdot(r_new, r_new) <= floor)
        return i, x, r_new, y_new, p, phis, saved, n, done | ~jnp.isfinite(phi)

    zero = jnp.zeros((), jnp.int32)
    init = (zero, x0, r0, y0, y0, phis, saved, zero, jnp.zeros((), bool))
    i, x, *_, saved, n, _ = jax.lax.while_loop(lambda c: (c[0] < max_steps) & ~c[-1], body, init)
    # The last iterate closes the list, replacing a kept copy of itself.
    n = jnp.where((n > 0) & jnp.all(saved[jnp.maximum(n - 1, 0)] == x), n - 1, n)
    return _CG(x, i, saved.at[n].set(x), n + 1)


def backtrack_iterates(decrease_at, saved: jax.Array, n_saved: jax.Array):
    """(index, decrease): from the last kept iterate, step back while the one before it lowers
    the loss more (Martens 2010, algorithm 2). ``decrease_at(v)`` is L(theta) - L(theta + v),
    -inf where not finite."""

    def earlier(j):
        return jnp.where(j > 0, decrease_at(saved[jnp.maximum(j - 1, 0)]), -jnp.inf)

    def body(c):
        j, _, dec_prev = c
        return j - 1, dec_prev, earlier(j - 1)

    j0 = n_saved - 1
    init = (j0, decrease_at(saved[j0]), earlier(j0))
    j, dec, _ = jax.lax.while_loop(lambda c: (c[0] > 0) & (c[2] > c[1]), body, init)
    return j, dec


def _check_config(init_damping, damping_bounds, warm_start, preconditioner, cg_max_steps,
                  cg_tol, *, where):  # fmt: skip
    lo, hi = (float(b) for b in damping_bounds)
    if not 0 < lo < hi:
        raise ValueError(f"{where}: damping_bounds must satisfy 0 < low < high; got {lo}, {hi}.")
    if not lo <= float(init_damping) <= hi:
        raise ValueError(
            f"{where}: init_damping must lie in damping_bounds [{lo}, {hi}]; got {init_damping}."
        )
    if not 0 <= float(warm_start) <= 1:
        raise ValueError(
            f"{where}: warm_start is the factor on the previous CG solution, in [0, 1] (0: "
            f"start CG from zero); got {warm_start}."
        )
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(
            f"{where}: unknown preconditioner={preconditioner!r}; expected 'ggn' or None."
        )
    if int(cg_max_steps) < 1 or not float(cg_tol) >= 0:
        raise ValueError(
            f"{where}: need cg_max_steps >= 1 and cg_tol >= 0; got {cg_max_steps}, {cg_tol}."
        )
    return lo, hi


def hessian_free(
    *,
    init_damping: float = 1.0,
    adapt_damping: bool = True,
    damping_bounds: tuple[float, float] = (1e-20, 1e16),
    warm_start: float = 0.95,
    backtrack: bool = True,
    preconditioner: str | None = "ggn",
    cg_max_steps: int = 50,
    cg_tol: float = 5e-4,
    loss: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Hessian-free (truncated-Newton) steps on the Gauss-Newton model, after Martens (2010).

    With r the residuals of ``residual_fn(params, batch)``, J = dr/dtheta, g the gradient of
    the loss and G = J^T J (for a loss at the outputs, the generalised Gauss-Newton matrix of
    the whitened problem), each update runs preconditioned CG on (G + lam I) p = -g from
    ``warm_start`` times the previous solution, picks p among the kept CG iterates by
    backtracking on the loss, and returns p if L(theta + p) < L(theta), else zeros. lam then
    follows Martens' rule on rho (see the module docstring).

    Args:
      init_damping: lam at the first step (absolute).
      adapt_damping: Martens' rule (x 3/2 when rho < 1/4, x 2/3 when rho > 3/4); False keeps
        lam fixed (then every rejected trial is at the damping limit).
      damping_bounds: lam is clipped to [low, high].
      warm_start: factor on the previous CG solution that starts the next CG; 0 starts from 0.
      backtrack: pick among the kept CG iterates by their loss; False takes the last iterate.
      preconditioner: "ggn", (diag(G) + lam)^0.75, or None.
      cg_max_steps: CG iterations per step at most (Martens: 250).
      cg_tol: eps of Martens' progress test (5e-4 in the paper).
      loss: None (1/2 ||r||^2, or the loss the residual function carries) or a loss object
        (``pb.losses``): then G is the generalised Gauss-Newton matrix.

    Returns:
      ``optax.GradientTransformationExtraArgs`` with
      ``update(updates, state, params, *, residual_fn, batch) -> (step, HessianFreeState)``;
      ``updates`` is ignored (the step forms g itself). ``state.step_info`` reports the step
      to ``pb.fit`` (its damping, gain ratio and acceptance are recorded in the history).

    Example:
      >>> import jax.numpy as jnp, paribus as pb
      >>> residual_fn = lambda p, b: jnp.exp(b[0] * p) - b[1]
      >>> batch = (jnp.array([1.0, 2.0, 3.0]), jnp.exp(0.5 * jnp.array([1.0, 2.0, 3.0])))
      >>> result = pb.fit(residual_fn, jnp.array([0.0]), pb.hessian_free(), batch,
      ...                 max_steps=50, target_loss=1e-10)
      >>> round(float(result.params[0]), 4), result.stop_reason.name
      (0.5, 'target_loss')
    """
    where = "pb.hessian_free"
    lo, hi = _check_config(init_damping, damping_bounds, warm_start, preconditioner,
                           cg_max_steps, cg_tol, where=where)  # fmt: skip
    if loss is not None and not all(hasattr(loss, a) for a in ("value", "whiten")):
        raise TypeError(f"{where}: loss must be None or a loss from pb.losses; got {loss!r}.")
    max_steps, tol, decay = int(cg_max_steps), float(cg_tol), float(warm_start)

    def init_fn(params: PyTree) -> HessianFreeState:
        _tree.check_float_params(params, where=where)
        flat, _ = ravel_pytree(params)
        nan, zero = jnp.full((), jnp.nan, flat.dtype), jnp.zeros((), jnp.int32)
        info = step_info(loss=nan, grad_norm=nan, step_norm=nan, accepted=False)
        return HessianFreeState(zero, jnp.asarray(init_damping, flat.dtype),
                                jnp.zeros_like(flat), zero, zero, zero, info)  # fmt: skip

    def update_fn(updates, state, params=None, *, residual_fn=None, batch=None, **extra):
        del updates, extra
        if residual_fn is None or not callable(residual_fn):
            raise TypeError(
                f"{where}.update needs the keyword extras residual_fn=... and batch=...: "
                f"opt.update(grads, state, params, residual_fn=residual_fn, batch=batch)."
            )
        _tree.check_float_params(params, where=where)
        flat, unravel = ravel_pytree(params)
        lin = linearize(residual_fn, params, batch, loss=loss)
        g = lin.grad_flat().astype(flat.dtype)
        lam = state.damping

        def matvec(v):
            return lin.vjp_flat(lin.jvp_flat(v)).astype(v.dtype) + lam * v

        precond = _preconditioner(lin, lam, preconditioner)
        cg = martens_cg(matvec, -g, decay * state.previous, precond, max_steps=max_steps,
                        tol=tol)  # fmt: skip

        def decrease_at(v):
            trial = jax.tree.map(jnp.add, params, unravel(v))
            dec, _ = lin.decrease(residual_fn(trial, batch))
            return jnp.where(jnp.isfinite(dec), dec, -jnp.inf).astype(flat.dtype)

        if backtrack:
            j, dec = backtrack_iterates(decrease_at, cg.saved, cg.n_saved)
        else:
            j = cg.n_saved - 1
            dec = decrease_at(cg.saved[j])
        step = cg.saved[j]
        jp = lin.jvp_flat(step)
        predicted = -(jnp.vdot(g, step) + 0.5 * jnp.vdot(jp, jp))
        ok = jnp.isfinite(dec) & (predicted > 0)
        rho = jnp.where(ok, dec / jnp.where(ok, predicted, 1), -jnp.inf)
        accepted = jnp.isfinite(dec) & (dec > 0) & jnp.all(jnp.isfinite(step))
        next_lam = _next_damping(lam, rho, adapt_damping, lo, hi)
        info = step_info(
            loss=lin.value.astype(flat.dtype),
            grad_norm=jnp.linalg.norm(g),
            damping=lam,
            gain_ratio=rho,
            accepted=accepted,
            step_norm=jnp.linalg.norm(step),
            trial_loss=lin.value.astype(flat.dtype) - dec,
            form=FORMS.index("cg"),
            at_damping_limit=~accepted & (next_lam <= lam),
        )
        new_state = HessianFreeState(
            state.count + 1, next_lam, cg.x, cg.steps, state.total_cg_steps + cg.steps,
            cg.n_saved - 1 - j, info,
        )  # fmt: skip
        return unravel(jnp.where(accepted, step, 0)), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _preconditioner(lin, lam, kind: str | None):
    """v -> M^-1 v with M = (diag(G) + lam)^0.75 ("ggn"), or the identity (None)."""
    if kind is None:
        return lambda v: v
    diag = (lin.jtj_diag_flat() + lam) ** PRECONDITIONER_POWER
    diag = jnp.where(diag > 0, diag, 1)
    return lambda v: v / diag.astype(v.dtype)


def _next_damping(lam, rho, adapt: bool, lo: float, hi: float) -> jax.Array:
    """Martens' rule: x 3/2 below rho = 1/4, x 2/3 above 3/4 (-inf rho: a failed trial)."""
    if not adapt:
        return lam
    new = jnp.where(rho < 0.25, lam * 1.5, jnp.where(rho > 0.75, lam * (2.0 / 3.0), lam))
    return jnp.clip(new, lo, hi).astype(lam.dtype)
