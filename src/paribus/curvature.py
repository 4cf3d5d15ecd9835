"""Curvature: J J^T (the empirical NTK), diag(J^T J), GGN-vector products, per-example
gradient norms.

Two families, the same numbers:

- network level, for ``apply(params, x)`` of one example and examples ``xs``: :func:`ntk`,
  :func:`jtj_diag`;
- residual level, for ``residual_fn(params, batch)`` (what the solvers call):
  :func:`residual_ntk`, :func:`residual_jtj_diag`, :func:`ggn_vector_product`,
  :func:`ggn_operator`, :func:`per_example_grad_norms`. With ``loss=None`` the residuals are r
  (R numbers in ravel order) and the loss is 1/2 ||r||^2; with ``loss=`` an
  :class:`~paribus.losses.OutputLoss`, ``residual_fn`` returns ``(outputs (N, m), targets)`` and
  every quantity is that of the whitened problem J' = S J (S block-diagonal, H = S^T S the loss
  Hessian), so the "NTK" is S J J^T S^T and diag(J'^T J') is the diagonal of the GGN.

For a ``pb.nets`` MLP (``apply``), or a ``PerExample`` residual function with ``.apply`` set to
one (``pb.regression_residuals(apply)``, batch ``(xs, ys)``; or
``pb.losses.network_outputs(apply)`` with a loss), every quantity comes from the per-layer
factors of :mod:`paribus.structured` and J is never formed. Any other function takes the generic
path (``vmap`` / ``jvp`` / ``vjp`` / a dense J).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from paribus import _tree, structured
from paribus._jacobian import jacobian
from paribus.losses import OutputLoss
from paribus.residuals import PerExample, residual_jacobian

PyTree = Any


def _structured_apply(residual_fn: Callable) -> Any:
    """The MLP behind ``residual_fn`` when the structured path applies, else None."""
    if isinstance(residual_fn, PerExample) and structured.supports(residual_fn.apply):
        return residual_fn.apply
    return None


# ----------------------------------------------------------------------------- network level


def ntk(
    apply: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    xs: PyTree,
    xs2: PyTree | None = None,
) -> jax.Array:
    """The empirical neural tangent kernel Theta = J(xs) J(xs2)^T, shape (N*m, N2*m).

    Entry (i*m + j, i2*m + j2) is <d f_j(x_i) / d theta, d f_j2(x2_i2) / d theta>. For a
    ``pb.nets`` MLP it is sum_l (A_l A2_l^T + 1) * (D_l D2_l^T) from the layer inputs A and
    backprop signals D (about 2 N N2 m^2 S flops, S the sum of widths; J is never formed);
    otherwise J(xs) and J(xs2) are formed and multiplied.

    Example:
      >>> import jax, jax.numpy as jnp, paribus as pb
      >>> init, apply = pb.nets.mlp([2, 8, 1])
      >>> pb.ntk(apply, init(jax.random.key(0)), jnp.ones((3, 2))).shape
      (3, 3)
    """
    if structured.supports(apply):
        f1 = structured.batch_factors(apply, params, xs)
        f2 = None if xs2 is None else structured.batch_factors(apply, params, xs2)
        return structured.ntk(f1, f2)
    j1 = jacobian(apply, params, xs).matrix
    j2 = j1 if xs2 is None else jacobian(apply, params, xs2).matrix
    return j1 @ j2.T


def jtj_diag(apply: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, xs: PyTree) -> PyTree:
    """diag(J^T J) shaped like ``params``: entry k is sum_{i,j} (d f_j(x_i) / d theta_k)^2.

    The Marquardt scaling of LM and a Jacobi preconditioner; for a ``pb.nets`` MLP it is
    ((A_l^2)^T sum_j D_l^2, sum_{i,j} D_l^2) per layer, without J.
    """
    if structured.supports(apply):
        return structured.jtj_diag(structured.batch_factors(apply, params, xs))
    diag = jnp.sum(jnp.square(jacobian(apply, params, xs).matrix), axis=0)
    return ravel_pytree(params)[1](diag)


# ---------------------------------------------------------------------------- residual level


def _targets(residual_fn: Callable, params: PyTree, batch: PyTree, loss: OutputLoss) -> Any:
    out = residual_fn(params, batch)
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise TypeError(
            f"with loss={loss.name!r}, residual_fn(params, batch) must return a pair "
            f"(outputs (N, m), targets); got {jax.tree.structure(out)}."
        )
    return jax.lax.stop_gradient(out[1])


def _whitening(loss: OutputLoss, outputs: jax.Array, targets: Any) -> tuple:
    if jnp.ndim(outputs) != 2:
        raise TypeError(
            f"with loss={loss.name!r}, outputs must be (N, m); got shape {jnp.shape(outputs)}."
        )
    return jax.vmap(loss.whiten)(outputs, targets)


def _factors(residual_fn, params, batch, loss) -> structured.Factors:
    """The factors of J (loss None) or of J' = S J (a loss: each D_l is whitened by S)."""
    apply = _structured_apply(residual_fn)
    f = structured.batch_factors(apply, params, residual_fn.inputs(batch))
    if loss is None:
        return f
    _, s = _whitening(loss, f.outputs, _targets(residual_fn, params, batch, loss))
    signals = [jnp.einsum("nij,njb->nib", s, d) for d in f.signals]
    return f._replace(signals=signals)


