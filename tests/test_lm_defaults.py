"""Levenberg-Marquardt's damping options and defaults (issue 11 item 2; benchmarks/lm_defaults.py).

float64 (conftest). The geodesic step is checked against its slow twin: dense J, a central
finite difference for r_vv, and numpy solves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nets_zoo import ZOO, N
from zoo import PROBLEMS

import paribus as pb
from paribus.solvers import _damping

BY_NAME = {p.name: p for p in PROBLEMS}


def residual_fn_of(problem):
    return lambda x, batch: problem.residuals(x)


def test_geodesic_step_is_velocity_plus_half_acceleration():
    """delta = v + a / 2, v = -(J^T J + lam I)^-1 J^T r, a = -(J^T J + lam I)^-1 J^T r_vv."""
    problem = BY_NAME["rosenbrock"]
    x0 = jnp.array(problem.x0)
    # Monotone LM's step, explicitly (watchdog="auto" would take a Gauss-Newton trial: R = P).
    opt = pb.levenberg_marquardt(geodesic=10.0, init_damping=1.0, watchdog=None)
    step, state = opt.update(
        None, opt.init(x0), x0, residual_fn=residual_fn_of(problem), batch=None
    )
    assert bool(state.step_info.accepted)

    r = np.asarray(problem.residuals(x0))
    J = np.asarray(jax.jacfwd(problem.residuals)(x0))
    lam = 1.0 * np.max(np.sum(J**2, axis=0))
    A = J.T @ J + lam * np.eye(2)
    v = -np.linalg.solve(A, J.T @ r)
    h = 1e-4
    f = lambda t: np.asarray(problem.residuals(x0 + t * jnp.asarray(v)))  # noqa: E731
    r_vv = (f(h) - 2 * f(0.0) + f(-h)) / h**2
    a = -np.linalg.solve(A, J.T @ r_vv)
    np.testing.assert_allclose(np.asarray(step), v + a / 2, rtol=1e-6)


def test_geodesic_rejects_a_step_that_bends_too_far():
    problem = BY_NAME["rosenbrock"]
    x0 = jnp.array(problem.x0)
    opt = pb.levenberg_marquardt(geodesic=1e-6, init_damping=1.0, watchdog=None)
    step, state = opt.update(
        None, opt.init(x0), x0, residual_fn=residual_fn_of(problem), batch=None
    )
    assert not bool(state.step_info.accepted)
    assert float(state.step_info.gain_ratio) == -np.inf
    np.testing.assert_array_equal(np.asarray(step), 0.0)
    assert float(state.damping) > 1.0 * float(state.step_info.damping)


@pytest.mark.parametrize("name", ["bard", "meyer", "osborne1", "brown_dennis"])
def test_geodesic_reaches_the_known_minimum(name):
    problem = BY_NAME[name]
    result = pb.fit(residual_fn_of(problem), jnp.array(problem.x0),
                    pb.levenberg_marquardt(geodesic=0.75), None, max_steps=500)  # fmt: skip
    f = 2 * result.history.loss[-1]
    assert any(abs(f - m) <= 1e-6 * abs(m) for m in problem.minima), (f, result.stop_reason)
    assert np.all(
        np.diff(result.history.loss) <= 24 * np.finfo(float).eps * result.history.loss[:-1]
    )


@pytest.mark.parametrize("geodesic", [0.0, -1.0])
def test_geodesic_must_be_positive(geodesic):
    with pytest.raises(ValueError, match="geodesic"):
        pb.levenberg_marquardt(geodesic=geodesic)


def test_geodesic_refuses_a_robust_loss():
    problem = BY_NAME["bard"]
    opt = pb.levenberg_marquardt(geodesic=0.75, loss=pb.losses.huber(0.1))
    x0 = jnp.array(problem.x0)
    with pytest.raises(ValueError, match="geodesic"):
        opt.update(None, opt.init(x0), x0, residual_fn=residual_fn_of(problem), batch=None)


def test_delayed_gratification_rule():
    """lam / 3 on every accepted step whatever rho, lam * 2 on every rejection."""
    rule = _damping.RULES["delayed"]
    lam, nu, radius = jnp.asarray(1.0), jnp.asarray(2.0), jnp.asarray(1.0)
    for rho, accepted, expected in [(0.9, True, 1 / 3), (0.01, True, 1 / 3), (-1.0, False, 2)]:
        new, _, _ = rule.update(lam, nu, radius, jnp.asarray(rho), jnp.asarray(accepted), 1.0)
        np.testing.assert_allclose(float(new), expected)


def n_less_than_p(seed):
    """1-32-1 tanh (P = 97) on 10 points of sin(3x): benchmarks/lm_defaults.py's N < P case."""
    init, apply = pb.nets.mlp([1, 32, 1], "tanh")
    xs = jnp.linspace(-1, 1, 10)[:, None]
    params = init(jax.random.split(jax.random.key(0), 5)[seed])
    return pb.regression_residuals(apply), params, (xs, jnp.sin(3 * xs))


