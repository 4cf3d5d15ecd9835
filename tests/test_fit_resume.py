"""pb.fit resumes exactly from result.state, and max_steps does not recompile the loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import count_compiles

import paribus as pb
from paribus._fit import CHUNK


def sine_problem(n=6, sizes=(1, 8, 1), seed=0):
    init, apply = pb.nets.mlp(list(sizes))
    xs = jnp.linspace(-1, 1, n)[:, None]
    return init(jax.random.key(seed)), pb.regression_residuals(apply), (xs, jnp.sin(3 * xs))


PARAMS, RESIDUAL_FN, BATCH = sine_problem()
# Minibatches of 2 of the 6 examples: the schedule follows the step counter across a resume.
INDICES = np.array([[0, 3], [1, 4], [2, 5]])


def concatenated(first, second):
    """The history of two consecutive runs as one: the second starts where the first ended."""
    return jax.tree.map(lambda a, b: np.concatenate([a, b[1:]]), first.history, second.history)


CASES = {
    # name: (optimiser, k, extra fit arguments); 2 k steps never stop early.
    "levenberg_marquardt": (pb.levenberg_marquardt, 4, {}),
    "gauss_newton": (pb.gauss_newton, 3, {}),
    # 2 k = 300 crosses a chunk boundary of the single run.
    "adam_minibatches": (lambda: optax.adam(1e-2), 150, {"batch_indices": INDICES}),
}


@pytest.mark.parametrize("name", CASES)
def test_k_steps_twice_equal_2k_steps_once(name):
    make, k, extra = CASES[name]
    opt = make()
    once = pb.fit(RESIDUAL_FN, PARAMS, opt, BATCH, max_steps=2 * k, **extra)
    first = pb.fit(RESIDUAL_FN, PARAMS, opt, BATCH, max_steps=k, **extra)
    second = pb.fit(RESIDUAL_FN, first.params, opt, BATCH, max_steps=k, state=first.state,
                    **extra)  # fmt: skip
    assert once.stop_reason == second.stop_reason == "max_steps"
    assert first.steps == second.steps == k and once.steps == 2 * k
    assert int(second.state.step) == 2 * k
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12),
                 second.params, once.params)  # fmt: skip
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12),
                 second.state.opt_state, once.state.opt_state)  # fmt: skip
    joined = concatenated(first, second)
    for field in ("loss", "grad_norm", "damping", "gain_ratio", "step_norm"):
        np.testing.assert_allclose(getattr(joined, field), getattr(once.history, field),
                                   rtol=1e-12, atol=1e-300, err_msg=field)  # fmt: skip
    np.testing.assert_array_equal(joined.accepted, once.history.accepted)


def test_resume_from_a_bare_optimiser_state():
    """An optax state (not a FitState) is accepted: the loop's own counters start afresh."""
    opt = optax.adam(1e-2)
    state = opt.init(PARAMS)
    result = pb.fit(RESIDUAL_FN, PARAMS, opt, BATCH, max_steps=3, state=state)
    fresh = pb.fit(RESIDUAL_FN, PARAMS, opt, BATCH, max_steps=3)
    np.testing.assert_allclose(result.history.loss, fresh.history.loss, rtol=1e-14)


def test_max_steps_state_and_schedule_position_do_not_recompile():
    opt = optax.adam(1e-2)
    first = pb.fit(RESIDUAL_FN, PARAMS, opt, BATCH, max_steps=2, batch_indices=INDICES)

    def later_calls():
        for max_steps in (1, 7, CHUNK + 5):
            pb.fit(RESIDUAL_FN, PARAMS, opt, BATCH, max_steps=max_steps, batch_indices=INDICES)
        return pb.fit(RESIDUAL_FN, first.params, opt, BATCH, max_steps=4, state=first.state,
                      batch_indices=INDICES).steps  # fmt: skip

    assert count_compiles(later_calls) == 0
    assert later_calls() == 4


def test_traced_run_resumes_too():
    """Under jit the state is an array pytree like any other: resume inside a jitted function."""
    opt = pb.levenberg_marquardt()

    @jax.jit
    def twice(params):
        first = pb.fit(RESIDUAL_FN, params, opt, BATCH, max_steps=3)
        return pb.fit(RESIDUAL_FN, first.params, opt, BATCH, max_steps=3, state=first.state)

    second = twice(PARAMS)
    # Against one jitted run of 6: a host run compiles the loop apart (with XLA's quick
    # settings), and the watchdog's Gauss-Newton steps (on here, R <= P) amplify that rounding
    # to 4e-10.
    once = jax.jit(lambda p: pb.fit(RESIDUAL_FN, p, opt, BATCH, max_steps=6))(PARAMS)
    assert int(second.state.step) == 6 and int(second.steps) == 3
    np.testing.assert_allclose(second.history.loss[:4], once.history.loss[3:], rtol=1e-12)