def _dense_jacobian(residual_fn, params, batch, loss) -> jax.Array:
    """J (R, P), or J' = S J (N m, P) with a loss: the generic, obvious path."""
    if loss is None:
        return residual_jacobian(residual_fn, params, batch)
    flat, unravel = ravel_pytree(params)
    outputs = residual_fn(params, batch)[0]
    n, m = jnp.shape(outputs)
    jac = jax.jacrev(lambda th: residual_fn(unravel(th), batch)[0])(flat).reshape(n, m, -1)
    _, s = _whitening(loss, outputs, _targets(residual_fn, params, batch, loss))
    return jnp.einsum("nij,njp->nip", s, jac).reshape(n * m, -1)


def residual_ntk(
    residual_fn: Callable,
    params: PyTree,
    batch: PyTree,
    *,
    loss: OutputLoss | None = None,
) -> jax.Array:
    """K = J J^T, shape (R, R), for J = dr/dtheta of ``residual_fn(params, batch)``.

    R is the number of residuals in ravel order (for ``(N, m)`` residuals, row ``i*m + j``).
    This is the matrix of the dual (kernel) form of Gauss-Newton / LM:
    ``delta = -J^T (J J^T + lambda I)^(-1) r``. With a ``loss``, K = J' J'^T with J' = S J, i.e.
    K_(i,j) = S_i (J_i J_j^T) S_j^T block by block, R = N m.

    Structured (no J) for ``PerExample`` residuals with a ``pb.nets`` MLP as ``.apply``.
    """
    if _structured_apply(residual_fn) is not None:
        return structured.ntk(_factors(residual_fn, params, batch, loss))
    jac = _dense_jacobian(residual_fn, params, batch, loss)
    return jac @ jac.T


def residual_jtj_diag(
    residual_fn: Callable,
    params: PyTree,
    batch: PyTree,
    *,
    loss: OutputLoss | None = None,
) -> jax.Array:
    """diag(J^T J), shape (P,), in ``ravel_pytree(params)`` order: the squared column norms
    of J = dr/dtheta, i.e. (diag J^T J)_k = sum_r (d r_r / d theta_k)^2. With a ``loss``, the
    diagonal of the GGN J'^T J' = sum_i J_i^T H_i J_i.

    Marquardt's scaling D = diag(J^T J) and Jacobi preconditioners use it.
    """
    if _structured_apply(residual_fn) is not None:
        diag = structured.jtj_diag(_factors(residual_fn, params, batch, loss))
        return ravel_pytree(diag)[0]
    return jnp.sum(jnp.square(_dense_jacobian(residual_fn, params, batch, loss)), axis=0)


