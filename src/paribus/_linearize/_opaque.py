"""The whole-batch backend: a residual function whose rows may depend on other examples.

Everything comes from one ``jax.linearize`` of the batch function: r, J v, J^T u. Dense
blocks (the NTK, diag(J^T J), J itself) are built from those products, in chunks of rows (R
VJPs) or columns (P JVPs), whichever are fewer; for the small least-squares problems this
path is meant for (curve fits, the MGH problems) that is what forward mode costs anyway.
Per-example quantities are not defined when rows mix examples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from paribus._linearize._whiten import Whitening, kind, whiten

PyTree = Any


class Opaque:
    """Products with J of ``residual_fn(params, batch)`` over the whole batch, in (R', m')
    layout: (R, 1) for residuals, (N, m) for an ``OutputLoss``'s outputs."""

    def __init__(self, residual_fn: Callable, params: PyTree, batch: PyTree, loss, *, where: str):
        self.leaves, self.treedef = jax.tree.flatten(params)
        output_loss = kind(loss) == "output"

        def z_of(leaves):
            out = residual_fn(jax.tree.unflatten(self.treedef, leaves), batch)
            if output_loss:
                return out[0]
            return ravel_pytree(out)[0][:, None]

        targets = None
        if output_loss:
            targets = jax.lax.stop_gradient(residual_fn(params, batch)[1])
        z, self._lin = jax.linearize(z_of, self.leaves)
        self.z = z
        self._transpose = jax.linear_transpose(self._lin, self.leaves)
        self.targets = targets
        self.whitening: Whitening = whiten(loss, z, targets)
        self.n, self.m = z.shape
        self.where = where

    def jvp(self, tangent_leaves: list) -> jax.Array:
        return self.whitening.forward(self._lin(list(tangent_leaves)))

    def vjp(self, u: jax.Array) -> list:
        return self.vjp_outputs(self.whitening.backward(u))

    def vjp_outputs(self, c: jax.Array) -> list:
        return self._transpose(c.astype(self.z.dtype))[0]

    def dense(self, chunk_size: int | None) -> jax.Array:
        """S J (R', m', P) from R' m' VJPs or P JVPs, ``chunk_size`` at a time."""
        sizes = [int(np.size(leaf)) for leaf in self.leaves]
        n_params, n_rows = sum(sizes), self.n * self.m
        dtype = self.z.dtype
        if n_params <= n_rows:

            def column(k):
                e = (jnp.arange(n_params) == k).astype(dtype)  # a compare, not a scatter
                parts = jnp.split(e, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [e]
                tangent = [p.reshape(np.shape(leaf)).astype(leaf.dtype)
                           for p, leaf in zip(parts, self.leaves, strict=True)]  # fmt: skip
                return self.jvp(tangent)

            cols = _map(column, jnp.arange(n_params), chunk_size)  # (P, R', m')
            return jnp.moveaxis(cols, 0, -1)

        def row(q):
            e = (jnp.arange(n_rows) == q).astype(dtype).reshape(self.n, self.m)
            return jnp.concatenate([jnp.ravel(g) for g in self.vjp(e)])

        rows = _map(row, jnp.arange(n_rows), chunk_size)  # (R' m', P)
        return rows.reshape(self.n, self.m, n_params)

    def ntk(self, chunk_size: int | None) -> jax.Array:
        jac = self.dense(chunk_size).reshape(self.n * self.m, -1)
        return jac @ jac.T

    def jtj_diag(self, chunk_size: int | None) -> list:
        diag = jnp.sum(jnp.square(self.dense(chunk_size)), axis=(0, 1))
        parts = np.cumsum([int(np.size(leaf)) for leaf in self.leaves])[:-1]
        pieces = jnp.split(diag, parts) if len(self.leaves) > 1 else [diag]
        return [p.reshape(np.shape(leaf)) for p, leaf in zip(pieces, self.leaves, strict=True)]


def _map(f, xs, chunk_size):
    if chunk_size is None:
        return jax.vmap(f)(xs)
    return jax.lax.map(f, xs, batch_size=chunk_size)
