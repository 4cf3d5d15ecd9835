"""pb.fit: one jitted loop for Gauss-Newton, LM and first-order optax optimisers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import count_compiles

import paribus as pb
from paribus._fit import STOP_REASONS, StopReason


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
    assert result.stop_reason in ("gradient", "step") and result.converged
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
    assert result.steps == 30 and result.stop_reason == "max_steps" and not result.converged
    assert hist.loss.shape == (31,) and hist.loss[-1] < hist.loss[0]
    assert np.all(hist.solve_form == -1) and np.all(hist.accepted[1:])
    np.testing.assert_allclose(hist.loss[0], pb.loss(residual_fn, params, batch))


def test_target_loss_stops():
    params, residual_fn, batch = sine_problem()
    result = pb.fit(residual_fn, params, pb.levenberg_marquardt(), batch, max_steps=200,
                    target_loss=1e-3)  # fmt: skip
    assert result.stop_reason == "target_loss" and result.converged
    assert result.history.loss[-1] <= 1e-3 < result.history.loss[-2]


def test_stop_reason_codes_are_stable_and_one_type():
    """Codes 0-5 keep their meaning; a StopReason compares with names, ints and itself."""
    assert STOP_REASONS[:6] == (
        "max_steps", "gradient", "step", "target_loss", "non_finite", "damping_limit",
    )  # fmt: skip
    assert set(pb._fit.CONVERGED) == {"gradient", "step", "target_loss"}
    reason = StopReason(np.int32(STOP_REASONS.index("stalled")))
    assert reason == "stalled" and reason != "step" and reason.name == "stalled"
    assert int(reason) == STOP_REASONS.index("stalled") and STOP_REASONS[reason] == "stalled"
    assert reason in {"stalled"} and str(reason) == "stalled" and not reason.converged
    with pytest.raises(ValueError, match="unknown stop reason"):
        _ = reason == "stopped"
    batch = StopReason(np.array([0, 1, 3], np.int32))
    np.testing.assert_array_equal(batch == "max_steps", [True, False, False])
    np.testing.assert_array_equal(batch.converged, [False, True, True])
    assert (
        list(batch.name) == ["max_steps", "gradient", "target_loss"] and batch[2] == "target_loss"
    )


def test_float32_end_to_end():
    params, residual_fn, batch = sine_problem()
    params, batch = jax.tree.map(lambda a: a.astype(jnp.float32), (params, batch))
    result = pb.fit(residual_fn, params, pb.levenberg_marquardt(), batch, max_steps=100)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(result.params))
    assert result.history.loss.dtype == np.float32
    assert np.all(np.isfinite(result.history.loss))
    assert result.history.loss[-1] < 1e-5 * result.history.loss[0]


def test_new_max_steps_tolerances_and_optimiser_object_do_not_recompile():
    """max_steps, the tolerances, the start and an equal new optimiser reuse the loop."""
    params, residual_fn, batch = sine_problem()
    pb.fit(residual_fn, params, pb.levenberg_marquardt(), batch, max_steps=5)
    moved = jax.tree.map(lambda a: a + 0.1, params)

    def again():
        for max_steps in (3, 40):
            result = pb.fit(residual_fn, moved, pb.levenberg_marquardt(), batch,
                            max_steps=max_steps, target_loss=1e-3, grad_tol=1e-14)  # fmt: skip
            assert result.steps >= 1
        return result.params

    assert count_compiles(again) == 0
    other = pb.levenberg_marquardt(solve="qr")
    compiles = count_compiles(lambda: pb.fit(residual_fn, moved, other, batch, max_steps=2).params)
    assert compiles == 1, "a different optimiser compiles its own loop"


def test_vmap_over_seeds_matches_one_seed_at_a_time():
    init, apply = pb.nets.mlp([1, 6, 1])
    xs = jnp.linspace(-1, 1, 5)[:, None]
    batch = (xs, jnp.sin(3 * xs))
    residual_fn = pb.per_example(lambda p, ex: apply(p, ex[0]) - ex[1])
    opt = pb.levenberg_marquardt()
    keys = jax.random.split(jax.random.key(7), 3)
    # The target ends every run well above the rounding floor, where batched and unbatched
    # kernels (which round differently) would take different last steps.
    fit = lambda params: pb.fit(residual_fn, params, opt, batch, max_steps=40, target_loss=1e-20)  # noqa: E731
    batched = jax.vmap(lambda k: fit(init(k)))(keys)
    assert batched.history.loss.shape == (3, 41) and batched.steps.shape == (3,)
    assert isinstance(batched.stop_reason, StopReason) and batched.converged.shape == (3,)
    single = fit(init(keys[1]))
    assert int(batched.steps[1]) == single.steps
    assert batched.stop_reason[1] == single.stop_reason and single.stop_reason.name != ""
    assert bool(batched.converged[1]) == single.converged
    # Batched and unbatched kernels round differently: compare to 1e-12 of the initial loss.
    np.testing.assert_allclose(batched.history.loss[1, : single.steps + 1], single.history.loss,
                               rtol=1e-9, atol=1e-12 * single.history.loss[0])  # fmt: skip


@pytest.mark.parametrize("kind", ["lm", "adam", "sgd"])
def test_a_long_traced_run_in_chunks_equals_one_loop(kind, monkeypatch):
    """A traced run of more than TRACED_CHUNK points is a scan over loops of TRACED_CHUNK
    points (linear, not quadratic, in max_steps under vmap). Its slow twin, one loop of
    max_steps + 1 points, takes the same steps and stops at the same point: LM on a small
    network (early, past the first chunk; under jit only: 250 LM steps there amplify the
    rounding of batched kernels, which differ between the two), Adam (at max_steps, across
    three chunks) and SGD on a linear fit (early, past the first chunk) under jit and vmap;
    both leave the rows past the stop blank, and Adam's and SGD's runs equal the host loop's."""
    from paribus._fit import fitting

    chunk = fitting.TRACED_CHUNK
    max_steps = 2 * chunk + 40
    if kind == "sgd":
        batch, residual_fn, _ = linear_data()
        init = lambda key: jax.random.normal(key, (3,))  # noqa: E731
        opt, target = optax.sgd(5e-4), 0.21  # about 230 steps
    else:
        init, apply = pb.nets.mlp([1, 6, 1])
        xs = jnp.linspace(-1, 1, 12)[:, None]
        batch, residual_fn = (xs, jnp.sin(3 * xs)), pb.regression_residuals(apply)
        # Monotone LM: it stops early past the first chunk here (the default's watchdog, on
        # where R <= P, takes another path that needs more than max_steps to the target).
        lm = pb.levenberg_marquardt(watchdog=None)
        opt = lm if kind == "lm" else optax.adam(3e-2)
        target = 1e-6

    def fit(params, **kw):
        return pb.fit(residual_fn, params, opt, batch, max_steps=max_steps, target_loss=target,
                      **kw)  # fmt: skip

    keys = jax.random.split(jax.random.key(3), 2)

    def runs():
        jitted = jax.jit(fit)(init(keys[0]))
        if kind == "lm":
            return (jitted,)
        return jitted, jax.tree.map(lambda a: a[0], jax.vmap(lambda k: fit(init(k)))(keys))

    chunked = runs()
    monkeypatch.setattr(fitting, "TRACED_CHUNK", max_steps + 1)
    for a, b in zip(chunked, runs(), strict=True):
        assert int(a.steps) == int(b.steps) and a.stop_reason == b.stop_reason
        # The two compile the body apart and round differently; Adam's 296 steps amplify that
        # to 3e-10 relative.
        np.testing.assert_allclose(a.history.loss, b.history.loss, rtol=1e-8)  # NaN == NaN
        np.testing.assert_array_equal(a.history.accepted, b.history.accepted)
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-7), a.params, b.params)
        n = int(a.steps) + 1
        assert np.all(np.isnan(np.asarray(a.history.loss[n:])))
    steps = int(chunked[0].steps)
    if kind == "adam":
        assert steps == max_steps
    else:
        assert chunk < steps < max_steps and chunked[0].stop_reason == "target_loss"
    if kind != "lm":
        host = fit(init(keys[0]), compile_mode="full")
        assert host.steps == steps
        np.testing.assert_allclose(chunked[0].history.loss[: steps + 1], host.history.loss,
                                   rtol=1e-9)  # fmt: skip


