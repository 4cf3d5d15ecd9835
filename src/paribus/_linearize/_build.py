"""``pb.linearize``: the Gauss-Newton model of an objective at the current parameters.

For residuals r(theta) (R,) of ``residual_fn(params, batch)`` and J = dr/dtheta (R, P), the
model is m(delta) = 1/2 ||r + J delta||^2. Every solver and curvature function of paribus stands
on the :class:`Linearization` built here once per step: the loss, r, J v, J^T u, the kernel
J J^T, diag(J^T J), per-example gradient norms and, on request, J itself. With a loss at the
outputs (``pb.losses``), r and J are those of the whitened problem (see
``paribus._linearize._whiten``): the same model for cross-entropy and robust fitting.

How J is reached depends on what the function tells (``Linearization.plan`` says which):

- a per-example function (``pb.per_example``, ``pb.regression_residuals``,
  ``pb.losses.network_outputs``), or a whole-batch function whose jaxpr shows that no operation
  mixes examples: each parameter leaf is placed in the layers of the per-example jaxpr
  (``paribus._linearize._jaxpr``) and its block of J J^T comes from the layer's inputs and
  output cotangents (``_structured``); leaves it cannot place fall back to per-example Jacobian
  columns of just those leaves;
- any other function (rows that depend on other examples, or no batch at all): products with
  the whole-batch function, J built from chunks of them (``_opaque``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paribus import _tree
from paribus._linearize import _jaxpr, _separable
from paribus._linearize._opaque import Opaque
from paribus._linearize._plan import LeafPlan, Plan
from paribus._linearize._structured import Structured
from paribus._linearize._whiten import kind
from paribus._linearize.linearization import Linearization

PyTree = Any


def _resolve_loss(residual_fn, loss, *, where: str):
    from paribus.residuals import resolve_loss

    return resolve_loss(residual_fn, loss, where=where)


def _batch_size(batch: PyTree) -> int | None:
    """N when every leaf of the batch has the same leading axis, else None."""
    leaves = jax.tree.leaves(batch)
    if not leaves:
        return None
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        return None
    return int(sizes.pop())


def _example_spec(batch: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)), batch)


def _per_example_parts(example_fn: Callable, params: PyTree, batch: PyTree, loss, *, where):
    """(z_fn, targets, order) of a per-example function."""
    treedef = jax.tree.structure(params)
    output_loss = kind(loss) == "output"
    out = jax.eval_shape(example_fn, params, jax.tree.map(lambda a: a[0], batch))
    if output_loss:
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise TypeError(
                f"{where}: with loss={loss.name!r}, the function must return a pair (outputs, "
                f"targets) per example; got {jax.tree.structure(out)}. Build it with "
                "pb.losses.network_outputs(apply, loss)."
            )
        z_spec = out[0]
        if not isinstance(z_spec, jax.ShapeDtypeStruct) or len(z_spec.shape) != 1:
            raise TypeError(
                f"{where}: with loss={loss.name!r}, the outputs of one example must be a "
                f"vector (m,); got {z_spec}."
            )
    else:
        _check_float_outputs(out, where=where)

    def z_fn(leaves, ex):
        res = example_fn(jax.tree.unflatten(treedef, leaves), ex)
        if output_loss:
            return res[0]
        return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(res)])

    targets = None
    if output_loss:
        targets = jax.lax.stop_gradient(jax.vmap(lambda ex: example_fn(params, ex)[1])(batch))
    order = None
    if not output_loss:
        sizes = [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(out)]
        if len(sizes) > 1:
            order = _leaf_major_order(_batch_size(batch), sizes)
    return z_fn, targets, order


def _leaf_major_order(n: int, sizes: list[int]) -> np.ndarray:
    """Example-major index of each row in leaf-major (ravel_pytree of the batch) order."""
    m = sum(sizes)
    offsets = np.cumsum([0, *sizes[:-1]])
    order = [i * m + off + j for off, size in zip(offsets, sizes, strict=True)
             for i in range(n) for j in range(size)]  # fmt: skip
    return np.asarray(order, np.int64)


def _check_float_outputs(out: Any, *, where: str) -> None:
    leaves = jax.tree.leaves(out)
    if not leaves or not all(jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in leaves):
        raise TypeError(
            f"{where}: the residual function must return a float array or a pytree of float "
            f"arrays; got {out}."
        )


def _structured(z_fn, params, batch, loss, targets, *, where: str):
    leaves = jax.tree.leaves(params)
    names = _tree.leaf_names(params)
    try:
        analysis = _jaxpr.analyse(z_fn, leaves, _example_spec(batch))
        note = ""
    except Exception as err:  # noqa: BLE001 - any failure to read the jaxpr: per-example columns
        analysis, note = None, f"its jaxpr could not be read ({type(err).__name__}: {err})"
    backend = Structured(z_fn, leaves, names, batch, loss, targets, analysis)
    return backend, backend.plan_leaves(), note


def _loss_name(loss) -> str:
    return "squared" if loss is None else str(getattr(loss, "name", loss))


def linearize(
    residual_fn: Callable,
    params: PyTree,
    batch: PyTree = None,
    *,
    loss: Any = None,
) -> Linearization:
    """The Gauss-Newton model of ``residual_fn`` at ``params``: r, J v, J^T u, J J^T, ...

    With r (R,) the residuals of ``residual_fn(params, batch)`` in ravel order and
    J = dr/dtheta (R, P), the returned :class:`Linearization` holds L, r and the products with
    J that Gauss-Newton, Levenberg-Marquardt and the curvature functions use. With a ``loss``
    at the outputs (an ``OutputLoss`` such as ``pb.losses.softmax_cross_entropy()``, whose
    residual function returns ``(outputs (N, m), targets)``; or a robust ``ResidualLoss``), r
    and J are those of the whitened problem: J' = S J with S^T S the loss Hessian, so J'^T J'
    is the generalised Gauss-Newton matrix and J'^T r the gradient.

    Call it inside ``jax.jit``; it costs one forward pass of the batch, and each product about
    one more. What it found in the function, and how it computes each leaf's columns, is in
    ``.plan``.

    Args:
      residual_fn: ``residual_fn(params, batch)``; ``pb.per_example``,
        ``pb.regression_residuals`` and ``pb.losses.network_outputs`` tell it the function is
        per example; a plain function of the whole batch is checked for that from its jaxpr.
      params: a pytree of float arrays.
      batch: a pytree of arrays with a leading example axis (or anything, without examples).
      loss: None (1/2 ||r||^2), an ``OutputLoss`` or a ``ResidualLoss``; default the loss the
        residual function carries (``pb.losses.network_outputs(apply, loss)``).

    Example:
      >>> import jax, jax.numpy as jnp, paribus as pb
      >>> init, apply = pb.nets.mlp([1, 16, 16, 1])
      >>> xs = jnp.linspace(-1, 1, 5)[:, None]
      >>> lin = pb.linearize(pb.regression_residuals(apply), init(jax.random.key(0)),
      ...                    (xs, jnp.sin(xs)))
      >>> lin.r.shape, lin.ntk().shape, lin.plan.forms()["layers[1].w"]
      ((5,), (5, 5), 'factored')
    """
    where = "pb.linearize"
    _tree.check_float_params(params, where=where)
    loss = _resolve_loss(residual_fn, loss, where=where)
    from paribus.residuals import PerExample

    n = _batch_size(batch)
    p_total = _tree.num_params(params)
    if isinstance(residual_fn, PerExample):
        if n == 0:
            raise ValueError(
                f"{where}: the batch is empty (N = 0): shapes {jax.tree.map(np.shape, batch)}; "
                "expected at least one example along the leading axis."
            )
        if n is None:
            raise ValueError(
                f"{where}: a per-example residual function needs a batch whose arrays share a "
                f"leading example axis N >= 1; got {jax.tree.map(np.shape, batch)}."
            )
        z_fn, targets, order = _per_example_parts(
            residual_fn.example_fn, params, batch, loss, where=where
        )
        backend, leaves, note = _structured(z_fn, params, batch, loss, targets, where=where)
        plan = Plan("per_example", note, n, backend.m, p_total, tuple(leaves), _loss_name(loss))
        return Linearization(backend, params, plan, order, loss)
    out = jax.eval_shape(residual_fn, params, batch)
    if kind(loss) == "output":
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise TypeError(
                f"{where}: with loss={loss.name!r}, residual_fn(params, batch) must return a "
                f"pair (outputs (N, m), targets); got {jax.tree.structure(out)}."
            )
        if len(getattr(out[0], "shape", ())) != 2:
            raise TypeError(
                f"{where}: with loss={loss.name!r}, the outputs must be a float (N, m) array; "
                f"got {out[0]}."
            )
    else:
        _check_float_outputs(out, where=where)
    proof = _separable.prove(residual_fn, params, batch, loss) if n else None
    if proof is not None and proof.example_fn is not None:
        z_fn, targets, order = _per_example_parts(
            proof.example_fn, params, batch, loss, where=where
        )
        backend, leaves, note = _structured(z_fn, params, batch, loss, targets, where=where)
        plan = Plan("separable", note, n, backend.m, p_total, tuple(leaves), _loss_name(loss))
        return Linearization(backend, params, plan, proof.order if order is None else order, loss)
    backend = Opaque(residual_fn, params, batch, loss, where=where)
    names = _tree.leaf_names(params)
    leaves = tuple(LeafPlan(nm, tuple(np.shape(leaf)), "opaque")
                   for nm, leaf in zip(names, jax.tree.leaves(params), strict=True))  # fmt: skip
    source = "opaque" if n else "no_batch"
    note = proof.reason if proof is not None else ""
    plan = Plan(source, note, backend.n, backend.m, p_total, leaves, _loss_name(loss))
    return Linearization(backend, params, plan, None, loss)