@pytest.mark.parametrize(
    ("options", "max_trials"),
    [
        ({"watchdog": 8}, 10),  # measured 7 (seed 0), as Gauss-Newton
        ({"watchdog": "auto"}, 10),  # the watchdog, as R = 10 < P = 97
        ({}, 10),  # the default: "auto"
        # Monotone: 158 with XLA's full compile, 184 with its quick one (pb.fit's choice at
        # max_steps 180-250): the crawl along the kernel's 1e-11 eigenvalues amplifies rounding.
        ({"watchdog": None}, 250),
        ({"init_damping": 1e-6, "geodesic": 0.75, "watchdog": None}, 30),  # 19 (38 evaluations)
    ],
)
def test_n_less_than_p_interpolates(options, max_trials):
    """Over-parameterised (N < P): loss < 1e-20 within the measured trials plus a margin."""
    residual_fn, params, batch = n_less_than_p(0)
    result = pb.fit(residual_fn, params, pb.levenberg_marquardt(**options), batch,
                    max_steps=max_trials, target_loss=1e-20)  # fmt: skip
    assert result.stop_reason == "target_loss", (result.steps, result.history.loss[-1])


def test_watchdog_first_step_is_gauss_newtons():
    """The first trial (lam = 1e-9 lam0) is J^-1 r's step: numpy's least squares on dense J."""
    problem = BY_NAME["powell_singular"]
    x0 = jnp.array(problem.x0) * 10
    opt = pb.levenberg_marquardt(watchdog=8)
    step, state = opt.update(None, opt.init(x0), x0, residual_fn=residual_fn_of(problem),
                             batch=None)  # fmt: skip
    J = np.asarray(jax.jacfwd(problem.residuals)(x0))
    gn = -np.linalg.lstsq(J, np.asarray(problem.residuals(x0)), rcond=None)[0]
    np.testing.assert_allclose(np.asarray(step), gn, rtol=1e-7)
    assert int(state.excursion) == 8 and float(state.anchor_loss) == float(state.step_info.loss)


def test_a_failed_excursion_returns_to_its_anchor():
    """Brown-Dennis from 10 x0: Gauss-Newton's steps go up 300-fold and stay above the start;
    after ``watchdog`` = 2 trials the update returns theta to x0 exactly (to the rounding of
    x + (x0 - x)), and LM is monotone from there (one failure ends the excursions)."""
    problem = BY_NAME["brown_dennis"]
    x0 = 10 * jnp.array(problem.x0)
    result = pb.fit(residual_fn_of(problem), x0, pb.levenberg_marquardt(watchdog=2), None,
                    max_steps=40)  # fmt: skip
    loss = result.history.loss
    assert loss[1] > 100 * loss[0] and loss[2] > loss[0]  # two uphill trials taken
    np.testing.assert_allclose(loss[3], loss[0], rtol=1e-12)
    assert np.all(np.diff(loss[3:]) <= 1e3 * np.finfo(float).eps * loss[3:-1])
    assert int(result.state.opt_state.failures) == 1
    assert loss[-1] < 1e-3 * loss[0]


