"""Residual functions: the single source of truth for every optimiser.

``residual_fn(params, batch) -> r`` returns the residuals (an array or a pytree of arrays) on a
batch; the loss is L = 1/2 ||r||^2 and its gradient is g = J^T r with J = dr / dtheta.
Gradient descent minimises L; Gauss-Newton and Levenberg-Marquardt linearise r.

A plain function is enough for everything (products with J by ``jax.jvp`` / ``jax.vjp``). Two
wrappers tell paribus more, so that it can take the fast paths:

- :func:`per_example` says the residuals of example i depend on example i alone, so the rows
  of J are per-example gradients (``vmap`` instead of reverse mode over the batch);
- :func:`regression_residuals` says ``r_i = apply(params, x_i) - y_i``, so for a ``pb.nets``
  network J comes from the per-layer factors and the NTK never forms J.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from paribus import _tree

PyTree = Any


class PerExample:
    """``residual_fn(params, batch) = vmap(example_fn, (None, 0))(params, batch)``.

    Attributes:
      example_fn: ``example_fn(params, example) -> (m,)`` residuals of one example.
      apply: the network when ``example_fn(params, (x, y)) = apply(params, x) - y``, else None.
    """

    def __init__(self, example_fn: Callable[[PyTree, Any], jax.Array], apply: Any = None):
        self.example_fn = example_fn
        self.apply = apply

    def __call__(self, params: PyTree, batch: PyTree) -> jax.Array:
        _tree.leading_size(batch, where="per-example residuals")
        return jax.vmap(self.example_fn, (None, 0))(params, batch)

    def inputs(self, batch: PyTree) -> PyTree:
        """The network inputs xs of a ``(xs, ys)`` batch (regression residuals only)."""
        return batch[0]

    def __repr__(self) -> str:
        inner = self.apply if self.apply is not None else self.example_fn
        return f"PerExample({inner!r})"


def per_example(example_fn: Callable[[PyTree, Any], jax.Array]) -> PerExample:
    """Batched residuals from the residuals of one example.

    Args:
      example_fn: ``example_fn(params, example) -> (m,)`` (or a scalar, m = 1).

    Returns:
      ``residual_fn(params, batch) -> (N, m)``, with every leaf of ``batch`` carrying a leading
      example axis of N. Jacobian rows are computed per example (never N times the work).
    """
    return PerExample(example_fn)


def regression_residuals(apply: Callable[[PyTree, jax.Array], jax.Array]) -> PerExample:
    """``r_i = apply(params, x_i) - y_i`` on a batch ``(xs, ys)``: xs (N, n_in), ys (N, m).

    With a ``pb.nets`` network this unlocks the structured Jacobian and NTK.

    Example:
      >>> import jax, jax.numpy as jnp, paribus as pb
      >>> init, apply = pb.nets.mlp([1, 4, 1])
      >>> residual_fn = pb.regression_residuals(apply)
      >>> residual_fn(init(jax.random.key(0)), (jnp.ones((3, 1)), jnp.ones((3, 1)))).shape
      (3, 1)
    """

    def example_fn(params: PyTree, example: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = example
        out = apply(params, x)
        if jnp.shape(out) != jnp.shape(y):
            raise ValueError(
                f"regression residuals: apply(params, x) has shape {jnp.shape(out)} but the "
                f"target y has shape {jnp.shape(y)}; expected ys of shape (N, *out_shape)."
            )
        return out - y

    return PerExample(example_fn, apply=apply)


def check_residuals(residual_fn: Callable, params: PyTree, batch: PyTree, *, where: str) -> Any:
    """Shape of ``residual_fn(params, batch)``; raises unless it is a pytree of float arrays."""
    out = jax.eval_shape(residual_fn, params, batch)
    leaves = jax.tree.leaves(out)
    if not leaves or not all(jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in leaves):
        raise TypeError(
            f"{where}: residual_fn(params, batch) must return a float array or a pytree of "
            f"float arrays; got {out}."
        )
    return out


def sum_of_squares(residuals: PyTree) -> jax.Array:
    """1/2 ||r||^2 over every leaf of ``residuals``."""
    return 0.5 * sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(residuals))


def loss(residual_fn: Callable, params: PyTree, batch: PyTree) -> jax.Array:
    """L(theta) = 1/2 ||r(theta)||^2."""
    return sum_of_squares(residual_fn(params, batch))


def loss_and_grad(
    residual_fn: Callable, params: PyTree, batch: PyTree
) -> tuple[jax.Array, PyTree, PyTree]:
    """``(L, g, r)``: the loss 1/2 ||r||^2, its gradient g = J^T r (one VJP) and the residuals."""
    r, pullback = jax.vjp(lambda p: residual_fn(p, batch), params)
    (g,) = pullback(r)
    return sum_of_squares(r), g, r


def residual_jacobian(
    residual_fn: Callable, params: PyTree, batch: PyTree, *, mode: str = "auto"
) -> jax.Array:
    """J = dr/dtheta as a dense ``(R, P)`` matrix, R the number of residuals in ravel order.

    ``PerExample`` residuals go through :func:`pb.jacobian` (structured for ``pb.nets``
    networks). Any other function: forward mode when P <= R, else reverse mode over the batch.
    """
    if isinstance(residual_fn, PerExample):
        from paribus._jacobian import jacobian

        if residual_fn.apply is not None:
            return jacobian(residual_fn.apply, params, residual_fn.inputs(batch), mode=mode).matrix
        return jacobian(residual_fn.example_fn, params, batch, mode=mode).matrix
    flat, unravel = ravel_pytree(params)

    def r_flat(theta):
        return ravel_pytree(residual_fn(unravel(theta), batch))[0]

    n_res = jax.eval_shape(r_flat, flat).shape[0]
    return (jax.jacfwd if flat.size <= n_res else jax.jacrev)(r_flat)(flat)