def linear_data(n=40, p=3, seed=0):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.normal(size=(n, p)))
    y = a @ jnp.asarray(rng.normal(size=p)) + 0.1 * jnp.asarray(rng.normal(size=n))
    return (a, y), (lambda x, b: b[0] @ x - b[1]), jnp.zeros(p)


def test_minibatch_index_schedule_uses_the_same_batch_for_rho():
    """Linear residuals: the gain ratio is exactly 1 when the trial is judged on its own batch."""
    data, residual_fn, x0 = linear_data()
    indices = jnp.asarray(np.random.default_rng(1).permutation(40).reshape(4, 10))
    opt = pb.levenberg_marquardt(init_damping=1.0, init_damping_relative=False)
    result = pb.fit(residual_fn, x0, opt, data, max_steps=12, batch_indices=indices)
    hist = result.history
    assert result.steps == 12 and np.all(hist.accepted[1:])
    np.testing.assert_allclose(hist.gain_ratio[1:], 1.0, atol=1e-9)
    first = jax.tree.map(lambda a: a[indices[0]], data)
    np.testing.assert_allclose(hist.loss[0], pb.loss(residual_fn, x0, first), rtol=1e-14)


def test_minibatch_iterator_equals_index_schedule():
    data, residual_fn, x0 = linear_data()
    indices = np.random.default_rng(2).permutation(40).reshape(4, 10)
    opt = pb.levenberg_marquardt()
    by_index = pb.fit(residual_fn, x0, opt, data, max_steps=8, batch_indices=indices)
    batches = (jax.tree.map(lambda a, i=i: a[indices[i % 4]], data) for i in range(100))
    by_iter = pb.fit(residual_fn, x0, opt, batches, max_steps=8)
    np.testing.assert_allclose(by_iter.history.loss, by_index.history.loss, rtol=1e-13)
    np.testing.assert_allclose(by_iter.params, by_index.params, rtol=1e-13)


