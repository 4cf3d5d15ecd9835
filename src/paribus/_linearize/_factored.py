"""The factored form of a dense layer's Jacobian columns: inputs A and output cotangents D.

A ``dot_general`` use y = dot_general(x, W) is, after transposing, per example

    y[b, s, f] = sum_c X[b, c, s] W[b, c, f],

with b the dot's batch dimensions (per-head weights), c the contracted ones, s the positions
of the example operand that W is applied at (tokens, pixels; one for an MLP) and f the free
dimensions of W. With D[j, b, s, f] = d z_j / d y[b, s, f] the cotangent of output j, the
Jacobian row of (example i, output j) restricted to W is

    dz_ij / dW[b, c, f] = sum_s X_i[b, c, s] D_ij[b, s, f],

so two rows meet in the Gram products of the factors, never forming a row:

    <J_(ij), J_(kl)>_W = sum_b sum_(s,t) (X_i[b,:,s] . X_k[b,:,t]) (D_ij[b,s,:] . D_kl[b,t,:]),

about 2 N^2 B S^2 (C + m^2 F) flops against 2 (N m)^2 B C F for contracting the rows (plus
N m B S C F to build them). :func:`costs` compares the two; the caller picks per layer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from paribus._linearize._jaxpr import Use


class DotLayout(NamedTuple):
    """How to bring a dot_general use's example operand and output to (B, C, S) / (B, S, F).

    Attributes:
      x_slot: which operand is the example's (the other is the derived parameter).
      x_perm, y_perm: transpositions of the example operand and of the output.
      sizes: (B, C, S, F).
      w_dims: the derived parameter's dimensions as (batch, contracted, free) groups, to
        return a (B, C, F) array to the parameter's own layout.
    """

    x_slot: int
    x_perm: tuple[int, ...]
    y_perm: tuple[int, ...]
    sizes: tuple[int, int, int, int]
    w_perm: tuple[int, ...]
    w_shape: tuple[int, ...]


def dot_layout(use: Use) -> DotLayout:
    """The :class:`DotLayout` of a ``dot_general`` use (see the module docstring)."""
    (lc, rc), (lb, rb) = use.params["dimension_numbers"]
    p = use.slot
    x = 1 - p
    contract, batch = (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))
    x_shape = tuple(use.operand_avals[x].shape)
    w_shape = tuple(use.operand_avals[p].shape)
    xc, wc, xb, wb = contract[x], contract[p], batch[x], batch[p]
    xf = tuple(d for d in range(len(x_shape)) if d not in xc and d not in xb)
    wf = tuple(d for d in range(len(w_shape)) if d not in wc and d not in wb)
    nb = len(xb)
    if p == 1:  # output: batch, lhs (example) free, rhs (parameter) free
        out_x = tuple(range(nb, nb + len(xf)))
        out_w = tuple(range(nb + len(xf), nb + len(xf) + len(wf)))
    else:
        out_w = tuple(range(nb, nb + len(wf)))
        out_x = tuple(range(nb + len(wf), nb + len(wf) + len(xf)))

    def size(shape, dims):
        return int(np.prod([shape[d] for d in dims], dtype=np.int64))

    sizes = (size(x_shape, xb), size(x_shape, xc), size(x_shape, xf), size(w_shape, wf))
    return DotLayout(
        x_slot=x,
        x_perm=xb + xc + xf,
        y_perm=tuple(range(nb)) + out_x + out_w,
        sizes=sizes,
        w_perm=wb + wc + wf,
        w_shape=w_shape,
    )


def canonical_x(layout: DotLayout, xs: jnp.ndarray) -> jnp.ndarray:
    """Example operands (N, *x_shape) -> (N, B, C, S)."""
    b, c, s, _ = layout.sizes
    perm = (0,) + tuple(d + 1 for d in layout.x_perm)
    return jnp.transpose(xs, perm).reshape(xs.shape[0], b, c, s)


def canonical_d(layout: DotLayout, ds: jnp.ndarray) -> jnp.ndarray:
    """Output cotangents (N, m, *y_shape) -> (N, m, B, S, F)."""
    b, _, s, f = layout.sizes
    perm = (0, 1) + tuple(d + 2 for d in layout.y_perm)
    return jnp.transpose(ds, perm).reshape(ds.shape[0], ds.shape[1], b, s, f)


def to_parameter_layout(layout: DotLayout, bcf: jnp.ndarray) -> jnp.ndarray:
    """A (B, C, F) array (e.g. a diagonal) -> the derived parameter's own shape."""
    grouped = [layout.w_shape[d] for d in layout.w_perm]
    inverse = np.argsort(layout.w_perm)
    return jnp.transpose(bcf.reshape(grouped), tuple(int(i) for i in inverse))


