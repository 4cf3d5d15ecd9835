"""The matrix-free form: CGLS on the damped least-squares problem, J never formed.

The step minimises the model of :mod:`paribus.solvers._linear`,

    1/2 ||J delta + r||^2 + lam/2 delta^T D delta + e . delta,

by conjugate gradients in the CGLS arrangement (Hestenes & Stiefel 1952; Paige & Saunders 1982
section 7): the least-squares residual s = -(r + J delta) is carried, and the gradient is
recomputed from it as J^T s - lam D delta - e at every step, one JVP and one VJP per step. CG
on the normal equations with the operator v -> J^T (J v) (the same products) instead updates
the gradient by recurrence, whose rounding drifts out of the row space of J: Gauss-Newton
(lam = 0) in float32 with N < P, or with duplicated examples, then took steps 381 and 9e7
times the minimum-norm one (issue 12). Here, from delta = 0, every direction is a combination
of gradients J^T s, so delta stays in the row space of J: the minimum-norm step. The loop also
stops once the gradient is at its rounding level (eps ||J|| ||s||) or a direction has no
curvature the products can resolve: past that point a step length is noise over noise.

Levenberg-Marquardt uses Jacobi preconditioning (columns scaled by (diag(J^T J) + lam D)^-1/2);
Gauss-Newton none (a scaling would change which step has the minimum norm).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from paribus.solvers._linear import Solution, _code, gradient
from paribus.solvers._model import Model


class CGOptions(NamedTuple):
    """Matrix-free solve: iteration cap, relative gradient tolerance, Jacobi preconditioning."""

    max_steps: int = 50
    tol: float = 1e-10
    jacobi: bool = True


class _Carry(NamedTuple):
    k: jax.Array
    y: jax.Array  # delta = c * y
    jy: jax.Array  # J delta, by recurrence of exact products
    s: jax.Array  # -(r + J delta)
    z: jax.Array  # minus the gradient in y
    p: jax.Array
    gamma: jax.Array  # ||z||^2
    top: jax.Array  # largest ||J c p||^2 / ||p||^2 seen: a lower bound on ||J C||^2
    done: jax.Array


def cg(model: Model, lam, d, min_norm: bool, options: CGOptions) -> Solution:
    """CGLS for the (damped) Gauss-Newton step; at most ``options.max_steps`` JVP/VJP pairs,
    stopped when the gradient has fallen by ``options.tol``."""
    r = model.r
    jt_r = model.vjp(r)
    g = gradient(model, jt_r)
    dtype = g.dtype
    damp = jnp.zeros((), dtype) if min_norm else jnp.asarray(lam, dtype)
    dd = jnp.ones_like(g) if d is None else d
    e = None if (min_norm or model.e is None) else model.e
    if options.jacobi and not min_norm:
        diag = model.jtj_diag() + damp * dd
        c = jnp.where(diag > 0, 1 / jnp.sqrt(jnp.where(diag > 0, diag, 1)), 1)
    else:
        c = jnp.ones_like(g)
    eps = jnp.finfo(dtype).eps
    z0 = -c * (jt_r if e is None else g)
    gamma0 = jnp.vdot(z0, z0)
    stop = options.tol**2 * gamma0

    def cond(k: _Carry):
        return (k.k < options.max_steps) & (k.gamma > stop) & ~k.done

    def body(k: _Carry) -> _Carry:
        cp = c * k.p
        q = model.jvp(cp)
        pp = jnp.vdot(k.p, k.p)
        qq = jnp.vdot(q, q)
        top = jnp.maximum(k.top, qq / jnp.where(pp > 0, pp, 1))
        curv = qq + damp * jnp.vdot(cp, dd * cp)
        # No curvature the products can resolve: ||J c p|| is accurate to eps ||J C|| ||p||.
        flat = curv <= (10 * eps) ** 2 * top * pp
        alpha = jnp.where(flat, 0, k.gamma / jnp.where(flat, 1, curv))
        y, jy, s = k.y + alpha * k.p, k.jy + alpha * q, k.s - alpha * q
        grad = model.vjp(s) - damp * dd * (c * y)
        z = c * (grad if e is None else grad - e)
        gamma = jnp.vdot(z, z)
        # The gradient at its rounding level: J^T s is accurate to eps ||J C|| ||s||.
        floor = jnp.sqrt(gamma) <= 10 * eps * jnp.sqrt(top) * jnp.linalg.norm(s)
        p = z + gamma / jnp.where(k.gamma > 0, k.gamma, 1) * k.p
        return _Carry(k.k + 1, y, jy, s, z, p, gamma, top, flat | floor)

    zero = jnp.zeros_like(g)
    init = _Carry(jnp.zeros((), jnp.int32), zero, jnp.zeros_like(r), -r, z0, z0, gamma0,
                  jnp.zeros((), dtype), jnp.zeros((), bool))  # fmt: skip
    out = jax.lax.while_loop(cond, body, init)
    return Solution(c * out.y, out.jy, jnp.linalg.norm(g), _code("none"))
