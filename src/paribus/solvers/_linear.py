"""The four solve forms of the damped Gauss-Newton system, and the choice between them.

Every form returns the step delta (P,) solving

    (J^T J + lam D) delta = -J^T r                      (D = diag(d), or I when d is None)

together with J delta (R,) (for the predicted decrease) and the gradient norm ||J^T r||, each
computed the cheapest way the form allows. With ``min_norm=True`` (Gauss-Newton, lam = 0) every
form returns the minimum-norm least-squares step -J^+ r, never NaN, also when J is
rank-deficient or R < P: an eigenvalue cutoff of eps * n * max eigenvalue in the Cholesky forms
(eps that of the matmul precision, :func:`matmul_eps`), an SVD solve in "qr", and CG started
from zero (its iterates stay in the row space of J). A failed factorisation gives a non-finite
step: the caller rejects it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy as jsp

from paribus.solvers._model import Model

FORMS = ("primal", "qr", "dual", "cg")
"""Solve-form names; the code stored in states and histories is the index here (-1: none)."""
SOLVES = ("auto", *FORMS)
CODES = {name: code for code, name in enumerate(FORMS)}


class CGOptions(NamedTuple):
    """Matrix-free solve: iteration cap, relative residual tolerance, Jacobi preconditioning."""

    max_steps: int = 50
    tol: float = 1e-10
    jacobi: bool = True


def check_solve(solve: str, *, where: str) -> str:
    if solve not in SOLVES:
        raise ValueError(f"{where}: unknown solve={solve!r}; expected one of {list(SOLVES)}.")
    return solve


MAX_DENSE = 8192
"""Largest side of a matrix "auto" factorises: (1/3) 8192^3 = 1.8e11 flops, seconds on a CPU and
milliseconds on a GPU. Above it matrix-free CG (a few gradients per iteration) is cheaper."""


def choose(solve: str, n_res: int, n_params: int, itemsize: int, budget: int) -> str:
    """The form "auto" resolves to: dual when R < P, primal when P is small, else cg.

    Memory: primal holds J and J^T J, (R P + P^2) numbers; dual holds J J^T, R^2 numbers
    (the structured NTK never forms J). cg holds a few vectors. Time: a dense form factorises
    a min(R, P)-sided matrix, so it is used only up to ``MAX_DENSE``.
    """
    if solve != "auto":
        return solve
    if n_res < n_params:
        fits = n_res * n_res * itemsize <= budget and n_res <= MAX_DENSE
        return "dual" if fits else "cg"
    fits = (n_res * n_params + n_params * n_params) * itemsize <= budget
    return "primal" if fits and n_params <= MAX_DENSE else "cg"


def _cholesky(a: jax.Array) -> tuple[jax.Array, bool]:
    """The Cholesky factor of symmetric a, for ``cho_solve``; reads one triangle of a.

    ``cho_factor(lower=False)`` rather than ``jnp.linalg.cholesky``, which first symmetrises
    (a + a^T) / 2: at 1-64-64-1, N = 512 (CPU), kernel + factor + solve took 2.2 ms this way
    against 3.8 ms.
    """
    return jsp.linalg.cho_factor(a, lower=False)


def _chol_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """a^{-1} b for symmetric positive definite a; NaN when a is not (caller rejects)."""
    return jsp.linalg.cho_solve(_cholesky(a), b)


def _pinv_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """a^+ b for symmetric positive semidefinite a, eigenvalues below the cutoff dropped."""
    s, u = jnp.linalg.eigh(a)
    cut = matmul_eps(a.dtype) * a.shape[0] * jnp.max(jnp.abs(s))
    keep = s > cut
    inv = jnp.where(keep, 1 / jnp.where(keep, s, 1), 0)
    return u @ (inv * (u.T @ b))


def _eye_like(n: int, like: jax.Array) -> jax.Array:
    return jnp.eye(n, dtype=like.dtype)


def primal(model: Model, lam, d, min_norm: bool):
    """Normal equations (J^T J + lam D) delta = -g by Cholesky: N m P^2 + P^3 / 3 flops."""
    jac = model.jacobian()
    g = jac.T @ model.r
    jtj = jac.T @ jac
    if min_norm:
        delta = -_pinv_solve(jtj, g)
    else:
        damp = lam * (_eye_like(jtj.shape[0], jtj) if d is None else jnp.diag(d))
        delta = -_chol_solve(jtj + damp, g)
    return delta, jac @ delta, jnp.linalg.norm(g)


def qr(model: Model, lam, d, min_norm: bool):
    """QR of the stacked [J; sqrt(lam D)]: never squares the condition number of J.

    With a loss at the outputs the whitened residuals can be huge where the whitening is tiny
    (a robust loss far beyond its scale: rw ~ r / sqrt(eps)), and Q^T r then carries their
    rounding into the step. There the right-hand side is the gradient g = J^T r itself (whose
    terms are moderate) and the step solves R^T R delta = -g, corrected once with the
    residual of the normal equations (Bjorck's corrected semi-normal equations: as accurate as
    QR for the conditions LM meets).
    """
    jac = model.jacobian()
    g = jac.T @ model.r
    if min_norm:
        delta = jnp.linalg.lstsq(jac, -model.r)[0]
        return delta, jac @ delta, jnp.linalg.norm(g)
    n = jac.shape[1]
    damp = lam * (jnp.ones(n, jac.dtype) if d is None else d)
    q, upper = jnp.linalg.qr(jnp.concatenate([jac, jnp.diag(jnp.sqrt(damp))], axis=0))
    if model.linearization.loss is None:
        delta = jsp.linalg.solve_triangular(upper, -(q[: jac.shape[0]].T @ model.r))
        return delta, jac @ delta, jnp.linalg.norm(g)

    def normal_solve(b):
        y = jsp.linalg.solve_triangular(upper, b, trans="T")
        return jsp.linalg.solve_triangular(upper, y)

    delta = normal_solve(-g)
    residual = -g - (jac.T @ (jac @ delta) + damp * delta)
    delta = delta + normal_solve(residual)
    return delta, jac @ delta, jnp.linalg.norm(g)


class DualOptions(NamedTuple):
    """Refinement of the float-limited dual solve (see :func:`dual`): at most ``max_steps``
    preconditioned CG steps, stopped at relative residual ``tol`` (None: eps^(1/4), 0.018 in
    float32 and 1.2e-4 in float64: an inexact LM step, whose predicted decrease stays exact),
    taken only when lam is below ``switch`` times the kernel's rounding floor."""

    max_steps: int = 10
    tol: float | None = None
    switch: float = 10.0