def to_canonical(layout: DotLayout, w: jnp.ndarray) -> jnp.ndarray:
    """The derived parameter (its own shape) -> (B, C, F): the inverse of
    :func:`to_parameter_layout`."""
    b, c, _, f = layout.sizes
    return jnp.transpose(w, layout.w_perm).reshape(b, c, f)


def costs(layout: DotLayout, n: int, m: int) -> tuple[float, float]:
    """(factored, rows) flops of this use's share of the N m x N m kernel."""
    b, c, s, f = layout.sizes
    nm = n * m
    factored = 2.0 * n * n * b * s * s * c + 2.0 * nm * nm * b * s * s * (f + 1)
    rows = 2.0 * nm * b * s * c * f + 2.0 * nm * nm * b * c * f
    return factored, rows


def kernel(x1, d1, x2, d2) -> jnp.ndarray:
    """sum_b sum_(s,t) (X1_i . X2_k)(D1_ij . D2_kl) for canonical factors; (N1 m, N2 m).

    x: (N, B, C, S); d: (N, m, B, S, F).
    """
    n1, m, b, s, _ = d1.shape
    n2 = d2.shape[0]
    if s == 1:
        # One position (an MLP layer): (X1 X2^T) * (D1 D2^T) per batch index, the classic form.
        gx = jnp.einsum("ibc,kbc->bik", x1[..., 0], x2[..., 0])
        if m == 1:
            gd = jnp.einsum("ibf,kbf->bik", d1[:, 0, :, 0], d2[:, 0, :, 0])
            return jnp.sum(gx * gd, axis=0).reshape(n1, n2)
        gd = jnp.einsum("ijbf,klbf->bijkl", d1[:, :, :, 0], d2[:, :, :, 0])
        total = jnp.sum(gx[:, :, None, :, None] * gd, axis=0)
        return total.reshape(n1 * m, n2 * m)
    gx = jnp.einsum("ibcs,kbct->ikbst", x1, x2)
    gd = jnp.einsum("ijbsf,klbtf->ijklbst", d1, d2)
    return jnp.einsum("ikbst,ijklbst->ijkl", gx, gd).reshape(n1 * m, n2 * m)


def transpose_product(x, d, u) -> jnp.ndarray:
    """J^T u restricted to the layer, (B, C, F): sum_(i,j,s) u_ij X_i[b,c,s] D_ij[b,s,f]."""
    if x.shape[-1] == 1:
        return jnp.einsum("ibc,ibf->bcf", x[..., 0], jnp.einsum("ij,ijbf->ibf", u, d[..., 0, :]))
    return jnp.einsum("ibcs,ibsf->bcf", x, jnp.einsum("ij,ijbsf->ibsf", u, d))


def forward_product(x, d, v) -> jnp.ndarray:
    """J v restricted to the layer, (N, m): sum_(b,s,f) D_ij[b,s,f] sum_c X_i[b,c,s] V[b,c,f]."""
    if x.shape[-1] == 1:
        return jnp.einsum("ibf,ijbf->ij", jnp.einsum("ibc,bcf->ibf", x[..., 0], v), d[..., 0, :])
    return jnp.einsum("ibsf,ijbsf->ij", jnp.einsum("ibcs,bcf->ibsf", x, v), d)


def sq_norms(x, delta) -> jnp.ndarray:
    """||g_i||^2 (N,) with g_i = sum_s X_i[b,:,s] (outer) delta_i[b,s,:]; x (N,B,C,S),
    delta (N, B, S, F)."""
    if x.shape[-1] == 1:
        return jnp.sum(jnp.sum(x[..., 0] ** 2, -1) * jnp.sum(delta[:, :, 0] ** 2, -1), -1)
    gx = jnp.einsum("ibcs,ibct->ibst", x, x)
    gd = jnp.einsum("ibsf,ibtf->ibst", delta, delta)
    return jnp.sum(gx * gd, axis=(1, 2, 3))


def diag_one_position(x, d) -> jnp.ndarray:
    """diag(J^T J) (B, C, F) over the rows of one-position factors: x (N,B,C,1), d
    (N,m,B,1,F): sum_i X_i^2 (outer) sum_j D_ij^2."""
    return jnp.einsum("ibc,ibf->bcf", x[..., 0] ** 2, jnp.sum(d[:, :, :, 0] ** 2, axis=1))
