"""One jit-compiled training loop for any optax transformation, with per-step history.

``pb.fit(residual_fn, params, opt, batch, max_steps=...)`` runs ``opt`` (Gauss-Newton,
Levenberg-Marquardt, or any first-order optax optimiser, which gets the gradient of the loss) in
one ``lax.while_loop``: no host round trip per step (except the optional progress callback).
The history is preallocated, written with ``.at[]`` inside the loop and truncated on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paribus import _tree
from paribus.solvers import _model
from paribus.solvers._info import StepInfo

PyTree = Any

__all__ = ["STOP_REASONS", "FitResult", "History", "fit"]

STOP_REASONS = ("max_steps", "gradient", "step", "target_loss", "non_finite", "damping_limit")
_CODE = {name: code for code, name in enumerate(STOP_REASONS)}


class History(NamedTuple):
    """Per-step arrays: index k of ``loss`` / ``grad_norm`` is after k steps; index k of the
    others describes step k (index 0: NaN, False, -1)."""

    loss: Any
    grad_norm: Any
    damping: Any
    gain_ratio: Any
    accepted: Any
    step_norm: Any
    solve_form: Any


class Tolerances(NamedTuple):
    grad: jax.Array
    step: jax.Array
    target: jax.Array


def _step_info(state: Any) -> StepInfo | None:
    """The first :class:`StepInfo` inside an optax state (chains nest them), or None."""
    found = optax.tree.get_all_with_path(state, "StepInfo")
    return found[0][1] if found else None


def _batch_at(batch, indices, schedule, k):
    if schedule is None:
        return batch
    if schedule == "stacked":
        size = jax.tree.leaves(batch)[0].shape[0]
        return jax.tree.map(lambda a: a[k % size], batch)
    rows = indices[k % indices.shape[0]]
    return jax.tree.map(lambda a: a[rows], batch)


def _empty_history(n: int, dtype) -> History:
    nan = jnp.full((n,), jnp.nan, dtype)
    return History(nan, nan, nan, nan, jnp.zeros((n,), bool), nan, jnp.full((n,), -1, jnp.int32))


def _tree_where(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _value_and_grad(residual_fn, params, batch, loss):
    return jax.value_and_grad(lambda p: _model.objective(residual_fn, p, batch, loss))(params)


def _first_order(ctx, params, state, batch):
    """One step of a first-order optimiser: (updates, new state, value, ||g||, diagnostics)."""
    residual_fn, opt, loss = ctx
    value, grad = _value_and_grad(residual_fn, params, batch, loss)

    # value_fn names residual_fn and batch as keywords: optax's line searches hand every extra
    # they do not use themselves on to value_fn and refuse names it does not take.
    def value_fn(p, residual_fn=residual_fn, batch=batch):
        return _model.objective(residual_fn, p, batch, loss)

    updates, new_state = opt.update(
        grad, state, params, residual_fn=residual_fn, batch=batch, value=value, grad=grad,
        value_fn=value_fn,
    )  # fmt: skip
    nan = jnp.full((), jnp.nan, value.dtype)
    snorm = optax.tree.norm(updates).astype(value.dtype)
    diag = (nan, nan, jnp.ones((), bool), snorm, jnp.asarray(-1, jnp.int32))
    return updates, new_state, value, optax.tree.norm(grad).astype(value.dtype), diag


def _solver_step(ctx, params, state, batch):
    """One Gauss-Newton / LM step, diagnostics read from its state."""
    residual_fn, opt, _ = ctx
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, new_state = opt.update(zeros, state, params, residual_fn=residual_fn, batch=batch)
    info = _step_info(new_state)
    diag = (info.damping, info.gain_ratio, info.accepted, info.step_norm, info.form)
    return updates, new_state, info.loss, info.grad_norm, diag


def _record(hist: History, k, value, gnorm, diag, go) -> History:
    k1 = jnp.where(go, k + 1, k)  # a step not taken leaves no trace
    hist = hist._replace(loss=hist.loss.at[k].set(value), grad_norm=hist.grad_norm.at[k].set(gnorm))
    lam, rho, acc, snorm, form = diag
    keep = lambda arr, v: arr.at[k1].set(jnp.where(go, v, arr[k1]))  # noqa: E731
    return hist._replace(
        damping=keep(hist.damping, lam), gain_ratio=keep(hist.gain_ratio, rho),
        accepted=keep(hist.accepted, acc), step_norm=keep(hist.step_norm, snorm),
        solve_form=keep(hist.solve_form, form),
    )  # fmt: skip


def _stop_before(value, gnorm, tols: Tolerances):
    code = jnp.where(gnorm <= tols.grad, _CODE["gradient"], 0)
    code = jnp.where(value <= tols.target, _CODE["target_loss"], code)
    bad = ~(jnp.isfinite(value) & jnp.isfinite(gnorm))
    return jnp.where(bad, _CODE["non_finite"], code).astype(jnp.int32)


def _stop_after(params, diag, new_state, first_order: bool, tols: Tolerances):
    _, _, _, snorm, _ = diag
    size = optax.tree.norm(params).astype(snorm.dtype)
    # The trial step, accepted or not (MINPACK's xtol test on the radius does the same): once
    # it cannot move theta in this dtype, nothing more will happen. From a first-order rule an
    # exactly zero update is a declined step (a rejected line-search or HF trial), not
    # convergence.
    tiny = snorm <= tols.step * (size + tols.step)
    if first_order:
        tiny = tiny & (snorm > 0)
    code = jnp.where(tiny, _CODE["step"], 0)
    if not first_order:
        stuck = _step_info(new_state).at_damping_limit
        code = jnp.where(stuck, _CODE["damping_limit"], code)
    return code.astype(jnp.int32)


def _run(residual_fn, params, opt, batch, indices, tols, *, max_steps, loss, schedule,
         progress_every, progress):  # fmt: skip
    """The jitted loop; returns the untruncated FitResult fields."""
    opt = optax.with_extra_args_support(opt)
    state = opt.init(params)
    solver = _step_info(state)
    step_fn = _first_order if solver is None else _solver_step
    ctx = (residual_fn, opt, loss)
    dtype = _tree.param_dtype(params)

    def body(carry):
        k, params, state, hist, _ = carry
        b = _batch_at(batch, indices, schedule, k)
        updates, new_state, value, gnorm, diag = step_fn(ctx, params, state, b)
        if progress_every > 0:
            report = progress or _print_progress
            jax.lax.cond(
                k % progress_every == 0,
                lambda: jax.debug.callback(report, k, value),
                lambda: None,
            )
        code = _stop_before(value, gnorm, tols)
        go = code == 0
        hist = _record(hist, k, value, gnorm, diag, go)
        code = jnp.where(go, _stop_after(params, diag, new_state, solver is None, tols), code)
        params = _tree_where(go, optax.apply_updates(params, updates), params)
        state = _tree_where(go, new_state, state)
        return k + go.astype(k.dtype), params, state, hist, code

    def cond(carry):
        k, *_, code = carry
        return (k < max_steps) & (code == 0)

    init = (jnp.zeros((), jnp.int32), params, state, _empty_history(max_steps + 1, dtype),
            jnp.zeros((), jnp.int32))  # fmt: skip
    k, params, state, hist, code = jax.lax.while_loop(cond, body, init)
    value, grad = _value_and_grad(residual_fn, params, _batch_at(batch, indices, schedule, k), loss)
    hist = hist._replace(
        loss=hist.loss.at[k].set(value.astype(dtype)),
        grad_norm=hist.grad_norm.at[k].set(optax.tree.norm(grad).astype(dtype)),
    )
    return params, hist, k, code, state


def _print_progress(k, value) -> None:
    print(f"step {int(k):6d}  loss {float(value):.6e}", flush=True)


run = jax.jit(
    _run,
    static_argnames=("residual_fn", "opt", "max_steps", "loss", "schedule", "progress_every",
                     "progress"),
)  # fmt: skip


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      params: the final parameters.
      history: :class:`History`, arrays truncated to ``steps + 1`` entries.
      steps: the number of steps (trials, for LM) run.
      stop_reason: one of ``STOP_REASONS``: "gradient", "step", "target_loss", "max_steps",
        "non_finite", "damping_limit".
      state: the final optimiser state.

    Under ``jax.vmap`` / ``jax.jit`` (traced params), ``steps`` and ``stop_reason`` are integer
    arrays (``stop_reason`` indexes ``STOP_REASONS``) and the history is not truncated: entries
    past ``steps`` are NaN (False, -1 for ``accepted``, ``solve_form``).
    """

    params: PyTree
    history: History
    steps: Any
    stop_reason: Any
    state: Any