DEFAULT_DUAL = DualOptions()


# Machine epsilon of the reduced-precision arithmetic XLA may use for float32 matmuls: TF32 keeps
# 10 mantissa bits, bfloat16 7, three bfloat16 passes about 16 (JAX's matmul-precision guide).
_TF32, _BF16, _BF16_3X = 2.0**-10, 2.0**-7, 2.0**-16
_FULL = ("highest", "float32", "F32_F32_F32")


def matmul_eps(dtype, platform: str | None = None, setting: str | None = None) -> float:
    """Relative rounding of a matrix product of ``dtype`` inputs as XLA will compute it.

    float32 products on GPUs and TPUs are by default computed in reduced precision (TF32 on
    NVIDIA tensor cores, one bfloat16 pass on TPU) unless ``jax_default_matmul_precision`` asks
    for "highest" / "float32"; every other dtype, and any product on a CPU, rounds at
    ``finfo(dtype).eps``. ``platform`` (default ``jax.default_backend()``) and ``setting``
    (default the config value) are read at trace time.
    """
    eps = float(jnp.finfo(dtype).eps)
    if jnp.dtype(dtype) != jnp.float32:
        return eps
    platform = jax.default_backend() if platform is None else platform
    if setting is None:
        setting = jax.config.jax_default_matmul_precision
    setting = "default" if setting is None else str(setting)
    if platform == "cpu" or setting in _FULL:
        return eps
    if setting in ("bfloat16", "fastest") or setting.startswith("BF16_BF16"):
        return _BF16
    if platform == "tpu":
        return _BF16_3X if setting in ("high", "tensorfloat32", "bfloat16_3x") else _BF16
    return _TF32  # GPUs: "default", "high", "tensorfloat32", TF32 presets


