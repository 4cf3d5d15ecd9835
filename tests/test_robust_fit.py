"""pb.fit with a robust loss against scipy.optimize.least_squares(loss=..., f_scale=...), float64.

Needs the solver integration of ResidualLoss (pb.levenberg_marquardt(loss=...), pb.fit(loss=...)
with residual_fn returning residuals, not (outputs, targets)): the GN model of the robust cost
is 1/2 ||rw + diag(s) J delta||^2 with (rw, s) = loss.whiten(r), and the loss is
loss.value(r).

scipy stops on ftol with a gradient of 1e-9 to 5e-8 (its cost's rounding hides smaller
decreases), so the fit is compared with scipy's minimiser polished by Newton's method on the
cost (which equals scipy's cost to 1e-12: tests/test_robust_losses.py), to 1e-8, and with
scipy's own answer to its stopping accuracy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import least_squares

import paribus as pb


def problem(seed: int = 1):
    """y = a exp(-b t) + c with noise and every seventh point an outlier of size 1-3."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 3.0, 40)
    y = 2.5 * np.exp(-1.3 * t) + 0.5 + 0.02 * rng.normal(size=t.size)
    y[::7] += rng.choice([-1.0, 1.0], y[::7].size) * rng.uniform(1.0, 3.0, y[::7].size)
    return jnp.asarray(t), jnp.asarray(y)


def residual_fn(x, batch):
    t, y = batch
    return x[0] * jnp.exp(-x[1] * t) + x[2] - y


def scipy_minimiser(name, scale, batch, x0):
    ref = least_squares(
        lambda x: np.asarray(residual_fn(jnp.asarray(x), batch)),
        np.asarray(x0),
        loss=name,
        f_scale=scale,
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
    )
    loss = pb.losses.robust(name, scale)

    def cost(x):
        return loss.value(residual_fn(x, batch))

    x = jnp.asarray(ref.x)
    for _ in range(6):  # Newton on the exact cost: the stationary point next to scipy's answer
        x = x - jnp.linalg.solve(jax.hessian(cost)(x), jax.grad(cost)(x))
    assert np.max(np.abs(jax.grad(cost)(x))) < 1e-12
    return ref, x, cost


@pytest.mark.parametrize("damping", ["nielsen", "minpack"])
@pytest.mark.parametrize("scale", [0.1, 1.0])
@pytest.mark.parametrize("name", ["huber", "soft_l1", "cauchy", "arctan"])
def test_levenberg_marquardt_matches_scipy(name, scale, damping):
    batch = problem()
    x0 = jnp.array([1.0, 1.0, 0.0])
    ref, x_star, cost = scipy_minimiser(name, scale, batch, x0)
    loss = pb.losses.robust(name, scale)
    opt = pb.levenberg_marquardt(loss=loss, damping=damping)
    result = pb.fit(residual_fn, x0, opt, batch, max_steps=300, loss=loss)
    assert result.stop_reason != "non_finite"
    np.testing.assert_allclose(result.params, x_star, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(result.params, ref.x, rtol=1e-7)  # scipy's stopping accuracy
    # The history is the robust cost, not 1/2 ||r||^2.
    np.testing.assert_allclose(result.history.loss[0], cost(x0), rtol=1e-14)
    np.testing.assert_allclose(cost(result.params), ref.cost, rtol=1e-12)
    assert cost(result.params) <= ref.cost * (1 + 1e-14)


@pytest.mark.parametrize("name", ["huber", "cauchy"])
def test_linear_loss_is_plain_least_squares(name):
    """With loss=linear the fit is the plain fit; with a robust loss the outliers pull less."""
    batch = problem()
    x0 = jnp.array([1.0, 1.0, 0.0])
    plain = pb.fit(residual_fn, x0, pb.levenberg_marquardt(), batch, max_steps=200)
    linear = pb.losses.linear()
    same = pb.fit(
        residual_fn, x0, pb.levenberg_marquardt(loss=linear), batch, max_steps=200, loss=linear
    )
    np.testing.assert_allclose(same.params, plain.params, rtol=1e-10)
    robust = pb.losses.robust(name, 0.1)
    fitted = pb.fit(
        residual_fn, x0, pb.levenberg_marquardt(loss=robust), batch, max_steps=300, loss=robust
    )
    truth = np.array([2.5, 1.3, 0.5])
    assert np.linalg.norm(fitted.params - truth) < 0.5 * np.linalg.norm(plain.params - truth)


def test_float32_fit_runs_and_is_close():
    batch = jax.tree.map(lambda a: a.astype(jnp.float32), problem())
    loss = pb.losses.huber(0.1)
    _, x_star, _ = scipy_minimiser("huber", 0.1, problem(), jnp.array([1.0, 1.0, 0.0]))
    result = pb.fit(
        residual_fn,
        jnp.array([1.0, 1.0, 0.0], jnp.float32),
        pb.levenberg_marquardt(loss=loss),
        batch,
        max_steps=300,
        loss=loss,
    )
    assert result.params.dtype == jnp.float32 and result.stop_reason != "non_finite"
    np.testing.assert_allclose(result.params, x_star, rtol=1e-3)
