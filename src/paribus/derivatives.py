"""Partial derivatives, exact and by nudging one parameter; per-example gradients; a checker.

*Ceteris paribus*: the partial derivative d f / d theta_k is the rate at which ``f`` changes when
theta_k alone moves and every other parameter stays fixed:

    d f / d theta_k = lim_{h -> 0} (f(theta + h e_k) - f(theta - h e_k)) / 2h,

with e_k the one-hot direction of parameter k in ``ravel_pytree(params)`` order. :func:`partial`
computes it exactly, as one forward-mode product ``J e_k`` (a JVP); :func:`nudge` computes it the
way the definition reads, by moving only theta_k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from paribus import _tree
from paribus._jacobian import MODES, jacobian

PyTree = Any


def partial(f: Callable[[PyTree], Any], params: PyTree, k: int | str | jax.Array) -> jax.Array:
    """d f / d theta_k, exactly, by one JVP with the one-hot tangent e_k.

    Args:
      f: ``f(params) -> array`` (a scalar loss or a vector of outputs).
      params: any pytree of floats.
      k: a flat index into ``ravel_pytree(params)`` (an int or integer scalar array; negative
        counts from the end), or a column label such as ``"layers[0].w[0,3]"`` (see
        ``pb.jacobian(...).labels``). An index out of range raises ``IndexError``; a traced
        index (under ``jit`` or ``vmap``) cannot be checked on the host, and out of range it
        gives NaN, never a plausible 0.

    Returns:
      An array (or pytree) shaped like ``f(params)``; for a vector-valued ``f`` it is column k
      of the Jacobian of ``f``.

    Example:
      >>> import jax.numpy as jnp, paribus as pb
      >>> params = {"a": jnp.array([1.0, 2.0])}
      >>> float(pb.partial(lambda p: jnp.sum(p["a"] ** 2), params, "a[1]"))
      4.0
    """
    _tree.check_float_params(params, where="pb.partial")
    index, valid = _tree.resolve_index(params, k)
    tangent = _tree.one_hot_tree(params, index)
    return _nan_unless(valid, jax.jvp(f, (params,), (tangent,))[1])


def _nan_unless(valid: jax.Array | None, out: Any) -> Any:
    """``out`` with every float leaf NaN where ``valid`` is False (None: always valid)."""
    if valid is None:
        return out

    def poison(a):
        a = jnp.asarray(a)
        if not jnp.issubdtype(a.dtype, jnp.inexact):
            return a
        return jnp.where(valid, a, jnp.asarray(jnp.nan, a.dtype))

    return jax.tree.map(poison, out)


def default_step(dtype: Any, value: jax.Array) -> jax.Array:
    """Central-difference step h = eps^(1/3) max(1, |theta_k|): balances truncation (h^2) and
    rounding (eps / h) error, for the dtype's machine epsilon eps."""
    eps = jnp.finfo(dtype).eps
    return jnp.cbrt(jnp.asarray(eps, dtype)) * jnp.maximum(1.0, jnp.abs(value))


def _check_step(step: Any) -> jax.Array | None:
    """None when ``step`` is a concrete number > 0 (else ``ValueError``); for a traced step,
    whether it is one."""
    if isinstance(step, jax.core.Tracer):
        if jnp.shape(step) != () or not jnp.issubdtype(step.dtype, jnp.floating):
            raise TypeError(f"pb.nudge: step must be a float scalar; got {step.dtype}{step.shape}.")
        return jnp.isfinite(step) & (step > 0)
    value = np.asarray(step)
    if value.shape != () or not np.issubdtype(value.dtype, np.number):
        raise TypeError(f"pb.nudge: step must be a positive number; got {step!r}.")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(
            f"pb.nudge: step must be a finite number > 0 (the h of (f(theta + h e_k) - "
            f"f(theta - h e_k)) / 2h); got {step!r}. Leave it None for eps^(1/3) max(1, "
            "|theta_k|), which balances truncation and rounding error."
        )
    return None


