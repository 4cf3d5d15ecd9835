"""pb.fit: one jitted loop for Gauss-Newton, LM and first-order optax optimisers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import paribus as pb
from paribus.fit import STOP_REASONS
from paribus.fit import run as fit_run


def sqrt_residuals(params, batch):
    del batch
    return jnp.sqrt(params) - 1.0


def sine_problem(n=6, sizes=(1, 8, 1), seed=0):
    init, apply = pb.nets.mlp(list(sizes))
    xs = jnp.linspace(-1, 1, n)[:, None]
    # per_example without .apply: the generic per-example Jacobian (the structured path has
    # its own tests and is used by the benchmarks).
    residual_fn = pb.per_example(lambda p, ex: apply(p, ex[0]) - ex[1])
    return init(jax.random.key(seed)), residual_fn, (xs, jnp.sin(3 * xs))


def test_sqrt_from_outside_the_domain_converges():
    """r(x) = sqrt(x) - 1 from x = 100: the first trials leave the domain (NaN), are rejected."""
    result = pb.fit(sqrt_residuals, jnp.array([100.0]), pb.levenberg_marquardt(), None,
                    max_steps=100)  # fmt: skip
    np.testing.assert_allclose(result.params, [1.0], rtol=1e-12)
    hist = result.history
    assert not hist.accepted[1], "the first trial from x = 100 leaves the domain"
    assert np.isneginf(hist.gain_ratio[1])
    assert np.all(np.isfinite(hist.loss)) and np.all(np.isfinite(hist.damping[1:]))
    assert result.stop_reason in ("gradient", "step")
    assert hist.loss.shape == (result.steps + 1,)
    assert hist.loss[0] == pytest.approx(0.5 * 81)


@pytest.mark.parametrize("make", [pb.levenberg_marquardt, pb.gauss_newton])
def test_overparameterised_mlp_reaches_tiny_loss(make):
    params, residual_fn, batch = sine_problem()
    result = pb.fit(residual_fn, params, make(), batch, max_steps=200)
    assert result.history.loss[-1] < 1e-10
    assert np.all(np.isfinite(result.history.loss))
    assert set(result.history.solve_form[1:]) == {pb.solvers.FORMS.index("dual")}


def test_first_order_optimiser_history():
    params, residual_fn, batch = sine_problem()
    result = pb.fit(residual_fn, params, optax.adam(1e-2), batch, max_steps=30)
    hist = result.history
    assert result.steps == 30 and result.stop_reason == "max_steps"
    assert hist.loss.shape == (31,) and hist.loss[-1] < hist.loss[0]
    assert np.all(hist.solve_form == -1) and np.all(hist.accepted[1:])
    np.testing.assert_allclose(hist.loss[0], pb.loss(residual_fn, params, batch))


def test_target_loss_stops():
    params, residual_fn, batch = sine_problem()
    result = pb.fit(residual_fn, params, pb.levenberg_marquardt(), batch, max_steps=200,
                    target_loss=1e-3)  # fmt: skip
    assert result.stop_reason == "target_loss"
    assert result.history.loss[-1] <= 1e-3 < result.history.loss[-2]


def test_stop_reason_names():
    assert set(STOP_REASONS) == {
        "max_steps", "gradient", "step", "target_loss", "non_finite", "damping_limit",
    }  # fmt: skip
    assert callable(fit_run)
