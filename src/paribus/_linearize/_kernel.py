"""S J of a batch held as factors: the NTK and the products J^T u, J v that reuse them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from paribus._linearize import _factored

if TYPE_CHECKING:
    from paribus._linearize._structured import Structured


class Kernel:
    """S J of a batch held as factors: (x, d) per factored dense layer (with a column of ones
    for a fused bias) and dense per-example rows for the other leaves.

    The dual form of LM needs K = S J J^T S^T and then J^T alpha (and, to refine, J J^T p):
    from the factors these cost a few matrix products and no further pass through the
    network, where ``Linearization.vjp`` would run the network's backward pass again.
    """

    def __init__(self, owner: Structured, factors, rows, index, forward, transpose):
        self.owner, self.factors, self.rows, self.index = owner, factors, rows, index
        self._forward, self._transpose = forward, transpose

    def matrix(self, other: Kernel | None = None) -> jax.Array:
        """K (N m, N' m) against this batch (default) or another's kernel."""
        theirs = self if other is None else other
        n1, m = self.owner.n, self.owner.m
        total = jnp.zeros((n1 * m, theirs.owner.n * m), self.owner.z.dtype)
        for (_, x1, d1), (_, x2, d2) in zip(self.factors, theirs.factors, strict=True):
            total = total + _factored.kernel(x1, d1, x2, d2).astype(total.dtype)
        if self.rows is not None:
            total = total + self.rows @ theirs.rows.T
        return total

    def vjp(self, u: jax.Array) -> list:
        """(S J)^T u as leaves, for u (N, m)."""
        owner = self.owner
        leaves = [jnp.zeros_like(leaf) for leaf in owner.leaves]
        if self.factors:
            grads, bias = [], []
            for use, x, d in self.factors:
                layout = owner.layouts[use.index]
                bcf = _factored.transpose_product(x, d, u.astype(x.dtype))
                c = layout.sizes[1]
                dtype = use.operand_avals[use.slot].dtype
                grads.append(_factored.to_parameter_layout(layout, bcf[:, :c]).astype(dtype))
                b = owner.bias_of.get(use.index)
                if b is not None:
                    shape = b.operand_avals[b.slot].shape
                    bias.append(bcf[0, c].reshape(shape).astype(b.operand_avals[b.slot].dtype))
            leaves = [a + g.astype(a.dtype) for a, g in
                      zip(leaves, self._transpose(grads + bias)[0], strict=True)]  # fmt: skip
        if self.rows is not None:
            flat = self.rows.T @ u.reshape(-1).astype(self.rows.dtype)
            start = 0
            for k, size in self.index:
                part = flat[start : start + size].reshape(np.shape(leaves[k]))
                leaves[k] = leaves[k] + part.astype(leaves[k].dtype)
                start += size
        return leaves

    def jvp(self, tangent_leaves: list) -> jax.Array:
        """S J v (N, m) for v as leaves."""
        owner = self.owner
        out = jnp.zeros((owner.n, owner.m), owner.z.dtype)
        if self.factors:
            tangents = self._forward(list(tangent_leaves))
            n_dot = len(self.factors)
            bias_t = iter(tangents[n_dot:])
            for (use, x, d), t in zip(self.factors, tangents[:n_dot], strict=True):
                layout = owner.layouts[use.index]
                v = _factored.to_canonical(layout, t).astype(x.dtype)
                if use.index in owner.bias_of:
                    row = next(bias_t).reshape(1, 1, -1).astype(x.dtype)
                    v = jnp.concatenate([v, row], axis=1)
                out = out + _factored.forward_product(x, d, v).astype(out.dtype)
        if self.rows is not None:
            flat = jnp.concatenate([jnp.ravel(tangent_leaves[k]) for k, _ in self.index])
            out = out + (self.rows @ flat.astype(self.rows.dtype)).reshape(owner.n, owner.m)
        return out
