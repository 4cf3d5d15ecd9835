"""The loss at the outputs, as a whitening: every objective becomes 1/2 ||rw + S J delta||^2.

Three kinds of objective share one least-squares model (see ``pb.losses``):

- no loss: L = 1/2 ||z||^2 of the residuals z (N, m); S = I, rw = z;
- an ``OutputLoss`` (softmax cross-entropy, ...): L = sum_i loss.value(z_i, t_i) of the
  network outputs z_i and targets t_i; per example S_i (m, m) with S_i^T S_i the loss Hessian
  and S_i^T rw_i its gradient (the generalised Gauss-Newton model);
- a ``ResidualLoss`` (huber, soft_l1, cauchy, arctan): L = loss.value(z), elementwise robust;
  S = diag(s) with s and rw from ``loss.whiten(z)`` (iteratively reweighted least squares).

:class:`Whitening` carries S as None (identity), an (N, m) diagonal or (N, m, m) blocks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Whitening(NamedTuple):
    """rw (N, m), S (None, (N, m) or (N, m, m)) and the loss value L."""

    rw: jax.Array
    s: jax.Array | None
    value: jax.Array

    def forward(self, v: jax.Array) -> jax.Array:
        """S v for v (N, m): the whitened J v from J v."""
        if self.s is None:
            return v
        if self.s.ndim == 2:
            return self.s * v
        return jnp.einsum("nij,nj->ni", self.s, v)

    def backward(self, u: jax.Array) -> jax.Array:
        """S^T u for u (N, m): the output cotangent whose pullback is J'^T u."""
        if self.s is None:
            return u
        if self.s.ndim == 2:
            return self.s * u
        return jnp.einsum("nij,ni->nj", self.s, u)

    def rows(self) -> jax.Array:
        """(m, N, m): cotangent k holds row k of S_i for every example i, so that its pullback
        to any intermediate y is d (S z)_k / dy, the whitened signal of output k."""
        n, m = self.rw.shape
        if self.s is None:
            eye = jnp.eye(m, dtype=self.rw.dtype)
            return jnp.broadcast_to(eye[:, None, :], (m, n, m))
        if self.s.ndim == 2:
            eye = jnp.eye(m, dtype=self.rw.dtype)
            return eye[:, None, :] * self.s.T[:, :, None]
        return jnp.transpose(self.s, (1, 0, 2))

    def blocks(self, jac: jax.Array) -> jax.Array:
        """S_i J_i for per-example Jacobian blocks jac (N, m, P)."""
        if self.s is None:
            return jac
        if self.s.ndim == 2:
            return self.s[:, :, None] * jac
        return jnp.einsum("nij,njp->nip", self.s, jac)


def kind(loss: Any) -> str:
    """ "none", "output" (an OutputLoss: value(z, t) per example) or "residual" (elementwise)."""
    if loss is None:
        return "none"
    from paribus import losses

    if isinstance(loss, losses.OutputLoss):
        return "output"
    residual_type = getattr(losses, "ResidualLoss", None)
    if residual_type is not None and isinstance(loss, residual_type):
        return "residual"
    raise TypeError(
        "loss must be None (1/2 ||r||^2), an OutputLoss such as "
        "pb.losses.softmax_cross_entropy(), or a robust residual loss such as "
        f"pb.losses.huber(scale); got {loss!r}."
    )


def whiten(loss: Any, z: jax.Array, targets: Any) -> Whitening:
    """The :class:`Whitening` of outputs z (N, m) (and their targets, for an OutputLoss)."""
    k = kind(loss)
    if k == "none":
        return Whitening(z, None, 0.5 * jnp.vdot(z, z))
    if k == "residual":
        rw, s = loss.whiten(z)
        return Whitening(rw.astype(z.dtype), s.astype(z.dtype), loss.value(z))
    n, m = z.shape
    rw, s = jax.vmap(loss.whiten)(z, targets)
    if rw.shape != (n, m) or s.shape != (n, m, m):
        raise ValueError(
            f"loss {loss.name!r}: whiten(z, t) must give rw ({m},) and S ({m}, {m}) per "
            f"example; got {rw.shape[1:]} and {s.shape[1:]}."
        )
    value = jnp.sum(jax.vmap(loss.value)(z, targets))
    return Whitening(rw.astype(z.dtype), s.astype(z.dtype), value)


def objective(residual_fn, params: Any, batch: Any, loss: Any = None) -> jax.Array:
    """L(theta) without linearising: 1/2 ||r||^2, sum_i loss.value(z_i, t_i) for an
    ``OutputLoss`` (``residual_fn`` returns ``(z (N, m), t)``), or ``loss.value(r)``."""
    out = residual_fn(params, batch)
    k = kind(loss)
    if k == "output":
        z, t = out
        return jnp.sum(jax.vmap(loss.value)(z, jax.lax.stop_gradient(t)))
    leaves = jax.tree.leaves(out)
    if k == "residual":
        return sum(loss.value(leaf) for leaf in leaves)
    return 0.5 * sum(jnp.vdot(leaf, leaf) for leaf in leaves)


def decrease(loss: Any, z0: jax.Array, z1: jax.Array, targets: Any, value0: jax.Array):
    """(L(z0) - L(z1), L(z1)): the actual decrease of a trial, without cancellation.

    Near a minimum the decrease is far below the rounding of L itself, and the difference of
    two nearly equal values is noise (LM then rejects good steps and stalls a few digits short,
    or a float32 fit stops early). For 1/2 ||z||^2 the decrease is computed exactly from the
    change d = z1 - z0 as -d . (z0 + d / 2). For other losses it is the plain difference while
    that stands well above the rounding of L, and d . grad L((z0 + z1) / 2) (the midpoint rule,
    exact to O(|d|^3)) once it does not. ``z`` are the outputs as the objective sees them: the
    residuals (R,), or (N, m) outputs for an ``OutputLoss`` with its ``targets``.
    """
    k = kind(loss)
    d = z1 - z0
    if k == "none":
        return -jnp.vdot(d, z0 + 0.5 * d), 0.5 * jnp.vdot(z1, z1)
    if k == "residual":
        value = loss.value
    else:

        def value(z):
            return jnp.sum(jax.vmap(loss.value)(z, targets))

    value1 = value(z1)
    direct = value0 - value1
    midpoint = -jnp.vdot(d, jax.grad(value)(z0 + 0.5 * d))
    eps = jnp.finfo(jnp.result_type(value0)).eps
    noise = 1e3 * eps * jnp.abs(value0)
    return jnp.where(jnp.abs(direct) <= noise, midpoint, direct), value1