def rounding_floor(kernel: jax.Array) -> jax.Array:
    """eps * ||K||_F: a bound on the rounding error in a kernel K = J J^T as it was formed.

    Each entry K_ij = sum_k J_ik J_jk is rounded with an error of about eps sum_k |J_ik J_jk|,
    a perturbation E of spectral norm of order eps ||K|| that is *not* of the form
    (J + dJ)(J + dJ)^T: eigenvalues of J J^T below it are noise, and K + lam I may not even be
    positive definite for lam < ||E||. ||K||_F lies between ||K||_2 and tr(K) and costs one pass.
    Measured (float32 on the CPU, ||K_f32 - K_f64||_2 against eps ||K||_F): 2.8e-4 vs 1.5e-3 at
    1-64-64-1, N = 512; 7.8e-4 vs 3.4e-3 at 16-512-512-1, N = 512 (eps tr(K): 1.5e-2); 2.6e-3 vs
    5.6e-3 at 1-1000-1, N = 256. eps is :func:`matmul_eps`: 2^-10 for float32 on a GPU at JAX's
    default matmul precision (TF32).
    """
    return matmul_eps(kernel.dtype) * jnp.linalg.norm(kernel)


def dual(model: Model, lam, d, min_norm: bool, options: DualOptions = DEFAULT_DUAL):
    """delta = -D^-1 J^T (J D^-1 J^T + lam I)^-1 r: one R x R Cholesky, one J^T product.

    The push-through identity makes it equal to the primal step; with D = I it needs only the
    NTK J J^T (structured for ``pb.nets`` networks, never forming J) and a VJP.

    Accuracy (D = I): the kernel formed in floating point carries an error of about
    eps ||K|| (:func:`rounding_floor`) that squares the conditioning of J: in float32 with
    ||K|| ~ 6e4, every direction with an NTK eigenvalue under ~1e-2 is noise, and with lam that
    small the Cholesky step is wrong and its predicted decrease -(K alpha).(r - K alpha / 2)
    can even come out negative (LM then stalls, rejecting every trial). So when lam is below
    ``options.switch`` times that floor, the Cholesky of K + max(lam, floor) I only
    *preconditions* conjugate gradients on (J J^T + lam I) alpha = r with the operator
    alpha -> J (J^T alpha) + lam alpha from a VJP and a JVP, which are backward stable (their
    error in a direction of singular value s scales with s, not with ||J||). Those same products
    give delta = -J^T alpha and J delta = -J J^T alpha, so the predicted decrease is that of the
    step actually taken. Cost: one VJP and one JVP per refinement step (the first of which
    re-derives the Cholesky step), at most ``options.max_steps``; above the switch, none.
    """
    r = model.r
    if d is not None:
        jac = model.jacobian()
        kernel = (jac / d[None, :]) @ jac.T
        vjp = None
    else:
        # K and J^T alpha (and the refinement's J J^T p) from the same factors: no further pass
        # through the network for each product.
        ops = model.kernel()
        kernel, vjp, jvp = ops.matrix, ops.vjp_flat, ops.jvp_flat
    eye = _eye_like(r.shape[0], kernel)
    if min_norm:
        alpha = _pinv_solve(kernel, r)
    elif d is None:
        return _dual_refined(r, vjp, jvp, kernel, lam, options)
    else:
        alpha = _chol_solve(kernel + lam * eye, r)
    if d is None:
        # ||g||^2 = ||J^T r||^2 = r^T (J J^T) r from the kernel in hand: one pullback (J^T alpha)
        # per step instead of two.
        gnorm = jnp.sqrt(jnp.maximum(jnp.vdot(r, kernel @ r), 0))
        delta = -vjp(alpha)
    else:
        gnorm, delta = jnp.linalg.norm(jac.T @ r), -(jac.T @ alpha) / d
    return delta, -(kernel @ alpha), gnorm


