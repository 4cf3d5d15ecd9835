"""Curvature: products with J, J^T, J J^T (the empirical NTK) and J^T J.

Generic versions work for any function; structured versions for ``pb.nets`` networks give the
same numbers without forming J (see :mod:`paribus.structured`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from paribus.jacobian import jacobian

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
