"""The solvers' flat view of a :class:`pb.Linearization`: the linear-algebra boundary.

Gauss-Newton and Levenberg-Marquardt factorise matrices and run CG on vectors, so they see the
model m(delta) = 1/2 ||r + J delta||^2 with delta a flat (P,) vector in ``ravel_pytree(params)``
order. Everything here is built by ``pb.linearize`` inside ``update``, once per step; nothing
is cached or stored in a state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from paribus._linearize import Linearization, linearize
from paribus._linearize._whiten import objective
from paribus._linearize.linearization import KernelOps

PyTree = Any

__all__ = ["Model", "build", "objective"]


class Model(NamedTuple):
    """The least-squares model at theta: value L(theta), r, and flat products with J.

    ``jacobian``, ``ntk``, ``jtj_diag`` and ``kernel`` compute on each call (call each once
    per step); ``kernel()`` is the NTK with J^T u and J v from the same factors.
    """

    value: jax.Array
    r: jax.Array
    jvp: Callable[[jax.Array], jax.Array]
    vjp: Callable[[jax.Array], jax.Array]
    jacobian: Callable[[], jax.Array]
    ntk: Callable[[], jax.Array]
    jtj_diag: Callable[[], jax.Array]
    kernel: Callable[[], KernelOps]
    n_params: int
    linearization: Linearization


def build(residual_fn, params: PyTree, batch: PyTree, loss=None, *, where: str) -> Model:
    """The Gauss-Newton model of the objective at ``params`` (see :func:`pb.linearize`)."""
    del where
    lin = linearize(residual_fn, params, batch, loss=loss)
    return Model(
        value=lin.value,
        r=lin.r,
        jvp=lin.jvp_flat,
        vjp=lin.vjp_flat,
        jacobian=lin.dense,
        ntk=lin.ntk,
        jtj_diag=lin.jtj_diag_flat,
        kernel=lin.kernel,
        n_params=lin.n_params,
        linearization=lin,
    )
