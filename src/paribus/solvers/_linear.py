"""The four solve forms of the damped Gauss-Newton system.

Every form returns a :class:`Solution`: the step delta (P,) solving

    (J^T J + lam D) delta = -g,      g = J^T r + e,      D = diag(d), or I when d is None,

with J delta (R,) (for the predicted decrease), ||g||, and how the solve was repaired
(``pb.solvers.REPAIRS``), each computed the cheapest way the form allows. With
``min_norm=True`` (Gauss-Newton, lam = 0, e ignored) every form returns the minimum-norm
least-squares step -J^+ r, never NaN, also when J is rank-deficient or R < P.

A factorisation that fails, or whose matrix is too ill-conditioned for the dtype to mean
anything, is repaired inside the same solve and never becomes a rejected trial:

- "primal" forms J^T J, whose rounding (about eps ||J^T J||) hides every direction with
  curvature below it; when lam D is not well above that floor, or the Cholesky fails, the step
  comes from a QR of [J; sqrt(lam D)] instead (repair "qr"); Gauss-Newton's pseudo-inverse of
  J^T J is replaced by an SVD least-squares solve of J itself (repair "svd");
- "dual" refines its Cholesky step with backward-stable products (repair "refined", see
  :mod:`paribus.solvers._dual`), and factorises an eigenvalue-floored kernel when even the
  shifted Cholesky fails (repair "pinv");
- "qr" and "cg" factorise nothing.

The form itself is chosen in :mod:`paribus.solvers._cost`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy as jsp

from paribus.solvers._info import REPAIRS
from paribus.solvers._model import Model

FORMS = ("primal", "qr", "dual", "cg")
"""Solve-form names; the code stored in states and histories is the index here (-1: none)."""
SOLVES = ("auto", *FORMS)
CODES = {name: code for code, name in enumerate(FORMS)}
REPAIR = {name: code for code, name in enumerate(REPAIRS)}

SWITCH = 10.0
"""A factorised step is trusted when the damping lam D is at least this many times the rounding
floor of the matrix it damps (eps ||A||_F): then every direction's curvature, as formed, is
off by at most 10%."""


class Solution(NamedTuple):
    """delta (P,), J delta (R,), ||g||, and the repair code (int32, ``REPAIRS`` index)."""

    delta: jax.Array
    jd: jax.Array
    gnorm: jax.Array
    repair: jax.Array


def _code(name: str) -> jax.Array:
    return jnp.asarray(REPAIR[name], jnp.int32)


def check_solve(solve: str, *, where: str) -> str:
    if solve not in SOLVES:
        raise ValueError(f"{where}: unknown solve={solve!r}; expected one of {list(SOLVES)}.")
    return solve


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


def rounding_floor(gram: jax.Array) -> jax.Array:
    """eps * ||A||_F: a bound on the rounding error in a Gram matrix A (J J^T or J^T J) as formed.

    Each entry A_ij = sum_k J_ki J_kj is rounded with an error of about eps sum_k |J_ki J_kj|,
    a perturbation E of spectral norm of order eps ||A|| that is *not* of the form
    (J + dJ)^T (J + dJ): eigenvalues of A below it are noise, and A + lam I may not even be
    positive definite for lam < ||E||. ||A||_F lies between ||A||_2 and tr(A) and costs one
    pass. Measured (float32 on the CPU, ||K_f32 - K_f64||_2 against eps ||K||_F): 2.8e-4 vs
    1.5e-3 at 1-64-64-1, N = 512; 7.8e-4 vs 3.4e-3 at 16-512-512-1, N = 512 (eps tr(K):
    1.5e-2); 2.6e-3 vs 5.6e-3 at 1-1000-1, N = 256. eps is :func:`matmul_eps`: 2^-10 for
    float32 on a GPU at JAX's default matmul precision (TF32).
    """
    return matmul_eps(gram.dtype) * jnp.linalg.norm(gram)


def cholesky(a: jax.Array) -> tuple[jax.Array, bool]:
    """The Cholesky factor of symmetric a, for ``cho_solve``; reads one triangle of a. NaN
    (not an exception) when a is not numerically positive definite: see :func:`factored`.

    ``cho_factor(lower=False)`` rather than ``jnp.linalg.cholesky``, which first symmetrises
    (a + a^T) / 2: at 1-64-64-1, N = 512 (CPU), kernel + factor + solve took 2.2 ms this way
    against 3.8 ms.
    """
    return jsp.linalg.cho_factor(a, lower=False)


def factored(chol: tuple[jax.Array, bool]) -> jax.Array:
    """Whether a Cholesky factorisation succeeded: XLA returns NaN factors when it fails."""
    return jnp.all(jnp.isfinite(jnp.diagonal(chol[0])))


def pinv_solve(a: jax.Array, b: jax.Array, rel: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(a^+ b, trusted) for symmetric positive semidefinite a, eigenvalues below the cutoff
    eps n max|s| (or ``rel`` max|s|) dropped. ``trusted``: the smallest eigenvalue is at least
    ``SWITCH`` times the cutoff, so nothing was dropped and no kept direction is within 10x of
    what the dtype resolves (else the caller solves from J itself)."""
    s, u = jnp.linalg.eigh(a)
    top = jnp.max(jnp.abs(s))
    cut = (matmul_eps(a.dtype) * a.shape[0] if rel is None else rel) * top
    keep = s > cut
    inv = jnp.where(keep, 1 / jnp.where(keep, s, 1), 0)
    trusted = jnp.min(s) >= SWITCH * cut
    return u @ (inv * (u.T @ b)), trusted


