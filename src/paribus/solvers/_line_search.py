"""A line search along the steps of a Jacobian-based transformation (Gauss-Newton by default).

Undamped Gauss-Newton steps d = -J^+ r solve the linearised problem exactly, which is what makes
them fast near a solution and unsafe far from one: the full step can raise the loss. A line
search keeps the direction and picks its length, theta + eta d:

- "grid": the eta in {1, s, s^2, ..., s^(n-1)} (s = ``shrink``) with the lowest loss, every
  trial in one batched evaluation (``vmap`` over eta), as Mueller & Zeinhofer's energy natural
  gradient descent does for physics-informed networks;
- "backtracking": eta = 1, s, s^2, ... until the Armijo condition
  L(theta + eta d) <= L(theta) + c eta g.d holds (Nocedal & Wright, algorithm 3.1).

When no trial lowers the loss (or none meets the Armijo condition) the step is rejected: zeros.
An undamped direction would come back unchanged at the next step, so the rejection is reported
at the damping limit (``pb.fit`` then stops: "damping_limit", or "step" at a small gradient).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paribus._linearize import linearize
from paribus.solvers.gauss_newton import gauss_newton

PyTree = Any
METHODS = ("grid", "backtracking")


class LineSearchState(NamedTuple):
    """``direction_state``: the state of the transformation that gives the direction; its
    ``StepInfo`` is rewritten to describe the step actually returned (so ``pb.fit`` records the
    searched step). ``step_size``: eta of the last step (0: rejected); ``trials``: how many
    step sizes it evaluated."""

    direction_state: PyTree
    step_size: jax.Array
    trials: jax.Array


def _check_config(method, max_trials, shrink, armijo, *, where):
    if method not in METHODS:
        raise ValueError(f"{where}: unknown method={method!r}; expected one of {METHODS}.")
    if int(max_trials) < 1:
        raise ValueError(f"{where}: max_trials must be >= 1; got {max_trials}.")
    if not 0 < float(shrink) < 1:
        raise ValueError(f"{where}: shrink must lie in (0, 1); got {shrink}.")
    if not 0 <= float(armijo) < 1:
        raise ValueError(f"{where}: armijo must lie in [0, 1); got {armijo}.")


def step_sizes(max_trials: int, shrink: float) -> np.ndarray:
    """1, s, s^2, ..., s^(max_trials - 1)."""
    return float(shrink) ** np.arange(int(max_trials))


def line_search(
    direction: optax.GradientTransformation | None = None,
    *,
    method: str = "grid",
    max_trials: int = 20,
    shrink: float = 0.5,
    armijo: float = 1e-4,
    loss: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """theta + eta d along the step d of ``direction``, with eta chosen on the loss.

    With d the update of ``direction`` (default ``pb.gauss_newton(loss=loss)``: the minimum-norm
    Gauss-Newton step -J^+ r), g the gradient of the loss L and s = ``shrink``:

    - "grid": eta = argmin over {1, s, ..., s^(max_trials-1)} of L(theta + eta d), taken when
      it is below L(theta);
    - "backtracking": the first eta in that sequence with
      L(theta + eta d) <= L(theta) + ``armijo`` eta g.d.

    Otherwise the step is rejected (zeros). The direction's ``StepInfo`` is rewritten for the
    step returned: its norm, the trial loss, acceptance and the gain ratio
    (L(theta) - L(theta + eta d)) / (m(0) - m(eta d)) of the Gauss-Newton model m.

    Args:
      direction: a Jacobian-based transformation whose state holds one ``StepInfo`` (GN, LM,
        ``pb.hessian_free``); default Gauss-Newton.
      method: "grid" or "backtracking".
      max_trials: step sizes tried at most.
      shrink: the ratio s between successive step sizes, in (0, 1).
      armijo: the sufficient-decrease constant c of "backtracking".
      loss: None (1/2 ||r||^2, or the loss the residual function carries) or a loss object.

    Returns:
      ``optax.GradientTransformationExtraArgs`` with
      ``update(updates, state, params, *, residual_fn, batch) -> (step, LineSearchState)``.

    Example:
      >>> import jax.numpy as jnp, paribus as pb
      >>> residual_fn = lambda p, b: jnp.sqrt(p) - 1.0        # GN overshoots into p < 0
      >>> opt = pb.line_search(method="backtracking")
      >>> p = jnp.array([100.0])
      >>> step, state = opt.update(None, opt.init(p), p, residual_fn=residual_fn, batch=None)
      >>> float(state.step_size), bool(state.direction_state.step_info.accepted)
      (0.5, True)
    """
    where = "pb.line_search"
    _check_config(method, max_trials, shrink, armijo, where=where)
    direction = optax.with_extra_args_support(
        gauss_newton(loss=loss) if direction is None else direction
    )
    etas = step_sizes(max_trials, shrink)

    def init_fn(params: PyTree) -> LineSearchState:
        inner = direction.init(params)
        found = optax.tree.get_all_with_path(inner, "StepInfo")
        if len(found) != 1:
            raise ValueError(
                f"{where}: the direction must be a Jacobian-based transformation whose state "
                f"holds one StepInfo (pb.gauss_newton(), pb.levenberg_marquardt(), "
                f"pb.hessian_free()); its state holds {len(found)}."
            )
        dtype = jax.tree.leaves(found[0][1])[0].dtype
        return LineSearchState(inner, jnp.zeros((), dtype), jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, *, residual_fn=None, batch=None, **extra):
        d, inner = direction.update(
            updates, state.direction_state, params, residual_fn=residual_fn, batch=batch, **extra
        )
        ((_, info),) = optax.tree.get_all_with_path(inner, "StepInfo")
        lin = linearize(residual_fn, params, batch, loss=loss)
        dtype = info.loss.dtype
        g = lin.grad()
        slope = optax.tree.vdot(g, d).astype(dtype)

        def decrease(eta):
            trial = jax.tree.map(lambda p, v: p + (eta * v).astype(p.dtype), params, d)
            dec, _ = lin.decrease(residual_fn(trial, batch))
            return jnp.where(jnp.isfinite(dec), dec, -jnp.inf).astype(dtype)

        sizes = jnp.asarray(etas, dtype)
        if method == "grid":
            size, dec, ok, trials = _grid(decrease, sizes)
        else:
            size, dec, ok, trials = _backtracking(decrease, sizes, slope, armijo)
        accepted = info.accepted & ok
        eta = jnp.where(accepted, size, 0).astype(dtype)
        jd = lin.jvp(d).astype(dtype)
        predicted = -size * jnp.vdot(jd, lin.r.astype(dtype) + 0.5 * size * jd)
        good = info.accepted & jnp.isfinite(dec) & (predicted > 0)
        rho = jnp.where(good, dec / jnp.where(good, predicted, 1), -jnp.inf)
        rho = jnp.where(info.accepted, rho, info.gain_ratio)
        step = jax.tree.map(lambda v: (eta * v).astype(v.dtype), d)
        new_info = info._replace(
            accepted=accepted,
            gain_ratio=rho.astype(dtype),
            step_norm=(size * optax.tree.norm(d)).astype(dtype),
            trial_loss=(info.loss - dec).astype(dtype),
            # An undamped direction (Gauss-Newton) whose every step size failed comes back
            # unchanged at the next step: nothing is left to try.
            at_damping_limit=info.at_damping_limit | (~accepted & ~(info.damping > 0)),
        )
        inner = optax.tree.set(inner, StepInfo=new_info)
        return step, LineSearchState(inner, eta, trials)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _grid(decrease, sizes: jax.Array):
    """(size, decrease, ok, trials): the size with the largest decrease; ok when it is > 0."""
    decreases = jax.vmap(decrease)(sizes)
    best = jnp.argmax(decreases)
    trials = jnp.asarray(sizes.shape[0], jnp.int32)
    return sizes[best], decreases[best], decreases[best] > 0, trials


def _backtracking(decrease, sizes: jax.Array, slope: jax.Array, armijo: float):
    """(size, decrease, ok, trials): the first size meeting the Armijo condition (else the
    last one tried, not ok)."""

    def sufficient(i, dec):
        return (dec > 0) & (dec >= -armijo * sizes[i] * slope)

    def body(c):
        i, _ = c
        return i + 1, decrease(sizes[i + 1])

    n = sizes.shape[0]
    i, dec = jax.lax.while_loop(
        lambda c: (c[0] < n - 1) & ~sufficient(c[0], c[1]), body, (0, decrease(sizes[0]))
    )
    return sizes[i], dec, sufficient(i, dec), (i + 1).astype(jnp.int32)
