"""The dual (kernel) form: one R x R factorisation and products with J, for R < P.

With y = D^(1/2) delta and J_s = J D^(-1/2) (J itself when D = I), the push-through identity
(J_s^T J_s + lam I)^-1 J_s^T = J_s^T (J_s J_s^T + lam I)^-1 gives the LM step of
:mod:`paribus.solvers._linear` as

    y = -J_s^T alpha - y_e,   (K + lam I) alpha = r - J_s y_e,   K = J_s J_s^T,
    y_e = D^(-1/2) e / lam,

where the e terms (the gradient the residuals do not carry, see ``_model``) come from
(J_s^T J_s + lam I)^-1 = (I - J_s^T (K + lam I)^-1 J_s) / lam on D^(-1/2) e: one more JVP. With
D = I the kernel is the NTK (structured for layered networks, never forming J); with a
Marquardt D it is formed from the dense J. Gauss-Newton (lam = 0): alpha = K^+ r.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy as jsp

from paribus.solvers._linear import (
    SWITCH,
    Solution,
    _code,
    _eye_like,
    cholesky,
    factored,
    pinv_solve,
    rounding_floor,
)
from paribus.solvers._model import Model


class DualOptions(NamedTuple):
    """Refinement of the float-limited dual solve (see :func:`_damped`): at most ``max_steps``
    preconditioned CG steps, stopped at relative residual ``tol`` (None: eps^(1/4), 0.018 in
    float32 and 1.2e-4 in float64: an inexact LM step, whose predicted decrease stays exact),
    taken only when lam is below ``switch`` times the kernel's rounding floor."""

    max_steps: int = 10
    tol: float | None = None
    switch: float = SWITCH


DEFAULT_DUAL = DualOptions()


def dual(
    model: Model,
    lam,
    d,
    min_norm: bool,
    options: DualOptions = DEFAULT_DUAL,
    rcond: float | None = None,
) -> Solution:
    """The dual step: one R x R Cholesky (or eigendecomposition for Gauss-Newton), one J^T.

    Cost: the kernel (structured: about N^2 m^2 times the layer widths), R^3 / 3, one VJP; the
    refinement adds one VJP and one JVP per step, only when it runs.
    """
    r = model.r
    if d is None:
        # K, J^T u and J v from the same factors (layer inputs and output cotangents): no
        # further pass through the network for J^T alpha or the refinement's products.
        ops = model.kernel()
        kernel, jvp_s, vjp_s = ops.matrix, ops.jvp_flat, ops.vjp_flat
        jt_r = None
    else:
        jac = model.jacobian()
        scale = 1 / jnp.sqrt(d)
        js = jac * scale[None, :]
        kernel = js @ js.T
        jvp_s, vjp_s = (lambda y: js @ y), (lambda u: js.T @ u)
        jt_r = jac.T @ r
    y_e = je = None
    if min_norm:
        w, u, repair = _min_norm(kernel, r, vjp_s, None if rcond is None else rcond**2)
    else:
        b = r
        if model.e is not None:
            y_e = model.e / lam if d is None else scale * model.e / lam
            je = jvp_s(y_e)
            b = r - je
        w, u, repair = _damped(kernel, lam, b, jvp_s, vjp_s, options)
    y, jd = -w, -u
    if y_e is not None:
        y, jd = y - y_e, jd - je
    delta = y if d is None else scale * y
    if model.e is not None:
        gnorm = jnp.linalg.norm(model.grad)
    elif jt_r is None:
        # ||J^T r||^2 = r^T (J J^T) r from the kernel in hand: no pullback of r.
        gnorm = jnp.sqrt(jnp.maximum(jnp.vdot(r, kernel @ r), 0))
    else:
        gnorm = jnp.linalg.norm(jt_r)
    return Solution(delta, jd, gnorm, repair)


