"""The solvers' flat view of a :class:`pb.Linearization`: the linear-algebra boundary.

Gauss-Newton and Levenberg-Marquardt factorise matrices and run CG on vectors, so they see the
model

    m(delta) = L + g . delta + 1/2 ||J delta||^2,        g = J^T r + e,

with delta a flat (P,) vector in ``ravel_pytree(params)`` order. For 1/2 ||r||^2 and robust
losses e = 0 and m is 1/2 ||r + J delta||^2 up to a constant. With an ``OutputLoss`` the
whitened residuals r are clipped (see :func:`build`) and e carries the part of the true gradient
they no longer hold.

Everything is in one working dtype, :func:`work_dtype` of the parameters (float32 at least:
LAPACK has no float16 or bfloat16 factorisations), whatever dtype the residual function returns
(float32 parameters with float64 data under x64 give float64 residuals). Built by
``pb.linearize`` inside ``update``, once per step; nothing is cached or stored in a state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from paribus._linearize import Linearization, linearize
from paribus._linearize._whiten import kind, objective
from paribus._linearize.linearization import KernelOps

PyTree = Any

__all__ = ["Model", "build", "objective", "work_dtype"]


class Model(NamedTuple):
    """The Gauss-Newton model at theta, flat, in the working dtype.

    ``jacobian``, ``ntk``, ``jtj_diag`` and ``kernel`` compute on each call (call each once
    per step); ``kernel()`` is the NTK with J^T u and J v from the same factors (in the
    working dtype).

    Attributes:
      value: L(theta) (the loss's own dtype).
      r: (R,) the (whitened) residuals.
      e: (P,) the gradient not carried by r (g = J^T r + e), or None where it is zero.
      grad: (P,) the true gradient g when e is not None, else None (the forms form J^T r).
    """

    value: jax.Array
    r: jax.Array
    e: jax.Array | None
    grad: jax.Array | None
    jvp: Callable[[jax.Array], jax.Array]
    vjp: Callable[[jax.Array], jax.Array]
    jacobian: Callable[[], jax.Array]
    ntk: Callable[[], jax.Array]
    jtj_diag: Callable[[], jax.Array]
    kernel: Callable[[], KernelOps]
    n_params: int
    linearization: Linearization


def work_dtype(dtype) -> jnp.dtype:
    """The dtype the solvers compute in for parameters of ``dtype``: float32 at least."""
    return jnp.promote_types(dtype, jnp.float32)


def _work_kernel(ops: KernelOps, work) -> KernelOps:
    """``ops`` with its matrix and products in the working dtype."""
    return ops._replace(
        matrix=ops.matrix.astype(work),
        vjp_flat=lambda u: ops.vjp_flat(u).astype(work),
        jvp_flat=lambda v: ops.jvp_flat(v).astype(work),
    )


def clip_bound(dtype) -> float:
    """|r_k| above eps^(-1/2) marks a whitening floored by its loss (see :func:`build`)."""
    return float(jnp.finfo(dtype).eps) ** -0.5


def build(residual_fn, params: PyTree, batch: PyTree, loss=None, *, where: str) -> Model:
    """The Gauss-Newton model of the objective at ``params`` (see :func:`pb.linearize`).

    ``params`` are linearised as given; the caller casts them to the working dtype first
    (float16 and bfloat16 parameters are linearised at their float32 values).

    With an ``OutputLoss`` the loss floors the curvatures it divides by (softmax cross-entropy
    on an example wrong with extreme confidence: p_true < eps^2, rw ~ 1/eps). Such an r_k is
    a rounding artefact, not a residual: ||r|| reached 1e16 at the stall of issue 12, where
    J^T r was at cosine 5e-6 to the true gradient and LM, solving with it, took steps the loss
    did not follow (gain ratios 2e-5, loss 972 with ||g|| = 34). Here r is clipped at
    eps^(-1/2), and e = g - J^T r (one more VJP, of the loss's own derivative) puts back what
    the clipped r no longer carries, so the model's linear term is the true gradient. The
    model's curvature there is the loss's: nearly none, so LM's damping alone bounds the step
    along e, as it should.
    """
    del where
    lin = linearize(residual_fn, params, batch, loss=loss)
    work = work_dtype(jax.tree.leaves(params)[0].dtype)
    for leaf in jax.tree.leaves(params):
        work = jnp.promote_types(work, leaf.dtype)

    def jvp(v):
        return lin.jvp_flat(v).astype(work)

    def vjp(u):
        return lin.vjp_flat(u).astype(work)

    r = lin.r.astype(work)
    e = grad = None
    if kind(lin.loss) == "output":
        bound = clip_bound(work)
        r = jnp.clip(r, -bound, bound)
        grad = lin.grad_flat().astype(work)
        e = grad - vjp(r)
    return Model(
        value=lin.value,
        r=r,
        e=e,
        grad=grad,
        jvp=jvp,
        vjp=vjp,
        jacobian=lambda: lin.dense().astype(work),
        ntk=lambda: lin.ntk().astype(work),
        jtj_diag=lambda: lin.jtj_diag_flat().astype(work),
        kernel=lambda: _work_kernel(lin.kernel(), work),
        n_params=lin.n_params,
        linearization=lin,
    )