def test_watchdog_after_a_non_finite_first_trial_starts_from_lam0():
    """A NaN Gauss-Newton trial starts no excursion: the next trial is ordinary LM's, at
    lam0 = 1e-3 max diag(J^T J) (not 1e-9 of it)."""
    residual_fn = lambda p, b: jnp.sqrt(p) - 1.0  # noqa: E731
    params = jnp.array([100.0])
    opt = pb.levenberg_marquardt(watchdog=8)
    step, state = opt.update(None, opt.init(params), params, residual_fn=residual_fn, batch=None)
    assert not bool(state.step_info.accepted) and float(step[0]) == 0.0
    assert int(state.excursion) == 0 and int(state.failures) == 0
    np.testing.assert_allclose(float(state.damping), 1e-3 * (0.5 / 10.0) ** 2, rtol=1e-12)


@pytest.mark.parametrize("watchdog", [0, -1, 2.5, "8", "Auto", True])
def test_watchdog_must_be_a_positive_int(watchdog):
    with pytest.raises(ValueError, match="watchdog must be None, 'auto' or an int >= 1"):
        pb.levenberg_marquardt(watchdog=watchdog)


@pytest.mark.parametrize(
    ("name", "twin"),
    [
        ("rosenbrock", 8),  # R = P = 2: a system of equations, the watchdog's
        ("powell_badly_scaled", 8),
        ("helical_valley", 8),  # R = P = 3
        ("bard", None),  # R = 15 > P = 3: monotone LM
        ("brown_dennis", None),  # R = 20 > P = 4
    ],
)
def test_auto_watchdog_on_the_classic_problems(name, twin):
    """watchdog="auto" runs exactly as its explicit twin: watchdog=8 where
    R <= P (here R = P: systems of equations), watchdog=None where R > P (same losses, trial
    for trial, from x0 and 10 x0)."""
    problem = BY_NAME[name]
    for x0 in (jnp.array(problem.x0), 10 * jnp.array(problem.x0)):
        runs = [
            pb.fit(residual_fn_of(problem), x0, opt, None, max_steps=60).history.loss
            for opt in (
                pb.levenberg_marquardt(watchdog="auto"),
                pb.levenberg_marquardt(watchdog=twin),
            )
        ]
        np.testing.assert_array_equal(*runs)
    other = pb.levenberg_marquardt(watchdog=None if twin else 8)
    other = pb.fit(residual_fn_of(problem), x0, other, None, max_steps=60).history.loss
    assert not np.array_equal(runs[0], other)  # the twins differ: the test can tell them apart


@pytest.mark.parametrize(("n_points", "twin"), [(10, 8), (200, None)])
def test_auto_watchdog_on_networks_follows_r_against_p(n_points, twin):
    """The 1-32-1 network (P = 97): on with R = 10 < P (as watchdog=8), off with R = 200 > P
    (as watchdog=None), trial for trial."""
    residual_fn, params, _ = n_less_than_p(1)
    xs = jnp.linspace(-1, 1, n_points)[:, None]
    batch = (xs, jnp.sin(3 * xs))
    runs = [
        pb.fit(residual_fn, params, opt, batch, max_steps=20).history.loss
        for opt in (
            pb.levenberg_marquardt(watchdog="auto"),
            pb.levenberg_marquardt(watchdog=twin),
            pb.levenberg_marquardt(watchdog=None if twin else 8),
        )
    ]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["equinox", "flax"])
