"""The objective and its Gauss-Newton model at the current parameters.

Squared loss (``loss=None``): ``residual_fn(params, batch) -> r`` and L = 1/2 ||r||^2.

Generalised Gauss-Newton (``loss=`` an ``OutputLoss``): ``residual_fn(params, batch)`` returns
``(z, t)``, outputs z (N, m) and targets t, and L = sum_i loss.value(z_i, t_i). With
``loss.whiten(z_i, t_i) = (rw_i, S_i)``, H_i = S_i^T S_i and S_i^T rw_i = grad_z value, the model
uses the whitened residuals rw and J' = S J (S block-diagonal over examples): its gradient
J'^T rw is the true gradient and J'^T J' is the GGN. Both cases reduce to one least-squares model

    m(delta) = 1/2 ||r + J delta||^2,      r (R,), J (R, P),

with R = N*m for a loss. Everything here runs at trace time inside ``update``; the
:class:`Model` is a bundle of arrays and closures, never stored in a state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from paribus import curvature as _curvature
from paribus import residuals as _residuals
from paribus import structured as _structured
from paribus.curvature import residual_jtj_diag as _jtj_diag
from paribus.curvature import residual_ntk as _ntk

PyTree = Any


class Model(NamedTuple):
    """The least-squares model at theta (flat): value L(theta), r, and products with J."""

    value: jax.Array
    r: jax.Array
    jvp: Callable[[jax.Array], jax.Array]
    vjp: Callable[[jax.Array], jax.Array]
    jacobian: Callable[[], jax.Array]
    ntk: Callable[[], jax.Array]
    jtj_diag: Callable[[], jax.Array]
    n_params: int


def _memo(fn: Callable[[], jax.Array]) -> Callable[[], jax.Array]:
    return functools.cache(fn)


def _dense(jvp, vjp, flat: jax.Array, n_res: int) -> jax.Array:
    """J (R, P) by the cheaper of P jvps and R vjps."""
    if flat.size <= n_res:
        return jax.vmap(jvp, out_axes=1)(jnp.eye(flat.size, dtype=flat.dtype))
    return jax.vmap(vjp)(jnp.eye(n_res, dtype=flat.dtype))


def _outputs(residual_fn, batch, loss, unravel, *, where: str):
    """theta -> (z (N, m) or r (R,), targets or None), checking what residual_fn returns."""

    def call(theta):
        out = residual_fn(unravel(theta), batch)
        if loss is None:
            return ravel_pytree(out)[0], None
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise TypeError(
                f"{where}: with loss={loss.name!r}, residual_fn(params, batch) must return a "
                f"pair (outputs (N, m), targets); got {jax.tree.structure(out)}."
            )
        z, t = out
        if jnp.ndim(z) != 2 or not jnp.issubdtype(jnp.result_type(z), jnp.floating):
            raise TypeError(
                f"{where}: with loss={loss.name!r}, outputs must be a float (N, m) array; got "
                f"{jnp.result_type(z)}{jnp.shape(z)}."
            )
        return z, jax.lax.stop_gradient(t)

    return call


def _check(residual_fn, params, batch, *, where: str) -> None:
    _residuals.check_residuals(residual_fn, params, batch, where=where)


def n_residuals(residual_fn, params: PyTree, batch: PyTree, loss=None) -> int:
    """R, the length of r (N m with a loss), from shapes alone (``jax.eval_shape``).

    A malformed output gives 0 here; :func:`build` then raises the error that explains it.
    """
    out = jax.eval_shape(residual_fn, params, batch)
    if loss is not None:
        if not (isinstance(out, tuple | list) and len(out) == 2):
            return 0
        out = out[0]
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(out))


def objective(residual_fn, params: PyTree, batch: PyTree, loss=None) -> jax.Array:
    """L(theta): 1/2 ||r||^2, or sum_i loss.value(z_i, t_i) with a loss."""
    flat, unravel = ravel_pytree(params)
    out, t = _outputs(residual_fn, batch, loss, unravel, where="objective")(flat)
    if loss is None:
        return 0.5 * jnp.vdot(out, out)
    return jnp.sum(jax.vmap(loss.value)(out, t))


def build(
    residual_fn, params: PyTree, batch: PyTree, loss=None, *, where: str, factored: bool = False
) -> Model:
    """The Gauss-Newton model of L at ``params`` (see the module docstring).

    ``factored=True`` (the dual form asks for it): for a ``pb.nets`` MLP behind
    ``pb.regression_residuals`` / ``pb.losses.network_outputs``, r and the products with J come
    from the same per-layer factors as the NTK (:func:`build_from_factors`): one forward and
    one signal pass per step instead of a linearisation beside them. Other residual functions
    ignore it.
    """
    if factored and _curvature._structured_apply(residual_fn) is not None:
        return build_from_factors(residual_fn, params, batch, loss, where=where)
    if loss is None:
        _check(residual_fn, params, batch, where=where)
    flat, unravel = ravel_pytree(params)
    call = _outputs(residual_fn, batch, loss, unravel, where=where)
    z, z_jvp = jax.linearize(lambda th: call(th)[0], flat)
    z_vjp = jax.linear_transpose(z_jvp, flat)
    if loss is None:
        r, jvp = z, z_jvp
        vjp = lambda u: z_vjp(u)[0]  # noqa: E731
        value = 0.5 * jnp.vdot(r, r)
    else:
        r, jvp, vjp, value = _whitened(loss, z, call(flat)[1], z_jvp, z_vjp)
    dense = _memo(lambda: _dense(jvp, vjp, flat, r.shape[0]))
    # Structured (never forms J) for pb.nets residuals, dense otherwise.
    ntk = _memo(lambda: _ntk(residual_fn, params, batch, loss=loss).astype(r.dtype))
    diag = _memo(lambda: _jtj_diag(residual_fn, params, batch, loss=loss).astype(r.dtype))
    if loss is None and isinstance(residual_fn, _residuals.PerExample):
        dense = _memo(lambda: _residuals.residual_jacobian(residual_fn, params, batch))
    return Model(value, r, jvp, vjp, dense, ntk, diag, flat.size)


def build_from_factors(residual_fn, params: PyTree, batch: PyTree, loss=None, *, where: str):
    """:func:`build` for an MLP's residuals, everything from its per-layer factors.

    With A_l the layer inputs and D_l the signals d outputs / d pre-activations (whitened by
    S with a loss) of ``paribus.structured``: r = outputs - ys (or the whitened residuals of the
    loss), J v = sum_l D_l (A_l W'_l + b'_l), J^T u = (A_l^T Delta_l, sum_i Delta_l) with
    Delta_l = u . D_l, K = sum_l (A_l A_l^T + 1) * (D_l D_l^T). The slow twin is :func:`build`
    without ``factored``; ``tests/test_solvers.py`` compares them.
    """
    if loss is None:
        _check(residual_fn, params, batch, where=where)
    flat, unravel = ravel_pytree(params)
    f = _curvature._factors(residual_fn, params, batch, loss)
    n, m = f.outputs.shape
    if loss is None:
        ys = batch[1]
        r = jax.vmap(lambda z, y: z - y)(f.outputs, ys).reshape(-1)
        value = 0.5 * jnp.vdot(r, r)
    else:
        t = _curvature._targets(residual_fn, params, batch, loss)
        rw, _ = _curvature._whitening(loss, f.outputs, t)
        r = rw.reshape(-1).astype(f.outputs.dtype)
        value = jnp.sum(jax.vmap(loss.value)(f.outputs, t))
    r = r.astype(flat.dtype)

    def jvp(v):
        return _structured.jvp(f, unravel(v)).reshape(-1)

    def vjp(u):
        return ravel_pytree(_structured.vjp(f, u.reshape(n, m).astype(f.outputs.dtype)))[0]

    ntk = _memo(lambda: _structured.ntk(f).astype(r.dtype))
    diag = _memo(lambda: ravel_pytree(_structured.jtj_diag(f))[0].astype(r.dtype))
    dense = _memo(lambda: _dense(jvp, vjp, flat, r.shape[0]))
    return Model(value, r, jvp, vjp, dense, ntk, diag, flat.size)


def _whitened(loss, z, t, z_jvp, z_vjp):
    """rw (N*m,), u -> S J u, u -> J^T S^T u and L, from outputs z (N, m)."""
    n, m = z.shape
    rw, s = jax.vmap(loss.whiten)(z, t)
    if rw.shape != (n, m) or s.shape != (n, m, m):
        raise ValueError(
            f"loss {loss.name!r}: whiten(z, t) must give rw ({m},) and S ({m}, {m}) per "
            f"example; got {rw.shape[1:]} and {s.shape[1:]}."
        )
    value = jnp.sum(jax.vmap(loss.value)(z, t))

    def jvp(v):
        return jnp.einsum("nij,nj->ni", s, z_jvp(v).reshape(n, m)).reshape(-1)

    def vjp(u):
        return z_vjp(jnp.einsum("nij,ni->nj", s, u.reshape(n, m)).reshape(z.shape))[0]

    return rw.reshape(-1).astype(z.dtype), jvp, vjp, value
