"""Robust residual losses (pb.losses.huber, ...) against scipy.optimize.least_squares, float64.

scipy defines the losses; its float64 arithmetic is the reference up to its own rounding. Where
scipy's formula cancels (soft_l1's 2 (sqrt(1 + z) - 1) for small z; rho' + 2 z rho'' for large
z), the comparison allows that rounding, derived from scipy's own arrays, and an exact
rational reference (Python's fractions and decimal) checks our values there instead.
"""

from __future__ import annotations

import decimal
import functools
from fractions import Fraction

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_compiles_once, count_compiles
from scipy.optimize import least_squares
from scipy.optimize._lsq.common import EPS, scale_for_robust_loss_function
from scipy.optimize._lsq.least_squares import construct_loss_function

import paribus as pb

NAMES = ["linear", "huber", "soft_l1", "cauchy", "arctan"]
SCALES = [0.1, 1.0, 3.7]


def residuals(scale: float, n: int = 400, seed: int = 0) -> np.ndarray:
    """|r| log-uniform from 1e-8 C to 1e8 C, both signs, and exact 0 and +-C."""
    rng = np.random.default_rng(seed)
    r = scale * np.exp(rng.uniform(np.log(1e-8), np.log(1e8), n)) * rng.choice([-1.0, 1.0], n)
    r[:4] = [0.0, scale, -scale, 0.0]
    return r