def _stack_iterator(batches: Iterator, max_steps: int, residual_fn, params) -> PyTree:
    """Up to ``max_steps + 1`` batches from an iterator, stacked along a new leading axis."""
    items = []
    for item in batches:
        items.append(item)
        if len(items) == max_steps + 1:
            break
    if not items:
        raise ValueError("pb.fit: the batch iterator gave no batches.")
    first = jax.tree.structure(items[0]), [np.shape(a) for a in jax.tree.leaves(items[0])]
    for i, item in enumerate(items[1:], 1):
        this = jax.tree.structure(item), [np.shape(a) for a in jax.tree.leaves(item)]
        if this != first:
            raise ValueError(
                f"pb.fit: batch {i} from the iterator has structure/shapes {this}; batch 0 had "
                f"{first}. Every minibatch must have the same structure and shapes."
            )
    return jax.tree.map(lambda *a: jnp.stack(a), *items)


def _is_traced(tree: PyTree) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(tree))


def _check(residual_fn, params, opt, max_steps) -> None:
    if not isinstance(max_steps, int | np.integer) or max_steps < 1:
        raise ValueError(f"pb.fit: max_steps must be an int >= 1; got {max_steps!r}.")
    if not callable(residual_fn):
        raise TypeError(f"pb.fit: residual_fn must be callable; got {residual_fn!r}.")
    if not hasattr(opt, "init") or not hasattr(opt, "update"):
        raise TypeError(
            f"pb.fit: opt must be an optax GradientTransformation (e.g. optax.adam(1e-3) or "
            f"pb.levenberg_marquardt()); got {opt!r}."
        )
    _tree.check_float_params(params, where="pb.fit")


