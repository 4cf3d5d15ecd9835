"""Curvature: J J^T (the empirical NTK), diag(J^T J), GGN-vector products, per-example
gradient norms. Thin functions on :func:`pb.linearize`: always the numbers of the dense twin.

Two families:

- network level, for ``apply(params, x)`` of one example and examples ``xs``: :func:`ntk`,
  :func:`jtj_diag`;
- residual level, for ``residual_fn(params, batch)`` (what the solvers call):
  :func:`residual_ntk`, :func:`residual_jtj_diag`, :func:`ggn_vector_product`,
  :func:`ggn_operator`, :func:`per_example_grad_norms`. With a loss at the outputs (``loss=``,
  or carried by ``pb.losses.network_outputs(apply, loss)``) every quantity is that of the
  whitened problem J' = S J (S^T S the loss Hessian), so the "NTK" is S J J^T S^T and
  diag(J'^T J') the diagonal of the generalised Gauss-Newton matrix.

For any network the user brings (``pb.nets``, Equinox, Flax NNX, a closure, a CNN, attention)
the linearisation finds the layers in the per-example function's jaxpr and builds these from
each layer's inputs and output cotangents; ``pb.linearize(...).plan`` says what it found.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.flatten_util import ravel_pytree

from paribus._linearize import linearize
from paribus._linearize.linearization import cross_ntk
from paribus.residuals import per_example

PyTree = Any


def _network(apply: Callable) -> Callable:
    """``apply(params, x)`` as a per-example residual function of a batch xs."""
    return per_example(lambda params, x: apply(params, x))


# ----------------------------------------------------------------------------- network level


def ntk(
    apply: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    xs: PyTree,
    xs2: PyTree | None = None,
) -> jax.Array:
    """The empirical neural tangent kernel Theta = J(xs) J(xs2)^T, shape (N*m, N2*m).

    Entry (i*m + j, i2*m + j2) is <d f_j(x_i) / d theta, d f_j2(x2_i2) / d theta>. Each dense
    layer contributes sum_(s,t) (A_is . A2_jt) (D_is . D2_jt) from its inputs A and output
    cotangents D (about 2 N N2 m^2 S flops for an MLP, S the sum of widths; J is never
    formed); convolutions and other layers contribute their per-example gradient rows.

    Example:
      >>> import jax, jax.numpy as jnp, paribus as pb
      >>> init, apply = pb.nets.mlp([2, 8, 1])
      >>> pb.ntk(apply, init(jax.random.key(0)), jnp.ones((3, 2))).shape
      (3, 3)
    """
    fn = _network(apply)
    lin = linearize(fn, params, xs)
    if xs2 is None:
        return lin.ntk()
    return cross_ntk(lin, linearize(fn, params, xs2))


def jtj_diag(apply: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, xs: PyTree) -> PyTree:
    """diag(J^T J) shaped like ``params``: entry k is sum_{i,j} (d f_j(x_i) / d theta_k)^2.

    The Marquardt scaling of LM and a Jacobi preconditioner; for a dense layer at one position
    it is ((A^2)^T sum_j D_j^2) from the layer's factors, without J.
    """
    return linearize(_network(apply), params, xs).jtj_diag()


# ---------------------------------------------------------------------------- residual level


def residual_ntk(
    residual_fn: Callable,
    params: PyTree,
    batch: PyTree,
    *,
    loss: Any = None,
) -> jax.Array:
    """K = J J^T, shape (R, R), for J = dr/dtheta of ``residual_fn(params, batch)``.

    R is the number of residuals in ravel order (for ``(N, m)`` residuals, row ``i*m + j``).
    This is the matrix of the dual (kernel) form of Gauss-Newton / LM:
    ``delta = -J^T (J J^T + lambda I)^(-1) r``. With a ``loss``, K = J' J'^T with J' = S J,
    i.e. K_(i,j) = S_i (J_i J_j^T) S_j^T block by block, R = N m.
    """
    return linearize(residual_fn, params, batch, loss=loss).ntk()


def residual_jtj_diag(
    residual_fn: Callable,
    params: PyTree,
    batch: PyTree,
    *,
    loss: Any = None,
) -> jax.Array:
    """diag(J^T J), shape (P,), in ``ravel_pytree(params)`` order: the squared column norms
    of J = dr/dtheta, i.e. (diag J^T J)_k = sum_r (d r_r / d theta_k)^2. With a ``loss``, the
    diagonal of the GGN J'^T J' = sum_i J_i^T H_i J_i.
    """
    diag = linearize(residual_fn, params, batch, loss=loss).jtj_diag()
    return ravel_pytree(diag)[0]


def ggn_operator(
    residual_fn: Callable,
    params: PyTree,
    batch: PyTree,
    *,
    loss: Any = None,
) -> Callable[[PyTree], PyTree]:
    """v -> G v with G = J^T H J (the generalised Gauss-Newton matrix), v and G v pytrees
    shaped like ``params``. H = I without a loss (G = J^T J), else H_i = S_i^T S_i the loss
    Hessian with respect to the outputs of example i.

    The linearisation (one forward pass) is done once, here; each product is then one
    forward-mode and one reverse-mode pass of the linearised network. Call it inside ``jit``
    and reuse the operator, e.g. in conjugate gradients.
    """
    lin = linearize(residual_fn, params, batch, loss=loss)
    return lambda v: lin.vjp(lin.jvp(v))


def ggn_vector_product(
    residual_fn: Callable,
    params: PyTree,
    batch: PyTree,
    tangent: PyTree,
    *,
    loss: Any = None,
) -> PyTree:
    """G v = J^T H J v for one tangent v shaped like ``params`` (see :func:`ggn_operator`).

    Costs about two gradients; for many products build :func:`ggn_operator` once.

    Example:
      >>> import jax, jax.numpy as jnp, paribus as pb
      >>> init, apply = pb.nets.mlp([2, 4, 1])
      >>> params = init(jax.random.key(0))
      >>> batch = (jnp.ones((3, 2)), jnp.zeros((3, 1)))
      >>> gv = pb.ggn_vector_product(pb.regression_residuals(apply), params, batch, params)
      >>> jax.tree.structure(gv) == jax.tree.structure(params)
      True
    """
    if jax.tree.structure(tangent) != jax.tree.structure(params):
        raise ValueError(
            "ggn_vector_product: the tangent must be shaped like params; got structure "
            f"{jax.tree.structure(tangent)}, expected {jax.tree.structure(params)}."
        )
    return ggn_operator(residual_fn, params, batch, loss=loss)(tangent)


def per_example_grad_norms(
    residual_fn: Callable,
    params: PyTree,
    batch: PyTree,
    *,
    loss: Any = None,
) -> jax.Array:
    """||g_i||, shape (N,): the norm of the gradient of example i's loss, for every example.

    The loss of example i is 1/2 ||r_i||^2 (no loss; r_i the residuals of example i) or
    ``loss.value(z_i, t_i)``; g_i = J_i^T u_i with u_i its gradient with respect to the
    outputs. One forward and one backward pass of the batch give every layer's per-example
    output cotangents delta_i; a dense layer at one position contributes
    ||delta_i||^2 (||a_i||^2 + 1) without forming g_i. The residual function must be per
    example (``pb.per_example``, ``pb.regression_residuals``, or a whole-batch function whose
    rows are shown independent); otherwise per-example gradients are not defined and this
    raises ``ValueError``.
    """
    return linearize(residual_fn, params, batch, loss=loss).per_example_grad_norms()