def _damped(kernel, lam, b, jvp_s, vjp_s, options: DualOptions):
    """(J_s^T alpha, K alpha, repair) for (K + lam I) alpha = b.

    Accuracy: the kernel formed in floating point carries an error of about eps ||K||
    (``rounding_floor``) that squares the conditioning of J: in float32 with ||K|| ~ 6e4, every
    direction with an NTK eigenvalue under ~1e-2 is noise, and with lam that small the Cholesky
    step is wrong and its predicted decrease -(K alpha).(r - K alpha / 2) can even come out
    negative (LM then stalls, rejecting every trial). So when lam is below ``options.switch``
    times that floor, the Cholesky of K + max(lam, floor) I only *preconditions* conjugate
    gradients on (K + lam I) alpha = b with the operator alpha -> J_s (J_s^T alpha) + lam alpha
    from a VJP and a JVP, which are backward stable (their error in a direction of singular
    value s scales with s, not with ||J||). Those same products give J_s^T alpha and K alpha,
    so the predicted decrease is that of the step actually taken. Should the shifted Cholesky
    still fail (its backward error grows with R), the preconditioner is the kernel with its
    eigenvalues floored at R times the shift, and the step is always refined ("shifted").
    """
    lam = jnp.asarray(lam, kernel.dtype)
    n = kernel.shape[0]
    eye = _eye_like(n, kernel)
    floor = rounding_floor(kernel)
    shift = jnp.maximum(lam, floor)
    chol = cholesky(kernel + shift * eye)
    ok = factored(chol)
    factor = jax.lax.cond(ok, lambda: chol[0], lambda: _floored_factor(kernel, shift * n))

    def precond(s):
        return jsp.linalg.cho_solve((factor, False), s)

    alpha0 = precond(b)
    w0 = vjp_s(alpha0)  # the step when lam is well above the floor
    if options.max_steps == 0:
        return w0, kernel @ alpha0, jnp.where(ok, _code("none"), _code("shifted"))
    refine = (lam < options.switch * floor) | ~ok
    w, u = _pcg(b, lam, precond, jvp_s, vjp_s, refine, options, floor)
    repair = jnp.where(ok, jnp.where(refine, _code("refined"), _code("none")), _code("shifted"))
    return jnp.where(refine, w, w0), jnp.where(refine, u, kernel @ alpha0), repair


def _floored_factor(kernel: jax.Array, least: jax.Array) -> jax.Array:
    """The Cholesky factor of U diag(max(s, least)) U^T (K = U diag(s) U^T): positive definite
    with condition at most max|s| / least, whatever rounding did to K."""
    s, vecs = jnp.linalg.eigh(kernel)
    return cholesky((vecs * jnp.maximum(s, least)[None, :]) @ vecs.T)[0]


def _min_norm(kernel, r, vjp_s, rel=None):
    """(J^T alpha, K alpha, repair) for alpha = K^+ r, eigenvalues below eps n max dropped.

    Not refined: with R > rank J (duplicated examples, or R > P) the system K alpha = r is
    singular and inconsistent, where CG diverges along the null space of K; and below the
    cutoff the formed kernel cannot tell directions J resolves from those it does not. The
    step is then the truncated pseudo-inverse's: shorter than the minimum-norm step, never
    longer. (Gauss-Newton with "qr" or "cg" resolves singular values down to eps ||J||.)
    """
    alpha, _ = pinv_solve(kernel, r, rel)
    return vjp_s(alpha), kernel @ alpha, _code("none")


def _pcg(b, lam, precond, jvp_s, vjp_s, refine, options: DualOptions, floor):
    """Preconditioned CG on (K + lam I) alpha = b from alpha = 0, K alpha = J_s (J_s^T alpha),
    in a loop that does not start when ``refine`` is false; returns (J_s^T alpha, K alpha).

    Its mere presence still costs on the CPU (LM update at 16-1024-1024-1, N = 1024: 113 ms
    against 95 ms with dual_refine_steps=0); a lax.cond between the direct and refined steps
    cost more (122-126 ms), even untaken. alpha itself is never needed: only w = J_s^T alpha
    and u = K alpha are carried. A direction whose curvature p.(K + lam I)p is below eps times
    the floor (a null direction of J_s^T, seen only through rounding) ends the loop untaken:
    its step length would be noise divided by noise.
    """
    tol = jnp.finfo(b.dtype).eps ** 0.25 if options.tol is None else options.tol
    stop = (tol * jnp.linalg.norm(b)) ** 2
    null = jnp.finfo(b.dtype).eps * floor

    def cond(c):
        k, s, done = c[0], c[3], c[6]
        return refine & (k < options.max_steps) & (jnp.vdot(s, s) > stop) & ~done

    def body(c):
        k, w, u, s, p, sz, _ = c
        z = precond(s)  # at k = 0, s = b and z is the Cholesky solve
        sz_new = jnp.vdot(s, z)
        beta = jnp.where(k > 0, sz_new / jnp.where(sz != 0, sz, 1), 0)
        p = z + beta * p
        jt_p = vjp_s(p)
        k_p = jvp_s(jt_p)  # K p, backward stable
        a_p = k_p + lam * p
        curv = jnp.vdot(p, a_p)
        done = curv <= null * jnp.vdot(p, p)
        step = jnp.where(done, 0, sz_new / jnp.where(done, 1, curv))
        w, u = w + step * jt_p, u + step * k_p
        return k + 1, w, u, s - step * a_p, p, sz_new, done

    zeros = jnp.zeros_like(b)
    init = (jnp.zeros((), jnp.int32), _zeros_w(vjp_s, b), zeros, b, zeros, zeros[0],
            jnp.zeros((), bool))  # fmt: skip
    _, w, u, *_ = jax.lax.while_loop(cond, body, init)
    return w, u


def _zeros_w(vjp_s, b):
    """Zeros shaped like J_s^T b, without computing a product."""
    out = jax.eval_shape(vjp_s, b)
    return jnp.zeros(out.shape, out.dtype)