def _dual_refined(r, vjp, jvp, kernel: jax.Array, lam, options: DualOptions):
    """The D = I dual step of :func:`dual`: Cholesky, refined by PCG when lam is small.
    ``vjp`` / ``jvp`` are the flat products with J (J^T u, J v)."""
    lam = jnp.asarray(lam, kernel.dtype)
    gnorm = jnp.sqrt(jnp.maximum(jnp.vdot(r, kernel @ r), 0))
    floor = rounding_floor(kernel)
    shift = jnp.maximum(lam, floor)
    chol = _cholesky(kernel + shift * _eye_like(r.shape[0], kernel))

    def precond(s):
        return jsp.linalg.cho_solve(chol, s)

    alpha0 = precond(r)
    w0 = vjp(alpha0)  # J^T alpha0: the step when lam is well above the floor
    direct = (-w0, -(kernel @ alpha0))
    if options.max_steps == 0:
        return (*direct, gnorm)
    refine = lam < options.switch * floor
    tol = jnp.finfo(r.dtype).eps ** 0.25 if options.tol is None else options.tol
    stop = (tol * jnp.linalg.norm(r)) ** 2

    # PCG from alpha = 0, whose first direction is the Cholesky solve alpha0 itself, in a loop
    # that does not start when ``refine`` is false. Its mere presence still costs on the CPU
    # (LM update at 16-1024-1024-1, N = 1024: 113 ms against 95 ms with dual_refine_steps=0);
    # a lax.cond between the two steps cost more (122-126 ms), even untaken.
    # alpha itself is never needed: only w = J^T alpha and u = J J^T alpha are carried.
    def cond(c):
        k, s = c[0], c[3]
        return refine & (k < options.max_steps) & (jnp.vdot(s, s) > stop)

    def body(c):
        k, w, u, s, p, sz = c
        z = precond(s)  # at k = 0, s = r and z = alpha0
        sz_new = jnp.vdot(s, z)
        beta = jnp.where(k > 0, sz_new / jnp.where(sz != 0, sz, 1), 0)
        p = z + beta * p
        jt_p = vjp(p)
        k_p = jvp(jt_p)  # J J^T p, backward stable
        a_p = k_p + lam * p
        curv = jnp.vdot(p, a_p)
        step = jnp.where(curv > 0, sz_new / jnp.where(curv > 0, curv, 1), 0)
        w, u = w + step * jt_p, u + step * k_p
        return k + 1, w, u, s - step * a_p, p, sz_new

    zeros = jnp.zeros_like(r)
    init = (jnp.zeros((), jnp.int32), jnp.zeros_like(w0), zeros, r, zeros, zeros[0])
    _, w, u, *_ = jax.lax.while_loop(cond, body, init)
    delta = jnp.where(refine, -w, direct[0])
    jd = jnp.where(refine, -u, direct[1])
    return delta, jd, gnorm


def cg(model: Model, lam, d, min_norm: bool, options: CGOptions):
    """Conjugate gradients on (J^T J + lam D) delta = -g with J^T J v = vjp(jvp(v)).

    Capped at ``options.max_steps`` products, stopped at relative residual ``options.tol``;
    the Jacobi preconditioner is diag(J^T J) + lam D.
    """
    g = model.vjp(model.r)
    damp = jnp.zeros((), g.dtype) if min_norm else lam
    scale = jnp.ones_like(g) if d is None else d

    def matvec(v):
        return model.vjp(model.jvp(v)) + damp * scale * v

    precond = None
    if options.jacobi and not min_norm:
        diag = model.jtj_diag() + damp * scale
        diag = jnp.where(diag > 0, diag, 1)
        precond = lambda v: v / diag  # noqa: E731
    delta, _ = jsp.sparse.linalg.cg(
        matvec, -g, tol=options.tol, maxiter=options.max_steps, M=precond
    )
    return delta, model.jvp(delta), jnp.linalg.norm(g)


def solve(
    form: str,
    model: Model,
    lam,
    d,
    *,
    min_norm: bool,
    cg_options: CGOptions,
    dual_options: DualOptions = DEFAULT_DUAL,
):
    """Dispatch on the (static) form name; returns (delta, J delta, ||g||)."""
    if form == "cg":
        return cg(model, lam, d, min_norm, cg_options)
    if form == "dual":
        return dual(model, lam, d, min_norm, dual_options)
    return {"primal": primal, "qr": qr}[form](model, lam, d, min_norm)