def scipy_reference(name: str, scale: float, r: np.ndarray) -> dict[str, np.ndarray]:
    """scipy's rho arrays, its J scale and scaled residuals, and a bound on its rounding."""
    if name == "linear":
        one = np.ones_like(r)
        return dict(cost=0.5 * r**2, grad=r, curvature=one, s=one, rw=r, curvature_err=0 * r)
    rho = construct_loss_function(r.size, name, scale)(r.copy()).copy()
    s, rw = scale_for_robust_loss_function(np.ones((r.size, 1)), r.copy(), rho.copy())
    terms = np.abs(rho[1]) + np.abs(2 * rho[2] * r**2)
    return dict(
        cost=0.5 * rho[0],
        grad=rho[1] * r,
        curvature=rho[1] + 2 * rho[2] * r**2,
        s=np.asarray(s)[:, 0],
        rw=rw,
        # rho' + 2 rho'' r^2 in float64: a few roundings of each term.
        curvature_err=4 * EPS * terms,
    )


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", NAMES)
def test_cost_gradient_and_whitening_equal_scipys(name, scale):
    r = residuals(scale)
    ref = scipy_reference(name, scale, r)
    loss = pb.losses.robust(name, scale)
    cost = np.asarray(jax.vmap(loss.value)(jnp.asarray(r)))  # one residual at a time
    grad = np.asarray(jax.grad(loss.value)(jnp.asarray(r)))
    rw, s = (np.asarray(a) for a in loss.whiten(jnp.asarray(r)))
    chex.assert_shape((cost, grad, rw, s), [r.shape] * 4)
    # scipy's soft_l1 form 2 (sqrt(1 + z) - 1) has an absolute error ~ 2 eps C^2 for small z.
    np.testing.assert_allclose(cost, ref["cost"], rtol=1e-12, atol=4 * EPS * scale**2)
    np.testing.assert_allclose(float(loss.value(jnp.asarray(r))), ref["cost"].sum(), rtol=1e-12)
    np.testing.assert_allclose(grad, ref["grad"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(rw * s, ref["grad"], rtol=1e-12, atol=0)  # the slow twin
    # s = sqrt(max(c, EPS)) with c = rho' + 2 rho'' r^2. scipy's c is off by at most err, so
    # the true s lies in [lo, hi]; ours must too (to 1e-12), and rw = rho' r / s with it.
    err = ref["curvature_err"]
    lo = np.sqrt(np.maximum(ref["curvature"] - err, EPS)) * (1 - 1e-12)
    hi = np.sqrt(np.maximum(ref["curvature"] + err, EPS)) * (1 + 1e-12)
    assert np.all((lo <= s) & (s <= hi)), np.max(np.maximum(lo - s, s - hi) / ref["s"])
    assert np.all((lo <= ref["s"]) & (ref["s"] <= hi))  # the bound holds for scipy's own s
    g = np.abs(ref["grad"])
    inside = (g / hi * (1 - 1e-12) <= np.abs(rw)) & (np.abs(rw) <= g / lo * (1 + 1e-12))
    assert np.all(inside & (np.sign(rw) == np.sign(ref["rw"])))
    # The allowance must not make the check vacuous: outside huber's tail (below), most
    # residuals are compared to better than 1e-11 (soft_l1: those below 100 C; beyond, scipy's
    # curvature t^(-1/2) - z t^(-3/2) cancels, and the exact reference below checks ours).
    tight = hi / lo - 1 <= 1e-11
    huber_tail = (name == "huber") & (np.abs(r) > scale)
    assert np.mean(tight[~huber_tail]) > (0.5 if name == "soft_l1" else 0.9)


def test_huber_beyond_the_scale_is_clamped_exactly():
    """There rho' + 2 z rho'' is 0 in exact arithmetic: we clamp 0 to EPS; scipy clamps its
    rounding noise (|.| <= 4 EPS), which is mostly EPS too. s and rw then equal scipy's
    wherever scipy's noise fell below EPS (most of them)."""
    scale = 3.7
    r = residuals(scale, seed=1)
    ref = scipy_reference("huber", scale, r)
    rw, s = (np.asarray(a) for a in pb.losses.huber(scale).whiten(jnp.asarray(r)))
    tail = np.abs(r) > scale
    assert np.all(np.abs(ref["curvature"][tail]) <= 4 * EPS)  # scipy's: rounding noise
    np.testing.assert_array_equal(s[tail], np.sqrt(EPS))
    np.testing.assert_allclose(rw[tail], scale * np.sign(r[tail]) / np.sqrt(EPS), rtol=1e-15)
    clamped = tail & (ref["curvature"] < EPS)
    assert np.mean(clamped[tail]) > 0.9
    np.testing.assert_allclose(s[clamped], ref["s"][clamped], rtol=1e-15)
    np.testing.assert_allclose(rw[clamped], ref["rw"][clamped], rtol=1e-15)


def exact_curvature(name: str, scale: float, r: float) -> float:
    """rho' + 2 z rho'' from the exact float64 r and C, in rational / 50-digit arithmetic."""
    z = (Fraction(r) / Fraction(scale)) ** 2
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        if name == "soft_l1":
            t = decimal.Decimal(z.numerator) / decimal.Decimal(z.denominator) + 1
            return float(1 / (t * t.sqrt()))
    if name == "cauchy":
        return float((1 - z) / (1 + z) ** 2)
    if name == "arctan":
        return float((1 - 3 * z**2) / (1 + z**2) ** 2)
    return float(1 if z <= 1 else 0) if name == "huber" else 1.0


@pytest.mark.parametrize("name", NAMES)
def test_whitening_is_accurate_where_scipys_float64_cancels(name):
    """s^2 = max(rho' + 2 z rho'', EPS) to 1e-13 against an exact reference, far beyond the
    scale included (scipy's float64 soft_l1 curvature is off by 1e-9 there). Only next to a
    zero of rho' + 2 z rho'' (cauchy at z = 1, arctan at z^2 = 1/3), where any float64
    formula loses digits, does the tolerance grow, with the condition number."""
    scale = 0.1
    r = residuals(scale, n=200, seed=2)
    _, s = pb.losses.robust(name, scale).whiten(jnp.asarray(r))
    exact = np.array([exact_curvature(name, scale, x) for x in r])
    rho = scipy_reference(name, scale, r)
    cond = rho["curvature_err"] / (4 * EPS) / np.maximum(np.abs(exact), EPS)
    tol = 1e-13 + 4 * EPS * cond
    got = np.asarray(s) ** 2
    want = np.maximum(exact, EPS)
    assert np.all(np.abs(got - want) <= tol * want), np.max(np.abs(got - want) / (tol * want))


@pytest.mark.parametrize("name", NAMES)
def test_float32_works_and_stays_finite_far_beyond_the_scale(name):
    r64 = np.concatenate([residuals(2.0, n=60, seed=3), [1e30, -1e30]])
    loss = pb.losses.robust(name, 2.0)
    r32 = jnp.asarray(r64, jnp.float32)
    rw, s = loss.whiten(r32)
    grad = jax.grad(loss.value)(r32)
    per_residual = jax.vmap(loss.value)(r32)
    assert {rw.dtype, s.dtype, grad.dtype, per_residual.dtype} == {jnp.dtype(jnp.float32)}
    if name == "linear":
        return  # 1/2 r^2 overflows float32 for |r| > 2e19: least squares is not robust
    chex.assert_tree_all_finite((rw, s, grad, per_residual))
    np.testing.assert_allclose(rw * s, grad, rtol=1e-6)
    # Where float64 is finite too, float32 agrees to its precision.
    rw64, s64 = loss.whiten(jnp.asarray(r64))
    np.testing.assert_allclose(grad, rw64 * s64, rtol=1e-6, atol=1e-37)
    np.testing.assert_allclose(s, s64, rtol=1e-5, atol=2 * np.sqrt(np.finfo(np.float32).eps))
    np.testing.assert_allclose(per_residual, jax.vmap(loss.value)(jnp.asarray(r64)), rtol=1e-5)
    # At the top of float32 the gradient and whitening stay finite and exact (rho' r = C for
    # huber), though the cost of the residual alone may exceed float32 (huber, soft_l1).
    top = jnp.asarray([3e38, -3e38], jnp.float32)
    rw, s = loss.whiten(top)
    grad = jax.grad(loss.value)(top)
    chex.assert_tree_all_finite((rw, s, grad))
    np.testing.assert_allclose(rw * s, grad, rtol=1e-6, atol=1e-37)
    if name in ("huber", "soft_l1"):
        np.testing.assert_allclose(grad, [2.0, -2.0], rtol=1e-6)


def test_pytree_residuals_and_no_recompile():
    loss = pb.losses.cauchy(0.5)
    tree = {"a": jnp.array([0.1, -2.0]), "b": (jnp.array(3.0), jnp.ones((2, 2)))}
    flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])
    np.testing.assert_allclose(loss.value(tree), loss.value(flat), rtol=1e-15)
    rw, s = loss.whiten(tree)
    assert jax.tree.structure(rw) == jax.tree.structure(s) == jax.tree.structure(tree)
    rw_flat, s_flat = loss.whiten(flat)
    np.testing.assert_allclose(
        jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(rw)]), rw_flat
    )
    np.testing.assert_allclose(jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(s)]), s_flat)
    # An equal loss made again is the same object: a static jit argument does not recompile.
    assert pb.losses.cauchy(0.5) is loss and pb.losses.robust("cauchy", 0.5) is loss
    jitted = jax.jit(lambda r, loss: loss.whiten(r), static_argnums=1)
    assert_compiles_once(jitted, flat, pb.losses.cauchy(0.5))
    assert count_compiles(jitted, flat, pb.losses.robust("cauchy", 0.5)) == 0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("tukey", 1.0), "unknown loss 'tukey'"),
        (("huber", 0.0), "scale must be a finite number > 0"),
        (("huber", -1.0), "got -1.0"),
        (("cauchy", float("nan")), "got nan"),
        (("soft_l1", float("inf")), "got inf"),
        (("arctan", True), "got True"),
        (("arctan", "1"), "finite number"),
    ],
)
def test_bad_configuration_raises(args, match):
    with pytest.raises(ValueError, match=match):
        pb.losses.robust(*args)