def test_auto_watchdog_on_modules_users_bring(name, dtype):
    """Equinox and Flax NNX modules: "auto" (the default) is watchdog=8 trial for trial with
    R = 2 N < P in float64, and watchdog=None with R > P (the shapes are read through the
    module's own parameter pytree) and in float32 (Gauss-Newton's step there is decided by
    rounding where R < P)."""
    apply, params, xs = ZOO[name](dtype=dtype)
    n_params = sum(np.size(p) for p in jax.tree.leaves(params))
    below = 8 if dtype == jnp.float64 else None
    for n, twin in ((N, below), (n_params, None)):  # R = 2 N: below P, then above it
        inputs = jax.random.normal(jax.random.key(n), (n, *xs.shape[1:]), dtype)
        batch = (inputs, jnp.sin(jnp.arange(2 * n, dtype=dtype).reshape(n, 2)))
        runs = [
            pb.fit(pb.regression_residuals(apply), params, opt, batch, max_steps=12).history.loss
            for opt in (
                pb.levenberg_marquardt(),
                pb.levenberg_marquardt(watchdog=twin),
                pb.levenberg_marquardt(watchdog=None if twin else 8),
            )
        ]
        assert runs[0].dtype == dtype
        np.testing.assert_array_equal(runs[0], runs[1])
        assert not np.array_equal(runs[0], runs[2]), (n, twin)


def test_watchdog_judges_the_anchor_on_the_current_batch():
    """Minibatches: an excursion started on batch A is judged on batch B by the anchor's
    loss on B, measured again (its slow twin: 1/2 ||r(anchor, B)||^2 by hand), not by the
    loss on A stored when it started."""
    problem = BY_NAME["brown_dennis"]  # Gauss-Newton's first step goes up 300-fold
    x0 = 10 * jnp.array(problem.x0)
    residual_fn = lambda x, w: w * problem.residuals(x)  # noqa: E731  the batch weighs r
    opt = pb.levenberg_marquardt(watchdog=8)
    step, state = opt.update(None, opt.init(x0), x0, residual_fn=residual_fn, batch=1.0)
    assert int(state.excursion) == 8  # started on batch A (w = 1) at x0
    on_a = float(state.anchor_loss)
    x1 = x0 + step
    step, state = opt.update(None, state, x1, residual_fn=residual_fn, batch=3.0)
    on_b = 0.5 * float(jnp.sum((3.0 * problem.residuals(x0)) ** 2))
    np.testing.assert_allclose(float(state.anchor_loss), on_b, rtol=1e-12)
    assert abs(on_b - on_a) > 1.0 * on_a  # stored and current differ 9-fold


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(ZOO))
def test_watchdog_on_the_networks_users_bring(name, dtype):
    """Closure, Equinox, Flax NNX, CNN, attention, RNN and pb.nets (N = 6, R = 12 < P), float64
    and float32: the watchdog's runs stay finite, undo every rise of L within watchdog + 1
    updates (an excursion succeeds or returns to its anchor) and end below L_0. After an
    excursion's first (uphill) step each step lowers L until L is below the anchor's, or the
    next update returns theta to the anchor (L back at the anchor's to rounding).
    (Whether it is faster there is benchmarks/lm_watchdog_nets.py's question.)"""
    apply, params, xs = ZOO[name](dtype=dtype)
    batch = (xs, jnp.sin(jnp.arange(2 * N, dtype=dtype).reshape(N, 2)))
    result = pb.fit(pb.regression_residuals(apply), params, pb.levenberg_marquardt(watchdog=8),
                    batch, max_steps=40)  # fmt: skip
    loss = np.asarray(result.history.loss, float)
    assert np.all(np.isfinite(loss)) and loss[-1] < loss[0]
    rounding = 1e3 * np.finfo(dtype).eps
    best = np.minimum.accumulate(loss)
    for k in range(len(loss) - 9):
        assert np.min(loss[k + 1 : k + 10]) <= best[k] * (1 + rounding), k
    rises = np.nonzero(loss[1:] > loss[:-1] * (1 + rounding))[0]
    for k in rises:  # an excursion from theta_k (anchor L_k) took its first step
        j = k + 2
        while j < len(loss) and loss[j - 1] >= loss[k] and j <= k + 9:
            if not loss[j] < loss[j - 1]:  # a trial that does not lower L: back to the anchor
                np.testing.assert_allclose(loss[j], loss[k], rtol=rounding, err_msg=str(j))
                break
            j += 1