def _truncate(result: FitResult) -> FitResult:
    steps = int(result.steps)
    history = jax.tree.map(lambda a: np.asarray(a)[: steps + 1], result.history)
    reason = STOP_REASONS[int(result.stop_reason)]
    return result._replace(history=History(*history), steps=steps, stop_reason=reason)


def fit(
    residual_fn: Callable[[PyTree, PyTree], Any],
    params: PyTree,
    opt: optax.GradientTransformation,
    batch: PyTree | Iterator[PyTree] = None,
    *,
    max_steps: int,
    target_loss: float | None = None,
    grad_tol: float = 0.0,
    step_tol: float | None = None,
    loss: Any = None,
    batch_indices: jax.Array | None = None,
    progress_every: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Minimise the loss of ``residual_fn`` with ``opt``, for at most ``max_steps`` steps.

    The loss is L = 1/2 ||r||^2 with r = ``residual_fn(params, batch)``, or with ``loss`` (an
    ``OutputLoss``) L = sum_i loss.value(z_i, t_i) with ``(z, t) = residual_fn(params, batch)``.
    A Gauss-Newton / LM ``opt`` (alone or inside ``optax.chain``) receives
    ``residual_fn`` and ``batch`` as extras and zeros as incoming updates (pass the same
    ``loss`` to it); any other optax transformation receives the gradient of L and the extras
    ``value``, ``grad``, ``value_fn`` (for optax line searches), ``residual_fn`` and ``batch``
    (for transformations of your own, e.g. a Hessian-free step). An exactly zero update from
    such a transformation is a declined step, not convergence.

    Stopping, checked on every step k on the loss L_k and gradient g_k at the current params:
    ``||g_k|| <= grad_tol`` ("gradient"), ``L_k <= target_loss`` ("target_loss"), L_k or g_k
    not finite ("non_finite"); after a step (an LM trial, accepted or not) delta,
    ``||delta|| <= step_tol (||theta|| + step_tol)`` ("step"; default step_tol = 4 eps of the
    dtype: the step no longer moves theta); LM at its largest damping and rejecting
    ("damping_limit"); else "max_steps".

    Args:
      residual_fn: ``residual_fn(params, batch)``: residuals (array or pytree of float
        arrays), or ``(outputs (N, m), targets)`` with ``loss``.
      params: initial parameters, a pytree of float arrays.
      opt: any optax transformation.
      batch: a pytree of arrays (or None); or an iterator of minibatches (up to max_steps + 1
        are drawn up front and stacked: the loop never returns to the host); with
        ``batch_indices`` the full data set.
      max_steps: at most this many steps (LM trials count, accepted or not); >= 1.
      batch_indices: (S, B) integer array: step k uses the examples
        ``batch_indices[k % S]`` of ``batch``. The LM gain ratio uses the step's own batch.
      progress_every: call ``progress(k, loss)`` on the host every this many steps (0: never);
        the default ``progress`` prints a line.

    Returns:
      :class:`FitResult`; ``history.loss[0]`` is the initial loss and ``history.loss[k]`` the
      loss after k steps; ``damping``, ``gain_ratio``, ``accepted``, ``step_norm`` and
      ``solve_form`` at index k describe step k (index 0: NaN / False / -1).
      First-order optimisers record ``accepted`` True and ``solve_form`` -1.

    Example:
      >>> import jax.numpy as jnp, paribus as pb
      >>> result = pb.fit(lambda p, b: jnp.sqrt(p) - 1.0, jnp.array([100.0]),
      ...                 pb.levenberg_marquardt(), None, max_steps=50)
      >>> round(float(result.params[0]), 6), result.stop_reason
      (1.0, 'gradient')
    """
    _check(residual_fn, params, opt, max_steps)
    schedule = None
    if isinstance(batch, Iterator):
        batch = _stack_iterator(batch, max_steps, residual_fn, params)
        schedule = "stacked"
    elif batch_indices is not None:
        batch_indices = jnp.asarray(batch_indices)
        if batch_indices.ndim != 2 or not jnp.issubdtype(batch_indices.dtype, jnp.integer):
            raise ValueError(
                "pb.fit: batch_indices must be an (S, B) integer array; got "
                f"{batch_indices.dtype}{batch_indices.shape}."
            )
        schedule = "indices"
    dtype = _tree.param_dtype(params)
    tols = Tolerances(
        grad=jnp.asarray(grad_tol, dtype),
        step=jnp.asarray(4 * jnp.finfo(dtype).eps if step_tol is None else step_tol, dtype),
        target=jnp.asarray(-jnp.inf if target_loss is None else target_loss, dtype),
    )
    result = run(
        residual_fn, params, opt, batch, batch_indices, tols,
        max_steps=int(max_steps), loss=loss, schedule=schedule,
        progress_every=int(progress_every), progress=progress,
    )  # fmt: skip
    result = FitResult(*result)
    return result if _is_traced((params, batch)) else _truncate(result)