def test_bad_residuals_and_traced_scale_raise():
    with pytest.raises(ValueError, match="expected float residuals"):
        pb.losses.huber().value(jnp.arange(3))
    with pytest.raises(ValueError, match="concrete number"):
        jax.jit(lambda c: pb.losses.huber(c).value(jnp.ones(2)))(1.0)


def problem(seed: int = 1):
    """y = a exp(-b t) + c with noise and every seventh point an outlier of size 1-3."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 3.0, 40)
    y = 2.5 * np.exp(-1.3 * t) + 0.5 + 0.02 * rng.normal(size=t.size)
    y[::7] += rng.choice([-1.0, 1.0], y[::7].size) * rng.uniform(1.0, 3.0, y[::7].size)
    return t, y


def model_residuals(x, t, y):
    return x[0] * jnp.exp(-x[1] * t) + x[2] - y


def lm_twin(loss, x, t, y, max_steps=300):
    """A plain Levenberg-Marquardt loop on the whitened problem (the slow twin of the
    solvers): (J'^T J' + lam I) delta = -J'^T rw with J' = diag(s) J.

    Normal equations on purpose: a clamped residual (s = sqrt(EPS)) has rw ~ rho' r / 1e-8, and
    a QR or lstsq of the stacked [J'; sqrt(lam) I] rounds Q^T rw at EPS ||rw||, which limits
    the step to ~1e-8, whereas J'^T rw = J^T (rho' r) is the exact gradient. Ties are accepted
    (<=): near the minimum the decrease is below the cost's rounding.
    """
    lam = 1e-3
    for _ in range(max_steps):
        step, decreases = _lm_trial(x, lam, t, y, loss)
        if decreases:
            x, lam = x + step, lam / 3
        else:
            lam *= 2
        if np.max(np.abs(np.asarray(step))) <= 1e-15 * (1 + np.max(np.abs(np.asarray(x)))):
            break
    return x


@functools.partial(jax.jit, static_argnums=4)
def _lm_trial(x, lam, t, y, loss):
    rw, s = loss.whiten(model_residuals(x, t, y))
    jac = s[:, None] * jax.jacfwd(model_residuals)(x, t, y)
    step = jnp.linalg.solve(jac.T @ jac + lam * jnp.eye(x.size), -jac.T @ rw)
    cost = lambda x: loss.value(model_residuals(x, t, y))  # noqa: E731
    return step, cost(x + step) <= cost(x)


def newton_polish(cost, x, steps=6):
    """Newton's method on the exact cost: the stationary point next to x, to rounding."""
    for _ in range(steps):
        x = x - jnp.linalg.solve(jax.hessian(cost)(x), jax.grad(cost)(x))
    return x


