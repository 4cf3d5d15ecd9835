"""pb.line_search against its slow twin: the step sizes along the Gauss-Newton direction tried
one by one in numpy (the direction checked against the dense -pinv(J) r), float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import paribus as pb
from tests.helpers import random_mlp


def problem(seed: int, frequency: float = 3.0):
    params, apply = random_mlp(jax.random.key(seed), [1, 3, 1])
    xs = jnp.linspace(-1.0, 1.0, 12)[:, None]
    return pb.regression_residuals(apply), params, (xs, jnp.sin(frequency * xs))


def dense(residual_fn, params, batch):
    """(J, r, loss_at) with loss_at(v) = 1/2 ||r(theta + v)||^2."""
    flat, unravel = ravel_pytree(params)

    def r(v):
        return residual_fn(unravel(v), batch).reshape(-1)

    def loss_at(v):
        out = np.asarray(r(flat + jnp.asarray(v)))
        return 0.5 * float(out @ out)

    return np.asarray(jax.jacfwd(r)(flat)), np.asarray(r(flat)), loss_at


def slow_line_search(d, g, loss_at, *, method, max_trials=20, shrink=0.5, armijo=1e-4):
    """(eta, accepted): the grid argmin or the first Armijo step size, tried one by one."""
    l0 = loss_at(0 * d)
    sizes = shrink ** np.arange(max_trials)
    losses = [loss_at(eta * d) for eta in sizes]
    if method == "grid":
        best = int(np.argmin(losses))
        return sizes[best], losses[best] < l0
    for eta, loss in zip(sizes, losses, strict=True):
        if loss < l0 and loss <= l0 + armijo * eta * (g @ d):
            return eta, True
    return sizes[-1], False


def one_update(opt, residual_fn, params, batch):
    step, state = opt.update(None, opt.init(params), params, residual_fn=residual_fn, batch=batch)
    return ravel_pytree(step)[0], state


@pytest.mark.parametrize("method", ["grid", "backtracking"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_step_equals_slow_twin_along_the_minimum_norm_gauss_newton_direction(method, seed):
    residual_fn, params, batch = problem(seed)
    J, r, loss_at = dense(residual_fn, params, batch)
    d = np.asarray(one_update(pb.gauss_newton(), residual_fn, params, batch)[0])
    if seed == 0:  # well conditioned: the direction itself is the dense minimum-norm step
        np.testing.assert_allclose(d, -np.linalg.pinv(J) @ r, rtol=1e-8, atol=1e-10)
    eta, accepted = slow_line_search(d, J.T @ r, loss_at, method=method)
    step, state = one_update(pb.line_search(method=method), residual_fn, params, batch)
    info = state.direction_state.step_info
    assert bool(info.accepted) == accepted
    np.testing.assert_allclose(float(state.step_size), eta if accepted else 0.0)
    np.testing.assert_allclose(step, eta * d if accepted else 0 * d, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(float(info.step_norm), eta * np.linalg.norm(d), rtol=1e-7)
    np.testing.assert_allclose(float(info.trial_loss), loss_at(eta * d), rtol=1e-10)
    # The gain ratio of the searched step under the Gauss-Newton model.
    jd = eta * J @ d
    predicted = -(jd @ (r + 0.5 * jd))
    np.testing.assert_allclose(float(info.gain_ratio), (loss_at(0 * d) - loss_at(eta * d))
                               / predicted, rtol=1e-6)  # fmt: skip


def test_shrinks_an_overshooting_gauss_newton_step():
    # sqrt(p) - 1 from p = 100: the full GN step lands at p = -80 (NaN); half of it is taken.
    residual_fn = lambda p, b: jnp.sqrt(p) - 1.0  # noqa: E731
    params = jnp.array([100.0])
    for method, eta in (("backtracking", 0.5), ("grid", 0.5)):
        step, state = one_update(pb.line_search(method=method), residual_fn, params, None)
        np.testing.assert_allclose(float(step[0]), -180.0 * eta)
        assert float(state.step_size) == eta
    result = pb.fit(residual_fn, params, pb.line_search(), None, max_steps=30)
    assert result.converged and abs(float(result.params[0]) - 1.0) < 1e-10


def test_linear_least_squares_full_step_has_gain_ratio_one():
    a = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [2.0, -1.0]])
    y = jnp.array([1.0, 2.0, 2.0, 0.5])
    residual_fn = lambda p, b: b[0] @ p - b[1]  # noqa: E731
    step, state = one_update(pb.line_search(), residual_fn, jnp.zeros(2), (a, y))
    np.testing.assert_allclose(step, np.linalg.lstsq(a, y, rcond=None)[0], rtol=1e-12)
    assert float(state.step_size) == 1.0
    np.testing.assert_allclose(float(state.direction_state.step_info.gain_ratio), 1.0, rtol=1e-10)


def ascent_direction():
    """A Jacobian-based transformation that (wrongly) returns the gradient itself."""

    def init(params):
        nan = jnp.full((), jnp.nan)
        return (pb.solvers.step_info(loss=nan, grad_norm=nan, step_norm=nan),)

    def update(updates, state, params=None, *, residual_fn=None, batch=None, **extra):
        del updates, state, extra
        value, grad = jax.value_and_grad(pb.loss, 1)(residual_fn, params, batch)
        info = pb.solvers.step_info(loss=value, grad_norm=optax.tree.norm(grad),
                                    step_norm=optax.tree.norm(grad))  # fmt: skip
        return grad, (info,)

    return optax.GradientTransformationExtraArgs(init, update)


@pytest.mark.parametrize("method", ["grid", "backtracking"])
def test_no_decrease_is_a_rejection_with_zeros(method):
    residual_fn, params, batch = problem(3)
    opt = pb.line_search(ascent_direction(), method=method, max_trials=8)
    step, state = one_update(opt, residual_fn, params, batch)
    (info,) = state.direction_state
    assert float(jnp.max(jnp.abs(step))) == 0.0 and float(state.step_size) == 0.0
    assert not bool(info.accepted) and float(info.trial_loss) >= float(info.loss)
    assert int(state.trials) == 8
    assert bool(info.at_damping_limit)  # the same trial would come again
    result = pb.fit(residual_fn, params, opt, batch, max_steps=5)
    assert result.steps == 1 and result.stop_reason == "damping_limit"
    assert not result.history.accepted[1] and result.history.loss[1] == result.history.loss[0]


def test_fit_records_the_searched_step_and_converges():
    residual_fn, params, batch = problem(4, frequency=1.0)
    result = pb.fit(residual_fn, params, pb.line_search(method="backtracking"), batch,
                    max_steps=40)  # fmt: skip
    h = result.history
    info = result.state.opt_state.direction_state.step_info
    np.testing.assert_allclose(h.step_norm[result.steps], float(info.step_norm), rtol=1e-12)
    np.testing.assert_allclose(h.gain_ratio[result.steps], float(info.gain_ratio), rtol=1e-12)
    assert (np.diff(h.loss)[h.accepted[1:]] < 0).all()
    assert h.accepted[1:].sum() >= 10 and h.loss[-1] < 0.1 * h.loss[0]


def test_a_first_order_direction_is_refused():
    opt = pb.line_search(optax.adam(1e-3))
    with pytest.raises(ValueError, match="StepInfo"):
        opt.init(jnp.zeros(3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "zoom"}, "method"),
        ({"max_trials": 0}, "max_trials"),
        ({"shrink": 1.0}, "shrink"),
        ({"armijo": 1.0}, "armijo"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pb.line_search(**kwargs)