def _eye_like(n: int, like: jax.Array) -> jax.Array:
    return jnp.eye(n, dtype=like.dtype)


def gradient(model: Model, jt_r: jax.Array) -> jax.Array:
    """g = J^T r + e, given J^T r."""
    return jt_r if model.e is None else model.grad


def gram_resolves(rcond: float, dtype, n: int) -> bool:
    """Whether a Gram matrix (J^T J or J J^T) formed in ``dtype`` resolves singular values of
    J down to ``rcond`` sigma_max: rcond^2 at least ``SWITCH`` times its rounding eps n."""
    return rcond**2 >= SWITCH * matmul_eps(dtype) * n


def truncated(jac: jax.Array, r: jax.Array, rcond: float) -> jax.Array:
    """-J^+ r with the singular values of J below rcond sigma_max dropped (an SVD of J)."""
    return -jnp.linalg.lstsq(jac, r, rcond=rcond)[0]


def primal(model: Model, lam, d, min_norm: bool, rcond: float | None = None) -> Solution:
    """Normal equations (J^T J + lam D) delta = -g by Cholesky: N m P^2 + P^3 / 3 flops.

    Repaired (see the module docstring) when the Cholesky fails or lam D is below ``SWITCH``
    times the rounding floor of J^T J as formed: float32 fits reach that floor long before
    their minimum (1-20-1 tanh, 2,000 points: lam pinned near 2e-3 with the normal matrix's
    smallest eigenvalue at -3.3e-3, every trial below it a failed factorisation).
    """
    jac = model.jacobian()
    r = model.r
    jt_r = jac.T @ r
    g = gradient(model, jt_r)
    jtj = jac.T @ jac
    if min_norm and rcond is not None:
        if gram_resolves(rcond, jtj.dtype, jtj.shape[0]):
            delta = -pinv_solve(jtj, jt_r, rcond**2)[0]
        else:
            delta = truncated(jac, r, rcond)
        return Solution(delta, jac @ delta, jnp.linalg.norm(g), _code("none"))
    if min_norm:
        delta, trusted = pinv_solve(jtj, jt_r)
        delta, repair = jax.lax.cond(
            trusted,
            lambda: (-delta, _code("none")),
            lambda: (jnp.linalg.lstsq(jac, -r)[0], _code("svd")),
        )
        return Solution(delta, jac @ delta, jnp.linalg.norm(g), repair)
    damp = lam * (jnp.ones_like(g) if d is None else d)
    chol = cholesky(jtj + jnp.diag(damp))
    trusted = factored(chol) & (jnp.min(damp) >= SWITCH * rounding_floor(jtj))
    delta, repair = jax.lax.cond(
        trusted,
        lambda: (-jsp.linalg.cho_solve(chol, g), _code("none")),
        lambda: (_qr_step(model, jac, g, damp), _code("qr")),
    )
    return Solution(delta, jac @ delta, jnp.linalg.norm(g), repair)


def _qr_step(model: Model, jac: jax.Array, g: jax.Array, damp: jax.Array) -> jax.Array:
    """The LM step from the R factor of the stacked [J, r; sqrt(lam D), 0]: never squares the
    condition number of J.

    For 1/2 ||r||^2 the factor of the augmented matrix holds Q^T r in its last column, so Q
    itself is never formed: delta = -R^-1 (Q^T r). With a loss at the outputs (or e != 0) the
    whitened residuals can be huge where the whitening is tiny (a robust loss far beyond its
    scale: rw ~ r / sqrt(eps)), and Q^T r then carries their rounding into the step. There the
    right-hand side is the gradient g itself (whose terms are moderate) and the step solves
    R^T R delta = -g, corrected once with the residual of the normal equations (Bjorck's
    corrected semi-normal equations: as accurate as QR for the conditions LM meets).
    """
    r = model.r
    n = jac.shape[1]
    below = jnp.diag(jnp.sqrt(damp))
    if model.linearization.loss is None and model.e is None:
        stacked = jnp.concatenate(
            [jnp.concatenate([jac, r[:, None]], axis=1),
             jnp.concatenate([below, jnp.zeros((n, 1), jac.dtype)], axis=1)], axis=0,
        )  # fmt: skip
        upper = jnp.linalg.qr(stacked, mode="r")
        return -jsp.linalg.solve_triangular(upper[:n, :n], upper[:n, n])
    upper = jnp.linalg.qr(jnp.concatenate([jac, below], axis=0), mode="r")[:n]

    def normal_solve(b):
        y = jsp.linalg.solve_triangular(upper, b, trans="T")
        return jsp.linalg.solve_triangular(upper, y)

    delta = normal_solve(-g)
    residual = -g - (jac.T @ (jac @ delta) + damp * delta)
    return delta + normal_solve(residual)


def qr(model: Model, lam, d, min_norm: bool, rcond: float | None = None) -> Solution:
    """QR of the stacked [J; sqrt(lam D)] (see :func:`_qr_step`); Gauss-Newton: an SVD
    least-squares solve of J."""
    jac = model.jacobian()
    jt_r = jac.T @ model.r
    g = gradient(model, jt_r)
    if min_norm:
        delta = jnp.linalg.lstsq(jac, -model.r, rcond=rcond)[0]
    else:
        delta = _qr_step(model, jac, g, lam * (jnp.ones_like(g) if d is None else d))
    return Solution(delta, jac @ delta, jnp.linalg.norm(g), _code("none"))