@pytest.mark.parametrize("scale", [0.1, 1.0])
@pytest.mark.parametrize("name", ["huber", "soft_l1", "cauchy", "arctan"])
def test_reweighted_gauss_newton_reaches_scipys_minimiser(name, scale):
    """The whitening's GN model 1/2 ||rw + diag(s) J delta||^2 drives a plain LM loop to
    scipy's minimiser. scipy stops on ftol with a gradient of 1e-9 to 5e-8 (the cost's
    rounding hides smaller decreases), so both answers are compared with that minimiser
    polished by Newton's method on the cost, which equals scipy's to 1e-12 (above)."""
    t, y = problem()
    loss = pb.losses.robust(name, scale)
    cost = lambda x: loss.value(model_residuals(x, t, y))  # noqa: E731
    ref = least_squares(
        lambda x: np.asarray(model_residuals(x, t, y)),
        [1.0, 1.0, 0.0],
        loss=name,
        f_scale=scale,
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
    )
    x_star = newton_polish(cost, jnp.asarray(ref.x))
    assert np.max(np.abs(jax.grad(cost)(x_star))) < 1e-12
    np.testing.assert_allclose(ref.x, x_star, rtol=1e-7)  # scipy's own stopping accuracy
    x = lm_twin(loss, jnp.array([1.0, 1.0, 0.0]), t, y)
    np.testing.assert_allclose(x, x_star, rtol=1e-8, atol=1e-10)
    assert np.max(np.abs(jax.grad(cost)(x))) < 1e-8