def nudge(
    f: Callable[[PyTree], Any],
    params: PyTree,
    k: int | str | jax.Array,
    *,
    step: float | jax.Array | None = None,
) -> jax.Array:
    """d f / d theta_k by a central difference: move only theta_k, hold every other fixed.

        (f(theta + h e_k) - f(theta - h e_k)) / ((theta_k + h) - (theta_k - h))

    The denominator is the step actually taken in floating point, not 2h, which removes the
    representation error of theta_k +- h.

    Args:
      f: ``f(params) -> array``.
      params: any pytree of floats.
      k: flat index or column label, as in :func:`partial` (a traced index out of range
        gives NaN).
      step: the step h > 0, keyword-only; default ``eps^(1/3) * max(1, |theta_k|)`` for the
        params' dtype with machine epsilon eps (about 5e-3 in float32, 6e-6 in float64). A
        step that is not a finite number > 0, or too small to move theta_k at all in its
        dtype, raises ``ValueError`` (a traced step gives NaN instead).

    Returns:
      An array (or pytree) shaped like ``f(params)``, accurate to O(h^2 + eps / h).

    Example:
      >>> import jax.numpy as jnp, paribus as pb
      >>> params = {"a": jnp.array([1.0, 2.0])}
      >>> round(float(pb.nudge(lambda p: jnp.sum(p["a"] ** 2), params, "a[1]", step=1e-2)), 2)
      4.0
    """
    _tree.check_float_params(params, where="pb.nudge")
    step_valid = None if step is None else _check_step(step)
    index, valid = _tree.resolve_index(params, k)
    flat, unravel = ravel_pytree(params)
    h = default_step(flat.dtype, flat[index]) if step is None else jnp.asarray(step, flat.dtype)
    up = flat.at[index].add(h)
    down = flat.at[index].add(-h)
    delta = up[index] - down[index]
    if step is not None and not isinstance(delta, jax.core.Tracer) and delta == 0:
        raise ValueError(
            f"pb.nudge: the step h = {step!r} does not move theta_k = {float(flat[index])!r} in "
            f"{flat.dtype} (theta_k + h == theta_k - h); use a larger step, or None."
        )
    if step_valid is not None:
        valid = step_valid if valid is None else valid & step_valid
    out = jax.tree.map(
        lambda a, b: (jnp.asarray(a) - jnp.asarray(b)) / delta, f(unravel(up)), f(unravel(down))
    )
    return _nan_unless(valid, out)


def per_example_grads(
    loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batch: PyTree
) -> PyTree:
    """The gradient of ``loss_fn(params, example)`` for every example in ``batch``.

    Args:
      loss_fn: scalar loss of **one** example, ``loss_fn(params, example) -> ()``.
      params: any pytree of floats.
      batch: pytree of arrays with a leading example axis of N.

    Returns:
      A pytree shaped like ``params`` with a leading N axis on every leaf; its sum over that
      axis is the gradient of the summed loss.
    """
    _tree.check_float_params(params, where="pb.per_example_grads")
    _tree.leading_size(batch, where="pb.per_example_grads")
    example = jax.tree.map(lambda a: a[0], batch)
    out = jax.eval_shape(loss_fn, params, example)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        raise ValueError(
            "pb.per_example_grads: loss_fn(params, example) must return a scalar for one "
            f"example; got {out}. Sum or average inside loss_fn, or use pb.jacobian."
        )
    return jax.vmap(jax.grad(loss_fn), (None, 0))(params, batch)


class JacobianCheck(NamedTuple):
    """Worst relative errors of each Jacobian mode, in float64.

    ``vs_finite_differences[mode]`` is max |J_mode - J_fd| / max |J_fd|, with J_fd by central
    differences (expect ~1e-9); ``vs_per_example[mode]`` compares with reverse mode per example
    (expect ~1e-15). ``worst_entry`` names the (row, label) where the finite-difference error of
    the worst mode is largest.
    """

    vs_finite_differences: dict[str, float]
    vs_per_example: dict[str, float]
    worst_entry: tuple[int, str]

    def ok(self, rtol: float = 1e-6) -> bool:
        return max(self.vs_finite_differences.values()) <= rtol


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), np.finfo(np.float64).tiny))


def check_jacobian(
    fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    xs: PyTree,
    *,
    modes: Sequence[str] | None = None,
) -> JacobianCheck:
    """Compare every Jacobian mode with each other and with finite differences, in float64.

    The user's first tool when a derivative looks wrong: params and xs are cast to float64,
    every mode of :func:`pb.jacobian` is computed, and so is the finite-difference matrix whose
    column k is ``pb.nudge`` of the batched outputs for parameter k. Not for jit (it returns
    Python floats); P columns cost 2P batched evaluations.
    """
    available = [m for m in MODES if m != "auto"]
    modes = list(modes or available)
    with jax.enable_x64(True):

        def to64(a):
            is_float = jnp.issubdtype(jnp.result_type(a), jnp.floating)
            return jnp.asarray(a, jnp.float64) if is_float else a

        params64, xs64 = jax.tree.map(to64, params), jax.tree.map(to64, xs)
        flat, unravel = ravel_pytree(params64)

        def outputs(theta):
            return jax.vmap(fn, (None, 0))(unravel(theta), xs64).reshape(-1)

        def column(k):
            return nudge(outputs, flat, k)

        # lax.map in chunks: one vmap over all P columns would hold 2P batched evaluations.
        fd = np.asarray(jax.lax.map(column, jnp.arange(flat.size), batch_size=64)).T
        mats = {m: np.asarray(jacobian(fn, params64, xs64, mode=m).matrix) for m in modes}
        ref = np.asarray(jacobian(fn, params64, xs64, mode="per_example").matrix)
    errors = {m: _relative(mat, fd) for m, mat in mats.items()}
    agree = {m: _relative(mat, ref) for m, mat in mats.items()}
    worst_mode = max(errors, key=errors.get)
    row, col = np.unravel_index(np.argmax(np.abs(mats[worst_mode] - fd)), fd.shape)
    labels = _tree.labels(params)
    return JacobianCheck(errors, agree, (int(row), labels[int(col)]))
