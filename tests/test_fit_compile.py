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
from nets_zoo import ZOO, N

import paribus as pb
from paribus._fit import _compile

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
    with _Compiles() as compiles:
        again = jax.block_until_ready(pb.fit(_exp_fit(xs, ys), x0, opt, None, max_steps=50))
    assert compiles.count == 0
    np.testing.assert_array_equal(again.params, first.params)
    xs2, ys2 = _exp_data(scale=2.0)
    with _Compiles() as compiles:
        other = jax.block_until_ready(pb.fit(_exp_fit(xs2, ys2), x0, opt, None, max_steps=50))
    assert compiles.count == 1
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


# ------------------------------------------------------------------ XLA's quick settings


@pytest.mark.parametrize(
    "make_opt",
    [pb.levenberg_marquardt, pb.gauss_newton, lambda: optax.adam(1e-2)],
    ids=["lm", "gn", "adam"],
)
def test_quick_and_full_compiles_take_the_same_steps(make_opt):
    """The fast path (XLA's quick settings) and its slow twin (XLA's defaults) take the same
    steps, to rounding in float64: a noisy curve fit run to its minimum, and a few steps on a random
    small network (the two compiles sum in other orders, and a long nonlinear run, or
    Gauss-Newton's undamped solve on a network's ill-conditioned J, amplifies that rounding;
    LM and Adam only there)."""
    xs, ys = _exp_data()
    curve, x0 = _exp_fit(xs, ys + 0.01 * jnp.sin(7 * xs)), jnp.array([1.0, 1.0, 0.0])
    quick, full = (pb.fit(curve, x0, make_opt(), None, max_steps=60, compile_mode=mode)
                   for mode in ("quick", "full"))  # fmt: skip
    # Both converge to the same minimum; the last steps, at rounding level, may differ in
    # number (which rounding-sized step first counts as "not moving theta").
    if make_opt in (pb.levenberg_marquardt, pb.gauss_newton):
        assert quick.converged and full.converged and abs(quick.steps - full.steps) <= 3
    else:  # Adam runs all 60 steps
        assert quick.steps == full.steps == 60
    n = min(quick.steps, full.steps) + 1
    np.testing.assert_allclose(quick.history.loss[:n], full.history.loss[:n], rtol=1e-10)
    np.testing.assert_allclose(quick.params, full.params, rtol=1e-10)
    if make_opt is pb.gauss_newton:
        return
    key_w, key_x = jax.random.split(jax.random.key(7))
    init, apply = pb.nets.mlp([2, 4, 1])  # P = 17 parameters, R = 60 residuals
    xs = jax.random.normal(key_x, (60, 2))
    batch = (xs, jnp.sin(xs[:, :1] * 2.0) + xs[:, 1:] ** 2)
    fn, params = pb.regression_residuals(apply), init(key_w)
    quick, full = (pb.fit(fn, params, make_opt(), batch, max_steps=8, compile_mode=mode)
                   for mode in ("quick", "full"))  # fmt: skip
    assert quick.steps == full.steps == 8
    np.testing.assert_allclose(quick.history.loss, full.history.loss, rtol=1e-11)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
                 quick.params, full.params)  # fmt: skip


def test_auto_compiles_a_small_run_quickly_and_a_large_one_fully():
    """The choice follows the estimated flops: a 3-parameter curve fit's step is tiny (quick
    for any number of steps); a small network's step is quick for a few hundred steps, not for
    a million; a wide network's Jacobian step is never."""
    xs, ys = _exp_data()
    fn = _exp_fit(xs, ys)
    x0 = jnp.array([1.0, 1.0, 0.0])
    flops = _compile.residual_flops(fn, x0, None)
    assert 20 <= flops < 1e3  # a few flops per residual
    assert _compile.run_flops(flops, 3, 20, jacobian=True, steps=1) <= _compile.TINY_STEP_FLOPS
    assert _compile.choose(("exp",), fn, x0, None, 20, True, 10**8) is True
    init, apply = pb.nets.mlp([1, 16, 1])
    net, params = pb.regression_residuals(apply), init(jax.random.key(0))
    batch = (xs[:, None], ys[:, None])
    assert _compile.choose(("net",), net, params, batch, 20, True, 100) is True
    assert _compile.choose(("net",), net, params, batch, 20, True, 10**6) is False
    wide = _compile.run_flops(2 * 512 * 513, 513 * 2 + 1, 512, jacobian=True, steps=1)
    assert wide > _compile.QUICK_FLOPS