def test_diverging_first_order_run_stops_promptly_with_a_finite_iterate():
    params, residual_fn, batch = sine_problem()
    result = pb.fit(residual_fn, params, optax.sgd(1e6), batch, max_steps=100)
    assert result.stop_reason in ("diverged", "non_finite") and result.steps < 20
    assert not result.converged
    assert np.all(np.isfinite(result.history.loss))
    np.testing.assert_allclose(result.history.loss[-1], pb.loss(residual_fn, result.params, batch))


def test_lm_inside_a_chain_that_leaves_its_steps_alone_is_recognised():
    """chain(LM, scale(1.0)) applies LM's steps unchanged: allowed, and checked at every step
    (tests/test_bad_input.py: a chained clip or scale != 1 is refused)."""
    params, residual_fn, batch = sine_problem()
    opt = optax.chain(pb.levenberg_marquardt(), optax.scale(1.0))
    result = pb.fit(residual_fn, params, opt, batch, max_steps=100)
    assert result.history.loss[-1] < 1e-10 and result.converged
    assert np.all(result.history.solve_form[1:] >= 0)


def test_clear_errors():
    params, residual_fn, batch = sine_problem()
    opt = pb.levenberg_marquardt()
    with pytest.raises(ValueError, match="max_steps must be an int >= 1"):
        pb.fit(residual_fn, params, opt, batch, max_steps=0)
    with pytest.raises(TypeError, match="floating-point"):
        pb.fit(residual_fn, {"x": jnp.arange(3)}, opt, batch, max_steps=3)
    with pytest.raises(TypeError, match="float array"):
        pb.fit(lambda p, b: jnp.zeros(3, jnp.int32), params, opt, batch, max_steps=3)
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        pb.fit(residual_fn, params, "adam", batch, max_steps=3)
    with pytest.raises(ValueError, match=r"\(S, B\) integer array"):
        pb.fit(residual_fn, params, opt, batch, max_steps=3, batch_indices=jnp.ones(3))
    xs, ys = batch
    uneven = iter([(xs, ys), (xs[:3], ys[:3])])
    with pytest.raises(ValueError, match="batch 1 from the iterator"):
        pb.fit(residual_fn, params, opt, uneven, max_steps=3)


