"""pb.least_squares: the classic-fit front door (MINPACK's algorithm through pb.fit), float64.

Checked against scipy.optimize.least_squares: the same minimiser and no more evaluations than
MINPACK's lmder to reach it on the MGH problems where the two agree on the path; the robust
losses to scipy's minimiser; and, as a wrapper, equal trial for trial to the pb.fit call it
stands for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import least_squares
from test_robust_fit import problem as outlier_problem
from test_robust_fit import residual_fn as outlier_residual_fn
from test_robust_fit import scipy_minimiser
from zoo import PROBLEMS

import paribus as pb

BY_NAME = {p.name: p for p in PROBLEMS}

# The MGH problems (standard starts) where MINPACK's path is followed to the minimum: the others
# differ where lmpar's inexact par or its pivoted QR changes the path (Powell badly scaled 41
# against 17 evaluations, Biggs EXP6 to the other minimum; benchmarks/lm_defaults.py has all).
SAME_PATH = ["rosenbrock", "beale", "helical_valley", "bard", "gaussian", "meyer", "box_3d",
             "powell_singular", "wood", "brown_dennis", "watson6", "linear_full_rank"]  # fmt: skip


def scipy_lm(residuals, x0):
    """scipy's MINPACK to its tightest tolerances, with 1/2 ||r||^2 at every evaluation."""
    fun = jax.jit(residuals)
    jac = jax.jit(jax.jacfwd(residuals))
    costs = []

    def f(x):
        r = np.asarray(fun(jnp.asarray(x)))
        costs.append(0.5 * r @ r)
        return r

    ref = least_squares(f, np.asarray(x0), lambda x: np.asarray(jac(jnp.asarray(x))),
                        method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15)  # fmt: skip
    return ref, np.asarray(costs)


def first_at(costs, level):
    hits = np.nonzero(np.asarray(costs) <= level)[0]
    return int(hits[0]) if hits.size else None


@pytest.mark.parametrize("name", SAME_PATH)
def test_no_more_evaluations_than_minpack(name):
    p = BY_NAME[name]
    x0 = jnp.asarray(p.x0, jnp.float64)
    result = pb.least_squares(lambda x, _: p.residuals(x), x0)
    ref, costs = scipy_lm(p.residuals, x0)
    assert result.converged, result.stop_reason
    loss = np.asarray(result.history.loss)
    best = min(costs.min(), loss.min())
    level = best * (1 + 1e-9) + 1e-28  # costs[k], loss[k]: after k trials
    k_pb, k_scipy = first_at(loss, level), first_at(costs, level)
    assert k_scipy is not None and k_pb is not None
    assert k_pb <= k_scipy, (k_pb, k_scipy)
    np.testing.assert_allclose(loss[-1], ref.cost, rtol=1e-8, atol=1e-20)
    # The minimiser: to 1e-7 where the minimum is isolated (Powell singular's is degenerate, so
    # scipy's stopping point is 1e-8 from it along a flat direction).
    np.testing.assert_allclose(result.params, ref.x, rtol=1e-6, atol=1e-7)


def test_is_pb_fit_with_minpack_trial_for_trial():
    p = BY_NAME["osborne1"]
    x0 = jnp.asarray(p.x0, jnp.float64)

    def residual_fn(x, batch):
        return p.residuals(x) * batch

    got = pb.least_squares(residual_fn, x0, 2.0)
    want = pb.fit(residual_fn, x0, pb.levenberg_marquardt(damping="minpack"), 2.0,
                  max_steps=100 * (5 + 1))  # fmt: skip
    assert got.steps == want.steps and got.stop_reason == want.stop_reason
    np.testing.assert_array_equal(got.history.loss, want.history.loss)
    np.testing.assert_array_equal(got.history.damping, want.history.damping)
    np.testing.assert_array_equal(got.params, want.params)