@pytest.mark.parametrize("name", ["equinox", "cnn", "transformer"])
def test_watchdog_is_as_fast_as_gauss_newton_where_it_works(name):
    """Where Gauss-Newton converges (N = 6 < P, float64; benchmarks/lm_watchdog_nets.py), the
    default's watchdog follows it: L <= 1e-20 L_0 in no more trials than GN (measured 8, 6
    and 8; monotone LM 10, 7 and 12)."""
    apply, params, xs = ZOO[name]()
    s = jnp.sum(xs.reshape(N, -1), axis=1, keepdims=True)
    batch = (xs, jnp.concatenate([jnp.sin(s), jnp.cos(2 * s)], axis=1))
    reached = []
    for opt in (pb.gauss_newton(), pb.levenberg_marquardt()):
        result = pb.fit(pb.regression_residuals(apply), params, opt, batch, max_steps=30,
                        grad_tol=0.0, target_loss=0.0)  # fmt: skip
        loss = np.asarray(result.history.loss, float)
        hits = np.nonzero(loss <= 1e-20 * loss[0])[0]
        assert hits.size, (name, loss[-1] / loss[0])
        reached.append(int(hits[0]))
    gn, watchdog = reached
    assert watchdog <= gn, reached


def test_an_excursion_whose_steps_grow_returns_to_its_anchor(monkeypatch):
    """A 3-8-8-2 MLP, N = 32 (R = 64 < P = 122), solve="cg": Gauss-Newton's excursion from the
    start takes steps of 111, 6e4, 2e7 and 8e8, each lowering L, into saturated tanh units
    (||theta|| 8e8), where the gradient vanishes and pb.fit stopped "converged" at L = 12.
    With steps limited to WATCHDOG_STEP_GROWTH (4x) the last, the excursion returns to its
    anchor at the second and LM interpolates the data (L 3e-29 within 30 trials)."""
    import importlib

    from tests.helpers import random_mlp

    lm_module = importlib.import_module("paribus.solvers.levenberg_marquardt")

    params, apply = random_mlp(jax.random.key(0), [3, 8, 8, 2])
    kx, ky = jax.random.split(jax.random.key(1))
    xs = jax.random.normal(kx, (32, 3))
    batch = (xs, jnp.sin(xs[:, :2] * 2.0) + 0.1 * jax.random.normal(ky, (32, 2)))
    residual_fn = pb.regression_residuals(apply)

    def run():
        opt = pb.levenberg_marquardt(solve="cg", cg_max_steps=200)
        return pb.fit(residual_fn, params, opt, batch, max_steps=30)

    def size(result):
        return max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(result.params))

    guarded = run()
    assert guarded.history.loss[-1] < 1e-20 * guarded.history.loss[0] and size(guarded) < 10
    monkeypatch.setattr(lm_module, "WATCHDOG_STEP_GROWTH", float("inf"))
    jax.clear_caches()
    unguarded = run()  # the slow twin: the rule without the guard
    assert unguarded.converged and unguarded.history.loss[-1] > 1.0 and size(unguarded) > 1e6


def test_auto_watchdog_in_float32_is_on_for_systems_of_equations():
    """In float32 "auto" is on where R = P (Rosenbrock, as watchdog=8) and off where R < P (the
    1-32-1 network on 10 points, as watchdog=None), trial for trial."""
    rosenbrock = BY_NAME["rosenbrock"]
    x0 = jnp.array(rosenbrock.x0, jnp.float32)
    net_fn, net_params, (xs, ys) = n_less_than_p(0)
    net_params = jax.tree.map(lambda p: p.astype(jnp.float32), net_params)
    net_batch = (xs.astype(jnp.float32), ys.astype(jnp.float32))
    for fn, params, batch, twin, other in (
        (residual_fn_of(rosenbrock), x0, None, 8, None),
        (net_fn, net_params, net_batch, None, 8),
    ):
        runs = [
            pb.fit(fn, params, pb.levenberg_marquardt(watchdog=w), batch, max_steps=20).history.loss
            for w in ("auto", twin, other)
        ]
        assert runs[0].dtype == jnp.float32
        np.testing.assert_array_equal(runs[0], runs[1])
        assert not np.array_equal(runs[0], runs[2])