def blobs(n_per_class=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    xs = np.concatenate([c + 0.6 * rng.normal(size=(n_per_class, 2)) for c in centres])
    labels = np.repeat(np.arange(3), n_per_class)
    return jnp.asarray(xs), jnp.asarray(labels)


def test_levenberg_marquardt_trains_a_classifier_with_cross_entropy():
    """GGN / LM with softmax cross-entropy (loss=): high accuracy in a few steps."""
    xs, labels = blobs()
    init, apply = pb.nets.mlp([2, 8, 3])
    loss = pb.losses.softmax_cross_entropy()
    residual_fn = pb.losses.network_outputs(apply)
    opt = pb.levenberg_marquardt(loss=loss)
    result = pb.fit(residual_fn, init(jax.random.key(0)), opt, (xs, labels), max_steps=30,
                    loss=loss)  # fmt: skip
    logits = jax.vmap(apply, (None, 0))(result.params, xs)
    accuracy = float(jnp.mean(jnp.argmax(logits, axis=1) == labels))
    assert accuracy >= 0.95
    hist = result.history
    assert hist.loss[-1] < 0.1 * hist.loss[0]
    assert np.all(np.diff(hist.loss) <= 1e-12)
    expected = jnp.sum(jax.vmap(loss.value)(logits, labels))
    np.testing.assert_allclose(hist.loss[-1], expected, rtol=1e-12)


def test_optax_line_search_runs_inside_fit():
    """L-BFGS's zoom line search gets value, grad and value_fn, and nothing it cannot use."""
    params, residual_fn, batch = sine_problem()
    start = pb.loss(residual_fn, params, batch)
    result = pb.fit(residual_fn, params, optax.lbfgs(), batch, max_steps=30)
    assert result.history.loss[-1] < 0.1 * start
    assert np.all(np.isfinite(result.history.loss))


def test_a_declined_first_order_step_is_not_convergence():
    """A transformation that returns zero updates on odd steps (a rejected trial) runs on."""

    def skip_odd_steps():
        inner = optax.sgd(0.05)

        def init_fn(params):
            return (jnp.zeros((), jnp.int32), inner.init(params))

        def update_fn(updates, state, params=None):
            count, inner_state = state
            step, inner_state = inner.update(updates, inner_state, params)
            step = jax.tree.map(lambda s: jnp.where(count % 2 == 1, 0.0, s), step)
            return step, (count + 1, inner_state)

        return optax.GradientTransformation(init_fn, update_fn)

    params, residual_fn, batch = sine_problem()
    result = pb.fit(residual_fn, params, skip_odd_steps(), batch, max_steps=20)
    assert result.stop_reason == "max_steps" and result.steps == 20
    assert np.all(result.history.step_norm[2::2] == 0)
    assert np.all(result.history.step_norm[1::2] > 0)


def test_regression_residuals_of_an_mlp_fit_under_strict_rank_promotion():
    """The structured path (pb.regression_residuals of a pb.nets MLP) under the strict config."""
    init, apply = pb.nets.mlp([1, 8, 8, 1])
    xs = jnp.linspace(-1, 1, 6)[:, None]
    params = init(jax.random.key(0))
    result = pb.fit(pb.regression_residuals(apply), params, pb.levenberg_marquardt(),
                    (xs, jnp.sin(3 * xs)), max_steps=60)  # fmt: skip
    assert result.history.loss[-1] < 1e-10


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["closure", "equinox", "flax", "cnn"])
def test_a_long_traced_run_in_chunks_on_networks_users_bring(name, dtype, monkeypatch):
    """The chunked traced run (past one TRACED_CHUNK) equals one loop under jit on an Equinox
    MLP, a Flax NNX module, a closure and a CNN, float64 and float32 (Adam: every step runs)."""
    from nets_zoo import ZOO, N

    from paribus._fit import fitting

    apply, params, xs = ZOO[name](dtype=dtype)
    batch = (xs, jnp.sin(jnp.arange(2 * N, dtype=dtype).reshape(N, 2)))
    fn = pb.regression_residuals(apply)
    max_steps = fitting.TRACED_CHUNK + 8

    def fit(p):
        return pb.fit(fn, p, optax.adam(1e-2), batch, max_steps=max_steps)

    chunked = jax.jit(fit)(params)
    monkeypatch.setattr(fitting, "TRACED_CHUNK", max_steps + 1)
    one_loop = jax.jit(fit)(params)
    assert int(chunked.steps) == int(one_loop.steps) == max_steps
    rtol = 1e-10 if dtype == jnp.float64 else 1e-4
    np.testing.assert_allclose(chunked.history.loss, one_loop.history.loss, rtol=rtol)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol),
                 chunked.params, one_loop.params)  # fmt: skip
    assert chunked.history.loss.dtype == dtype