@pytest.mark.parametrize("name", ["huber", "soft_l1", "cauchy", "arctan"])
def test_robust_losses_reach_scipys_minimiser(name):
    batch = outlier_problem()
    x0 = jnp.array([1.0, 1.0, 0.0])
    ref, x_star, cost = scipy_minimiser(name, 0.1, batch, x0)
    result = pb.least_squares(outlier_residual_fn, x0, batch, loss=name, f_scale=0.1)
    assert result.converged, result.stop_reason
    np.testing.assert_allclose(result.params, x_star, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(result.history.loss[-1], cost(x_star), rtol=1e-12)
    # A loss object is the same fit as its name.
    again = pb.least_squares(outlier_residual_fn, x0, batch, loss=pb.losses.robust(name, 0.1))
    np.testing.assert_array_equal(again.history.loss, result.history.loss)


def test_linear_by_name_or_object_is_plain_least_squares():
    batch = outlier_problem()
    x0 = jnp.array([1.0, 1.0, 0.0])
    plain = pb.least_squares(outlier_residual_fn, x0, batch)
    by_object = pb.least_squares(outlier_residual_fn, x0, batch, loss=pb.losses.linear())
    np.testing.assert_array_equal(plain.history.loss, by_object.history.loss)
    ref, _ = scipy_lm(lambda x: outlier_residual_fn(x, batch), x0)
    np.testing.assert_allclose(plain.params, ref.x, rtol=1e-7)  # scipy stops 3e-8 short here

    def cost(x):
        return 0.5 * jnp.sum(outlier_residual_fn(x, batch) ** 2)

    x = plain.params
    for _ in range(3):  # Newton on the cost: the stationary point next to the fit
        x = x - jnp.linalg.solve(jax.hessian(cost)(x), jax.grad(cost)(x))
    np.testing.assert_allclose(plain.params, x, rtol=1e-12)


def test_pytree_params_jit_and_vmap_over_starts():
    t = jnp.linspace(0.0, 3.0, 30)
    y = 2.0 * jnp.exp(-1.5 * t) + 0.3

    def residual_fn(x, y):
        return x["a"] * jnp.exp(-x["k"] * t) + x["c"] - y

    starts = {"a": jnp.array([1.0, 3.0, 0.5]), "k": jnp.array([1.0, 0.5, 3.0]),
              "c": jnp.zeros(3)}  # fmt: skip

    @jax.jit
    @jax.vmap
    def solve(x0):
        result = pb.least_squares(residual_fn, x0, y, max_steps=60)
        return result.params, result.converged

    params, converged = solve(starts)
    assert bool(np.all(converged))
    for i in range(3):
        one = pb.least_squares(residual_fn, jax.tree.map(lambda v, i=i: v[i], starts), y)
        for key, value in {"a": 2.0, "k": 1.5, "c": 0.3}.items():
            np.testing.assert_allclose(params[key][i], value, rtol=1e-10)
            np.testing.assert_allclose(one.params[key], value, rtol=1e-10)


def test_float32():
    t = jnp.linspace(0.0, 3.0, 30, dtype=jnp.float32)
    y = 2.0 * jnp.exp(-1.5 * t) + 0.3
    result = pb.least_squares(lambda x, y: x[0] * jnp.exp(-x[1] * t) + x[2] - y,
                              jnp.array([1.0, 1.0, 0.0], jnp.float32), y)  # fmt: skip
    assert result.params.dtype == jnp.float32
    assert result.converged, result.stop_reason
    np.testing.assert_allclose(result.params, [2.0, 1.5, 0.3], rtol=2e-4)


def test_default_max_steps_is_scipys_max_nfev():
    p = BY_NAME["meyer"]  # 116 trials from its standard start
    capped = pb.least_squares(lambda x, _: p.residuals(x), jnp.asarray(p.x0), max_steps=20)
    assert capped.stop_reason == "max_steps" and not capped.converged and capped.steps == 20
    full = pb.least_squares(lambda x, _: p.residuals(x), jnp.asarray(p.x0))
    assert full.converged and full.steps > 100  # under the default 100 (3 + 1) = 400


def test_bad_input_says_what_was_expected():
    def residual_fn(x, _):
        return x - 1.0

    x0 = jnp.zeros(2)
    with pytest.raises(ValueError, match=r"unknown loss 'l2'.*huber"):
        pb.least_squares(residual_fn, x0, loss="l2")
    with pytest.raises(ValueError, match=r"scale"):
        pb.least_squares(residual_fn, x0, loss="huber", f_scale=0.0)
    with pytest.raises(ValueError, match=r"f_scale applies to a loss given by name"):
        pb.least_squares(residual_fn, x0, loss=pb.losses.huber(0.5), f_scale=2.0)
    with pytest.raises(TypeError, match=r"GGN loss.*pb.fit"):
        pb.least_squares(residual_fn, x0, loss=pb.losses.softmax_cross_entropy())
    with pytest.raises(ValueError, match=r"unknown damping"):
        pb.least_squares(residual_fn, x0, damping="moré")
