"""Residual functions: the single source of truth for every optimiser.

``residual_fn(params, batch) -> r`` returns the residuals (an array or a pytree of arrays) on a
batch; the loss is L = 1/2 ||r||^2 and its gradient is g = J^T r with J = dr / dtheta.
Gradient descent minimises L; Gauss-Newton and Levenberg-Marquardt linearise r.

A plain function is enough for everything: ``pb.linearize`` reads its jaxpr, and when no
operation mixes examples it takes the per-example path by itself (``.plan`` says). Two wrappers
say so up front:

- :func:`per_example` says the residuals of example i depend on example i alone, so the rows
  of J are per-example gradients and every layer's block of J J^T comes from its inputs and
  output cotangents, never from a whole-batch Jacobian;
- :func:`regression_residuals` says ``r_i = apply(params, x_i) - y_i`` for any network
  ``apply(params, x)`` of one example (``pb.nets``, Equinox, Flax NNX, a closure).

A residual function may carry its loss (``pb.losses.network_outputs(apply, loss)``): then
:func:`loss`, :func:`loss_and_grad`, the curvature functions, the solvers and ``pb.fit`` use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from paribus import _tree

PyTree = Any


class PerExample:
    """``residual_fn(params, batch) = vmap(example_fn, (None, 0))(params, batch)``.

    Attributes:
      example_fn: ``example_fn(params, example) -> (m,)`` residuals of one example (or
        ``(outputs (m,), target)`` for a loss at the outputs).
      apply: the network when ``example_fn(params, (x, y)) = apply(params, x) - y``, else None.
      loss: the loss this objective carries (None: 1/2 ||r||^2, unless ``needs_loss``).
      needs_loss: the function returns ``(outputs, targets)`` and means nothing without a loss.
    """

    def __init__(
        self,
        example_fn: Callable[[PyTree, Any], jax.Array],
        apply: Any = None,
        *,
        loss: Any = None,
        needs_loss: bool = False,
    ):
        self.example_fn = example_fn
        self.apply = apply
        self.loss = loss
        self.needs_loss = needs_loss

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

    ``apply`` is any network of one example (``pb.nets``, Equinox, Flax NNX, a closure).

    Example:
      >>> import jax, jax.numpy as jnp, paribus as pb
      >>> init, apply = pb.nets.mlp([1, 4, 1])
      >>> residual_fn = pb.regression_residuals(apply)
      >>> residual_fn(init(jax.random.key(0)), (jnp.ones((3, 1)), jnp.ones((3, 1)))).shape
      (3, 1)
    """

    def example_fn(params: PyTree, example: tuple[jax.Array, jax.Array]) -> jax.Array:
        if not (isinstance(example, tuple | list) and len(example) == 2):
            raise TypeError(
                "regression residuals: expected the batch as a pair (xs, ys) of arrays with a "
                f"leading example axis; got one example of structure "
                f"{jax.tree.structure(example)}. A dict batch {{'x': xs, 'y': ys}} becomes "
                "(batch['x'], batch['y'])."
            )
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


def resolve_loss(residual_fn: Callable, loss: Any = None, *, where: str) -> Any:
    """The loss of an objective: ``loss`` if given, else the one ``residual_fn`` carries.

    Raises ``ValueError`` when both are given and differ (two objectives in one run), or when
    the function returns ``(outputs, targets)`` and no loss is given anywhere.
    """
    carried = getattr(residual_fn, "loss", None)
    if loss is not None and carried is not None and loss is not carried and loss != carried:
        raise ValueError(
            f"{where}: the residual function carries the loss "
            f"{getattr(carried, 'name', carried)!r} and loss= gives "
            f"{getattr(loss, 'name', loss)!r}; give the loss once (e.g. "
            "pb.losses.network_outputs(apply, loss))."
        )
    loss = loss if loss is not None else carried
    if loss is None and getattr(residual_fn, "needs_loss", False):
        raise ValueError(
            f"{where}: this residual function returns (outputs, targets), which mean nothing "
            "without a loss: build it with pb.losses.network_outputs(apply, loss) (e.g. "
            "loss=pb.losses.softmax_cross_entropy()), or pass loss=."
        )
    from paribus._linearize._whiten import kind

    kind(loss)  # a clear TypeError for anything that is not a loss
    return loss


def loss(residual_fn: Callable, params: PyTree, batch: PyTree) -> jax.Array:
    """L(theta): 1/2 ||r(theta)||^2, or the loss the residual function carries."""
    from paribus._linearize._whiten import objective

    carried = resolve_loss(residual_fn, where="pb.loss")
    return objective(residual_fn, params, batch, carried)


def loss_and_grad(
    residual_fn: Callable, params: PyTree, batch: PyTree
) -> tuple[jax.Array, PyTree, PyTree]:
    """``(L, g, out)``: the loss, its gradient g (J^T r for 1/2 ||r||^2: one VJP) and what
    ``residual_fn`` returned (the residuals, or ``(outputs, targets)`` with a loss)."""
    carried = resolve_loss(residual_fn, where="pb.loss_and_grad")
    if carried is None:
        r, pullback = jax.vjp(lambda p: residual_fn(p, batch), params)
        (g,) = pullback(r)
        return sum_of_squares(r), g, r
    from paribus._linearize._whiten import objective

    out = residual_fn(params, batch)
    value, g = jax.value_and_grad(lambda p: objective(residual_fn, p, batch, carried))(params)
    return value, g, out


def residual_jacobian(
    residual_fn: Callable, params: PyTree, batch: PyTree, *, mode: str = "auto"
) -> jax.Array:
    """J = dr/dtheta as a dense ``(R, P)`` matrix, R the number of residuals in ravel order.

    ``PerExample`` residuals go through :func:`pb.jacobian` (``mode`` as there). Any other
    function through :func:`pb.linearize`: per example when its jaxpr shows that no operation
    mixes examples, else from chunks of whole-batch products (forward mode when P <= R).
    """
    if isinstance(residual_fn, PerExample):
        from paribus._jacobian import jacobian

        if residual_fn.apply is not None:
            return jacobian(residual_fn.apply, params, residual_fn.inputs(batch), mode=mode).matrix
        return jacobian(residual_fn.example_fn, params, batch, mode=mode).matrix
    from paribus._linearize import linearize

    return linearize(residual_fn, params, batch).dense()