def ggn_operator(
    residual_fn: Callable,
    params: PyTree,
    batch: PyTree,
    *,
    loss: OutputLoss | None = None,
) -> Callable[[PyTree], PyTree]:
    """v -> G v with G = J^T H J (the generalised Gauss-Newton matrix), v and G v pytrees
    shaped like ``params``. H = I for ``loss=None`` (G = J^T J), else H_i = S_i^T S_i the loss
    Hessian with respect to the outputs of example i.

    The work that does not depend on v is done once, here: the linearisation of the network
    (generic path: ``jax.linearize``, whose transpose gives J^T) or, for a one-output MLP, its
    factors A and D (then each product is two matrix passes over the batch). Call it inside
    ``jit`` and reuse the operator, e.g. in conjugate gradients.
    """
    apply = _structured_apply(residual_fn)
    if apply is not None and apply.sizes[-1] == 1:
        # One output: the signals D cost one backward pass, after which J v and J^T u are one
        # matrix product per layer each. With m outputs D costs m backward passes and the
        # generic linearisation below is cheaper.
        f = _factors(residual_fn, params, batch, loss)
        return lambda v: structured.vjp(f, structured.jvp(f, v))
    if loss is None:
        r, jvp_fn = jax.linearize(lambda p: residual_fn(p, batch), params)
        transpose = jax.linear_transpose(jvp_fn, params)
        return lambda v: transpose(jvp_fn(v))[0]
    targets = _targets(residual_fn, params, batch, loss)
    outputs, jvp_fn = jax.linearize(lambda p: residual_fn(p, batch)[0], params)
    transpose = jax.linear_transpose(jvp_fn, params)
    _, s = _whitening(loss, outputs, targets)
    hess = jnp.einsum("nki,nkj->nij", s, s)
    return lambda v: transpose(jnp.einsum("nij,nj->ni", hess, jvp_fn(v)))[0]


def ggn_vector_product(
    residual_fn: Callable,
    params: PyTree,
    batch: PyTree,
    tangent: PyTree,
    *,
    loss: OutputLoss | None = None,
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


def _one_example(batch: PyTree, i: Any) -> PyTree:
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1), batch)


def per_example_grad_norms(
    residual_fn: Callable,
    params: PyTree,
    batch: PyTree,
    *,
    loss: OutputLoss | None = None,
) -> jax.Array:
    """||g_i||, shape (N,): the norm of the gradient of example i's loss, for every example.

    The loss of example i is 1/2 ||r_i||^2 (``loss=None``; r_i the residuals of example i) or
    ``loss.value(z_i, t_i)``; g_i = J_i^T u_i with u_i its gradient with respect to the outputs.
    For a ``pb.nets`` MLP behind a ``PerExample`` residual function this is one forward and one
    backward pass of the batch keeping the per-example signals delta_il (N, n_l):
    ||g_i||^2 = sum_l ||delta_il||^2 (||a_il||^2 + 1), never forming g_i. Otherwise each
    example's gradient is computed by ``vmap`` over examples (``residual_fn`` called on
    one-example batches, which assumes its rows are independent) and its norm taken.
    """
    apply = _structured_apply(residual_fn)
    if apply is not None:
        xs = residual_fn.inputs(batch)
        if loss is None:
            ys = batch[1]
            _, inputs, deltas = structured.output_deltas(
                apply, params, xs, lambda z: z - ys.reshape(z.shape)
            )
        else:
            targets = _targets(residual_fn, params, batch, loss)
            grad_z = jax.vmap(jax.grad(loss.value))
            _, inputs, deltas = structured.output_deltas(
                apply, params, xs, lambda z: grad_z(z, targets)
            )
        return jnp.sqrt(structured.per_example_sq_norms_from(inputs, deltas))
    n = _tree.leading_size(batch, where="per_example_grad_norms")

    def example_loss(p, i):
        out = residual_fn(p, _one_example(batch, i))
        if loss is None:
            return 0.5 * sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(out))
        z, t = out
        return loss.value(z[0], jax.tree.map(lambda a: a[0], jax.lax.stop_gradient(t)))

    grads = jax.vmap(jax.grad(example_loss), (None, 0))(params, jnp.arange(n))
    sq = sum(jnp.sum(jnp.square(g.reshape(n, -1)), axis=1) for g in jax.tree.leaves(grads))
    return jnp.sqrt(sq)
