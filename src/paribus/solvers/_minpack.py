"""MINPACK's trust region for Levenberg-Marquardt (Moré 1978; ``lmder`` and ``lmpar``).

The radius Delta, not lam, is the state. Each trial is the step on the radius's boundary,

    p(par) = -(J^T J + par D)^-1 g,      ||D^1/2 p(par)|| = Delta,

or Gauss-Newton's step (par = 0) when that lies within 1.1 Delta. With Js = J D^-1/2 = U S V^T
(one decomposition per step) and gs = V^T D^-1/2 g,

    ||D^1/2 p(par)||^2 = sum_i gs_i^2 / (s_i^2 + par)^2,

so every par costs O(P) (:func:`step` says how S and V are computed) and the secular
equation is solved to rounding by Moré's Newton iteration on 1 / ||D^1/2 p||, kept inside a
bracket (MINPACK's lmpar stops within 10% after up to 10 factorisations). Gauss-Newton's
step drops the singular values Js does not resolve (the step of least ||D^1/2 p|| where J is
rank-deficient or R < P: the limit of p(par) as par -> 0).

The radius then follows lmder: Delta_0 = 100 ||D^1/2 theta_0|| (100 at theta_0 = 0), cut to
the first step's length; with rho the gain ratio,

- rho <= 1/4: Delta = t min(Delta, 10 ||D^1/2 p||), t = 1/2, or where the loss rose the
  minimiser of the quadratic through L, L'(0) = -(||J p||^2 + par ||D^1/2 p||^2) and L_trial,
  clipped below at 1/10 (also for a trial 100 times L or not finite);
- else if par = 0 or rho >= 3/4: Delta = 2 ||D^1/2 p||;

and a trial is kept when rho > 1e-4. D is the running maximum of diag(J^T J) (``scaling=
"marquardt"``, MINPACK's mode 1) or the identity.

Cost: one trial (one evaluation of the loss) per step, as MINPACK counts them; the
eigendecomposition of J^T J (R >= P: 1.5-3x the primal form's Cholesky on the CPU) or the SVD
of J (R < P, or where the Gram does not resolve the step: about 10x). A whole update of the
pb.nets MLPs of ``benchmarks/lm_minpack.py`` (P = 61 to 1,201, float32, where J's conditioning
sends every step to the SVD) costs 4.6-9.3x Nielsen's.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from paribus.solvers import _common
from paribus.solvers._linear import SWITCH, Solution, _code, gradient, rounding_floor
from paribus.solvers._model import Model

FACTOR = 100.0
"""Delta_0 = FACTOR ||D^1/2 theta_0|| (lmder's ``factor``)."""
SECULAR_STEPS = 40
"""Newton iterations on the secular equation (each O(P); converged to rounding well before)."""


class Step(NamedTuple):
    """The trial (:class:`Solution`), its par, and ||D^1/2 p||."""

    solution: Solution
    par: jax.Array
    scaled_norm: jax.Array


def initial_radius(flat: jax.Array, d: jax.Array | None) -> jax.Array:
    """Delta_0 = 100 ||D^1/2 theta_0||, or 100 where that is 0."""
    radius = FACTOR * _common.scaled_norm(flat, d)
    return jnp.where(radius > 0, radius, FACTOR)


def _secular(gh: jax.Array, s2: jax.Array, radius: jax.Array) -> jax.Array:
    """par > 0 with ||gs / (s^2 + par)|| = radius, given that par = 0 overshoots it.

    Newton's iteration on 1 / ||q(par)|| (nearly linear in par: Moré 1978, sec. 5), inside the
    bracket [lo, hi] that each iterate narrows; an iterate outside it is replaced by the
    geometric mean of the bracket (or 1e-3 hi while lo = 0), as lmpar does. hi starts at
    ||gs|| / radius, where ||q|| <= ||gs|| / par is at most radius.
    """
    hi0 = jnp.linalg.norm(gh) / radius

    def body(_, carry):
        par, lo, hi = carry
        qn = jnp.linalg.norm(gh / (s2 + par))
        phi = qn - radius
        lo = jnp.where(phi > 0, jnp.maximum(lo, par), lo)
        hi = jnp.where(phi < 0, jnp.minimum(hi, par), hi)
        slope = jnp.sum(gh**2 / (s2 + par) ** 3)
        new = par + phi / radius * qn**2 / jnp.where(slope > 0, slope, 1)
        inside = (new > lo) & (new < hi) & jnp.isfinite(new)
        fallback = jnp.where(lo > 0, jnp.sqrt(lo * hi), 1e-3 * hi)
        return jnp.where(inside, new, fallback), lo, hi

    zero = jnp.zeros((), gh.dtype)
    return jax.lax.fori_loop(0, SECULAR_STEPS, body, (1e-3 * hi0, zero, hi0))[0]


def _boundary(gh, s2, cut, radius):
    """(coefficients along the singular vectors, par): Gauss-Newton's where it lies within
    1.1 radius (lmpar's test), else the secular equation's root."""
    newton = jnp.where(cut, gh / jnp.where(cut, s2, 1), 0)  # -> -J^+ r for 1/2 ||r||^2
    inside = jnp.linalg.norm(newton) - radius <= 0.1 * radius
    par = jnp.where(inside, 0, _secular(gh, s2, radius))
    return jnp.where(inside, newton, gh / (s2 + jnp.where(inside, 1, par))), par


def _from_svd(jh: jax.Array, gw: jax.Array, radius: jax.Array):
    """(q = D^1/2 p, par) from the SVD of Js itself: every singular value J resolves."""
    rows, cols = jh.shape
    _, s, vt = jnp.linalg.svd(jh, full_matrices=False)
    gh = vt @ gw
    s2 = s * s
    cut = s > jnp.finfo(jh.dtype).eps * max(rows, cols) * s[0]
    if rows < cols:
        # The part of gs outside the row space (e, with a loss at the outputs) has no
        # curvature: one more term with s = 0, left out of Gauss-Newton's step.
        perp = gw - vt.T @ gh
        pn = jnp.linalg.norm(perp)
        gh = jnp.concatenate([gh, pn[None]])
        s2 = jnp.concatenate([s2, jnp.zeros((1,), s2.dtype)])
        cut = jnp.concatenate([cut, jnp.zeros((1,), bool)])
    coeff, par = _boundary(gh, s2, cut, radius)
    q = -(vt.T @ coeff[: vt.shape[0]])
    if rows < cols:
        q = q - perp * (coeff[-1] / jnp.where(pn > 0, pn, 1))
    return q, par


def step(model: Model, d: jax.Array | None, radius: jax.Array) -> Step:
    """The trial on the trust region's boundary (or Gauss-Newton's step inside it).

    R >= P: from the eigenvalues of Js^T Js = V S^2 V^T (1.5-3x a Cholesky of the primal form
    on the CPU, where the SVD of J is 10x), unless the step needs directions whose s_i^2 lie
    within ``SWITCH`` times the rounding floor of Js^T Js as formed (par below it and such an
    s_i present: a rank-deficient or ill-conditioned J near Gauss-Newton's step), where the
    SVD of Js itself gives it (Powell's singular function: the Gram's step stalls at
    F = 6e-29, the SVD's converges). R < P: the SVD of Js.
    """
    jac = model.jacobian()
    g = gradient(model, jac.T @ model.r)
    w = jnp.ones_like(g) if d is None else jnp.sqrt(d)
    jh, gw = jac / w[None, :], g / w
    rows, cols = jac.shape
    if rows < cols:
        q, par = _from_svd(jh, gw, radius)
    else:
        gram = jh.T @ jh
        s2, v = jnp.linalg.eigh(gram)
        s2 = jnp.maximum(s2, 0)
        gh = v.T @ gw
        floor = rounding_floor(gram)
        cut = s2 > jnp.finfo(jac.dtype).eps * cols * s2[-1]
        coeff, par = _boundary(gh, s2, cut, radius)
        resolved = (par >= SWITCH * floor) | (s2[0] >= SWITCH * floor)
        q, par = jax.lax.cond(
            resolved, lambda: (-(v @ coeff), par), lambda: _from_svd(jh, gw, radius)
        )
    delta = q / w
    solution = Solution(delta, jac @ delta, jnp.linalg.norm(g), _code("none"))
    return Step(solution, par.astype(g.dtype), jnp.linalg.norm(q))


def next_radius(radius, par, rho, scaled_norm, jd, value, trial_value, actual):
    """lmder's radius update after a trial (see the module docstring); (radius, par hint).

    ``value`` = L, ``actual`` = L - L_trial (nan/inf for a non-finite trial), ``jd`` = J p.
    """
    dt = radius.dtype
    norm = jnp.where(jnp.isfinite(scaled_norm), scaled_norm, radius)
    scale = jnp.where(value > 0, value, 1)
    actred = actual / scale  # 1 - (||r_trial|| / ||r||)^2
    dirder = -(jnp.vdot(jd, jd) + par * norm**2) / (2 * scale)
    quad = 0.5 * dirder / jnp.where(dirder + 0.5 * actred < 0, dirder + 0.5 * actred, -1)
    t = jnp.where(actred >= 0, 0.5, quad)
    t = jnp.where((trial_value >= 100 * value) | ~jnp.isfinite(actual) | ~(t >= 0.1), 0.1, t)
    shrink = ~(rho > 0.25)
    grow = ~shrink & ((par == 0) | (rho >= 0.75))
    new = jnp.where(shrink, t * jnp.minimum(radius, 10 * norm), jnp.where(grow, 2 * norm, radius))
    hint = jnp.where(shrink, par / t, jnp.where(grow, 0.5 * par, par))
    return new.astype(dt), hint.astype(dt)
