"""What a first call of pb.fit compiles: one XLA module (its loop) and only what the form needs.

Reuse of the compiled loop across max_steps, tolerances, starts, states, callbacks and equal
optimisers is tested in test_fit.py, test_fit_resume.py and test_fit_callback.py; these tests
cover the first call itself (benchmarks/compile_time.py measures its time).
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import paribus as pb
from paribus._fit import _run as fit_run

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class _Compiles:
    """Counts XLA backend compilations while active (jax.monitoring has no unregister)."""

    active: list = []

    def __init__(self):
        self.count = 0

    def __enter__(self):
        _Compiles.active.append(self)
        return self

    def __exit__(self, *exc):
        _Compiles.active.remove(self)

    @staticmethod
    def listener(event: str, duration: float, **kwargs) -> None:
        del duration, kwargs
        if event == _BACKEND_COMPILE:
            for counter in _Compiles.active:
                counter.count += 1


jax.monitoring.register_event_duration_secs_listener(_Compiles.listener)


def _exp_data(scale: float = 1.0):
    xs = jnp.linspace(0.0, 4.0, 20)
    return xs, scale * (2.5 * jnp.exp(-1.3 * xs) + 0.5)


def _exp_fit(xs, ys):
    """A new residual function over the data ``xs``, ``ys`` (closed over, no batch)."""

    def residual_fn(p, batch):
        del batch
        return p[0] * jnp.exp(-p[1] * xs) + p[2] - ys

    return residual_fn


@pytest.mark.parametrize(
    "make_opt",
    [pb.levenberg_marquardt, pb.gauss_newton, lambda: optax.adam(1e-2)],
    ids=["lm", "gn", "adam"],
)
def test_a_first_call_compiles_the_loop_and_nothing_else(make_opt):
    """No eager jnp operation around the loop: each would be one more XLA compilation (and a
    trace) on every first call, the cost a loop over many small problems pays each time."""
    x0 = jnp.array([1.0, 1.0, 0.0])
    residual_fn = _exp_fit(*_exp_data())
    with _Compiles() as compiles:
        result = pb.fit(residual_fn, x0, make_opt(), None, max_steps=5)
        jax.block_until_ready(result.params)
    assert compiles.count == 1
    with _Compiles() as compiles:  # the same problem again: nothing at all
        jax.block_until_ready(pb.fit(residual_fn, x0, make_opt(), None, max_steps=7).params)
    assert compiles.count == 0


def test_a_rebuilt_residual_function_reuses_the_loop_and_new_data_does_not():
    """The same code over the same arrays is the same loop; over other arrays (new data closed
    over) it compiles its own, and fits those data, not the compiled constants of the first."""
    xs, ys = _exp_data()
    x0 = jnp.array([1.0, 1.0, 0.0])
    opt = pb.levenberg_marquardt()
    first = pb.fit(_exp_fit(xs, ys), x0, opt, None, max_steps=50)
    size = fit_run._cache_size()
    again = pb.fit(_exp_fit(xs, ys), x0, opt, None, max_steps=50)
    assert fit_run._cache_size() == size
    np.testing.assert_array_equal(again.params, first.params)
    xs2, ys2 = _exp_data(scale=2.0)
    other = pb.fit(_exp_fit(xs2, ys2), x0, opt, None, max_steps=50)
    assert fit_run._cache_size() == size + 1
    np.testing.assert_allclose(other.params, [5.0, 1.3, 1.0], rtol=1e-6)
    np.testing.assert_allclose(first.params, [2.5, 1.3, 0.5], rtol=1e-6)


def _primitives(jaxpr) -> set[str]:
    """Every primitive in a jaxpr, sub-jaxprs (cond branches, loop bodies, pjit) included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


@pytest.mark.parametrize(
    ("opt", "loops"),
    [
        (pb.levenberg_marquardt(solve="primal"), False),
        (pb.levenberg_marquardt(solve="qr"), False),
        (pb.levenberg_marquardt(solve="dual", dual_refine_steps=0), False),
        (pb.levenberg_marquardt(solve="dual"), True),  # the refinement
        (pb.levenberg_marquardt(solve="cg"), True),
        (pb.gauss_newton(solve="primal"), False),
        (pb.gauss_newton(solve="dual"), False),
    ],
    ids=["lm-primal", "lm-qr", "lm-dual-bare", "lm-dual", "lm-cg", "gn-primal", "gn-dual"],
)
def test_a_step_traces_only_what_its_form_needs(opt, loops):
    """A direct form traces no iterative solve: no dual refinement or CG loop in the step
    (each loop is a compiled computation of its own)."""
    xs, ys = _exp_data()
    x0 = jnp.array([1.0, 1.0, 0.0])
    state = opt.init(x0)
    jaxpr = jax.make_jaxpr(
        lambda p, s: opt.update(None, s, p, residual_fn=_exp_fit(xs, ys), batch=None)
    )(x0, state)
    assert ("while" in _primitives(jaxpr.jaxpr)) == loops
