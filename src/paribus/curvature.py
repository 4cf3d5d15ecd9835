"""Curvature: products with J, J^T, J J^T (the empirical NTK) and J^T J.

Generic versions work for any function; structured versions for ``pb.nets`` networks give the
same numbers without forming J (see :mod:`paribus.structured`).

Residual-level quantities (``residual_ntk``, ``residual_jtj_diag``) take a residual function
``residual_fn(params, batch) -> r`` (array or pytree, R numbers in ravel order) and are what the
solvers call; network-level quantities (``ntk``, ``jtj_diag``) take ``apply(params, x)`` of one
example and examples ``xs``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from paribus.jacobian import jacobian
from paribus.residuals import residual_jacobian

PyTree = Any


def ntk(
    apply: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    xs: PyTree,
    xs2: PyTree | None = None,
) -> jax.Array:
    """The empirical neural tangent kernel Theta = J(xs) J(xs2)^T, shape (N*m, N2*m).

    Entry (i*m + j, i2*m + j2) is <d f_j(x_i) / d theta, d f_j2(x2_i2) / d theta>.
    """
    j1 = jacobian(apply, params, xs).matrix
    j2 = j1 if xs2 is None else jacobian(apply, params, xs2).matrix
    return j1 @ j2.T


def residual_ntk(residual_fn: Callable, params: PyTree, batch: PyTree) -> jax.Array:
    """K = J J^T, shape (R, R), for J = dr/dtheta of ``residual_fn(params, batch)``.

    R is the number of residuals in ravel order (for ``(N, m)`` residuals, row ``i*m + j``).
    This is the matrix of the dual (kernel) form of Gauss-Newton / LM:
    ``delta = -J^T (J J^T + lambda I)^(-1) r``.
    """
    jac = residual_jacobian(residual_fn, params, batch)
    return jac @ jac.T


def residual_jtj_diag(residual_fn: Callable, params: PyTree, batch: PyTree) -> jax.Array:
    """diag(J^T J), shape (P,), in ``ravel_pytree(params)`` order: the squared column norms
    of J = dr/dtheta, i.e. (diag J^T J)_k = sum_r (d r_r / d theta_k)^2.

    Marquardt's scaling D = diag(J^T J) and Jacobi preconditioners use it.
    """
    jac = residual_jacobian(residual_fn, params, batch)
    return jnp.sum(jnp.square(jac), axis=0)