def test_a_new_max_steps_does_not_recompile_a_tiny_run_and_compiles_a_crossing_once():
    """max_steps is not a compile-time constant: a curve fit (tiny steps) reuses its loop for
    any max_steps; a small network asked for a long run after a short one compiles the
    full-settings loop once, and then reuses each."""
    xs, ys = _exp_data(scale=3.0)
    x0 = jnp.array([1.0, 1.0, 0.0])
    opt = pb.levenberg_marquardt()
    pb.fit(_exp_fit(xs, ys), x0, opt, None, max_steps=20)
    with _Compiles() as compiles:
        result = pb.fit(_exp_fit(xs, ys), x0, opt, None, max_steps=10**8)
        jax.block_until_ready(result.params)
    assert compiles.count == 0 and result.converged
    init, apply = pb.nets.mlp([1, 16, 1])
    net, params, batch = pb.regression_residuals(apply), init(jax.random.key(1)), (
        xs[:, None], ys[:, None])  # fmt: skip
    adam = optax.adam(1e-3)
    counts = []
    for max_steps in (50, 10**6 // 4, 60, 10**6 // 4):
        with _Compiles() as compiles:
            jax.block_until_ready(pb.fit(net, params, adam, batch, max_steps=max_steps,
                                         target_loss=1e9).params)  # fmt: skip
        counts.append(compiles.count)
    assert counts == [1, 1, 0, 0]


def test_compile_mode_is_checked():
    with pytest.raises(ValueError, match='compile_mode must be "auto", "quick" or "full"'):
        pb.fit(_exp_fit(*_exp_data()), jnp.ones(3), optax.adam(1e-2), None, max_steps=2,
               compile_mode="fast")  # fmt: skip


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(ZOO))
def test_quick_and_full_compiles_agree_on_every_network_users_bring(name, dtype):
    """Equinox, Flax NNX, a closure, a CNN, attention, an RNN and pb.nets, float64 and float32:
    XLA's cost analysis gives the choice a finite flop count (an unanalysable function would
    silently compile fully), and six LM steps compiled both ways take the same trials to
    rounding. Losses are compared against L_0: those networks interpolate their 6 examples,
    and at L ~ 1e-13 L_0 the two compiles' roundings are the whole value."""
    apply, params, xs = ZOO[name](dtype=dtype)
    batch = (xs, jnp.sin(jnp.arange(2 * N, dtype=dtype).reshape(N, 2)))
    fn = pb.regression_residuals(apply)
    flops = _compile.residual_flops(fn, params, batch)
    assert np.isfinite(flops) and flops > 0
    quick, full = (pb.fit(fn, params, pb.levenberg_marquardt(), batch, max_steps=6,
                          compile_mode=mode) for mode in ("quick", "full"))  # fmt: skip
    assert quick.steps == full.steps == 6
    np.testing.assert_array_equal(quick.history.accepted, full.history.accepted)
    rtol, floor = (1e-7, 1e-12) if dtype == jnp.float64 else (2e-3, 1e-6)
    l0 = float(full.history.loss[0])
    np.testing.assert_allclose(quick.history.loss, full.history.loss, rtol=rtol, atol=floor * l0)


def test_the_estimate_counts_an_unhashable_residual_callable():
    """A callable object that defines __eq__ without __hash__ (as a dataclass does) gets a
    flop count like a function, not the 'no answer' that would compile it fully."""

    class Residuals:
        __hash__ = None

        def __eq__(self, other):
            return self is other

        def __call__(self, p, batch):
            return p * 2.0 - 1.0

    assert _compile.residual_flops(Residuals(), jnp.ones(3), None) == 6.0
    result = pb.fit(Residuals(), jnp.ones(3), pb.levenberg_marquardt(), None, max_steps=10)
    np.testing.assert_allclose(result.params, 0.5)
