"""Bad input and numerical faults (issue 12): a clear error or a right answer, never a
reassuring wrong one. One section per public function; each case is a row of a table."""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import paribus as pb

# --- pb.fit ------------------------------------------------------------------------------------

FIT_INIT, FIT_APPLY = pb.nets.mlp([1, 4, 1])
FIT_PARAMS = FIT_INIT(jax.random.key(0))
FIT_XS = jnp.linspace(-1, 1, 20)[:, None]
FIT_BATCH = (FIT_XS, jnp.sin(3 * FIT_XS))
FIT_RESIDUALS = pb.regression_residuals(FIT_APPLY)
LM = pb.levenberg_marquardt()


def fit(residual_fn=FIT_RESIDUALS, opt=LM, batch=FIT_BATCH, **kwargs):
    kwargs.setdefault("max_steps", 3)
    return pb.fit(residual_fn, FIT_PARAMS, opt, batch, **kwargs)


def identity_labels(params):
    return jax.tree.map(lambda _: "all", params)


FIT_ERRORS = {
    # name: (call, exception, message pattern)
    "empty batch": (lambda: fit(batch=(FIT_XS[:0], FIT_XS[:0])), ValueError, "no residuals"),
    "index past the data": (
        lambda: fit(batch_indices=np.array([[0, 99]])),
        ValueError,
        r"in \[0, 20\)",
    ),
    "negative index": (lambda: fit(batch_indices=np.array([[-1, 3]])), ValueError, r"in \[0, 20\)"),
    "iterator as batch_indices": (
        lambda: fit(batch_indices=iter([np.array([[0, 1]])])),
        TypeError,
        "got an iterator",
    ),
    "iterator and batch_indices": (
        lambda: fit(batch=iter([FIT_BATCH]), batch_indices=np.array([[0, 1]])),
        ValueError,
        "one or the other",
    ),
    "target_loss nan": (lambda: fit(target_loss=float("nan")), ValueError, "target_loss"),
    "negative grad_tol": (lambda: fit(grad_tol=-1.0), ValueError, "grad_tol"),
    "scalar loss instead of residuals": (
        lambda: fit(residual_fn=lambda p, b: pb.loss(FIT_RESIDUALS, p, b)),
        ValueError,
        r"return the residuals r, not the\s+loss \(shape \(1,\)",
    ),
    "loss given as a string": (
        lambda: fit(loss="softmax"),
        TypeError,
        r"OutputLoss such as\s+pb.losses",
    ),
    "apply(params, x) instead of residual_fn(params, batch)": (
        lambda: fit(residual_fn=FIT_APPLY),
        TypeError,
        "pb.regression_residuals",
    ),
    "chain(LM, GN)": (
        lambda: fit(opt=optax.chain(pb.levenberg_marquardt(), pb.gauss_newton())),
        ValueError,
        "2 StepInfo records",
    ),
    "chain(adam, LM) drops adam": (
        lambda: fit(opt=optax.chain(optax.adam(1e-3), pb.levenberg_marquardt())),
        ValueError,
        "before the Jacobian-based",
    ),
    "LM inside multi_transform": (
        lambda: fit(opt=optax.multi_transform({"all": LM}, identity_labels)),
        ValueError,
        "optax.multi_transform",
    ),
    "LM inside MultiSteps": (
        lambda: fit(opt=optax.MultiSteps(LM, every_k_schedule=2)),
        ValueError,
        "MultiSteps",
    ),
    "chain(LM, clip_by_global_norm) changes its steps": (
        lambda: fit(opt=optax.chain(LM, optax.clip_by_global_norm(0.1)), max_steps=30),
        ValueError,
        r"chained after it \(optax.chain\) changes its steps",
    ),
    "chain(LM, scale(0.5)) changes its steps": (
        lambda: fit(opt=optax.chain(LM, optax.scale(0.5)), max_steps=30),
        ValueError,
        "changes its steps",
    ),
    "solver loss differs from fit's": (
        lambda: fit(opt=pb.levenberg_marquardt(loss=pb.losses.softmax_cross_entropy())),
        ValueError,
        "build the optimiser\\s+with the same loss",
    ),
    "state of another optimiser": (
        lambda: fit(state=optax.adam(1e-3).init(FIT_PARAMS)),
        ValueError,
        "does not belong",
    ),
    "progress given a function": (lambda: fit(progress=print), TypeError, "callback="),
    "max_steps zero": (lambda: fit(max_steps=0), ValueError, "max_steps must be an int >= 1"),
    "uneven minibatches": (
        lambda: fit(batch=iter([FIT_BATCH, (FIT_XS[:3], FIT_XS[:3])])),
        ValueError,
        "batch 1 from the iterator",
    ),
    "empty iterator": (lambda: fit(batch=iter([])), ValueError, "gave no batches"),
}


@pytest.mark.parametrize("case", FIT_ERRORS)
def test_fit_refuses(case):
    call, exception, pattern = FIT_ERRORS[case]
    with pytest.raises(exception, match=pattern):
        call()


def test_fit_under_jit_reports_a_changed_step_as_composition():
    """Under jit there is no host to raise on: the run stops with its own reason."""
    opt = optax.chain(LM, optax.clip_by_global_norm(0.1))
    result = jax.jit(lambda p: pb.fit(FIT_RESIDUALS, p, opt, FIT_BATCH, max_steps=30))(FIT_PARAMS)
    assert result.stop_reason == "composition" and not bool(result.converged)


def test_fit_takes_the_loss_its_residual_function_carries():
    """pb.losses.network_outputs(apply, loss) gives the loss once; a different one is refused."""
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(12, 2)))
    labels = jnp.arange(12) % 3
    init, apply = pb.nets.mlp([2, 3])
    loss = pb.losses.softmax_cross_entropy()
    residual_fn = pb.losses.network_outputs(apply, loss)
    result = pb.fit(residual_fn, init(jax.random.key(0)), pb.levenberg_marquardt(loss=loss),
                    (xs, labels), max_steps=5)  # fmt: skip
    logits = jax.vmap(apply, (None, 0))(result.params, xs)
    expected = jnp.sum(jax.vmap(loss.value)(logits, labels))
    np.testing.assert_allclose(result.history.loss[-1], expected, rtol=1e-12)
    # Given once, in the objective only: the solver linearises the objective and so uses it.
    once = pb.fit(residual_fn, init(jax.random.key(0)), pb.levenberg_marquardt(), (xs, labels),
                  max_steps=5)  # fmt: skip
    np.testing.assert_allclose(once.history.loss, result.history.loss, rtol=1e-12)
    with pytest.raises(ValueError, match="give the loss once"):
        pb.fit(residual_fn, init(jax.random.key(0)), pb.levenberg_marquardt(), (xs, labels),
               max_steps=2, loss=pb.losses.sigmoid_binary_cross_entropy())  # fmt: skip


def counting(batches):
    """An iterator that counts what was drawn from it."""
    counter = itertools.count()

    def gen():
        for item in batches:
            next(counter)
            yield item

    return gen(), counter


def test_fit_streams_an_iterator_and_draws_what_the_steps_use():
    """Target met after a few steps of max_steps = 20,000: quick, and few batches drawn."""
    batches, counter = counting(itertools.repeat(FIT_BATCH))
    start = time.perf_counter()
    result = fit(batch=batches, max_steps=20_000, target_loss=1e-3)
    assert result.stop_reason == "target_loss" and result.steps < 100
    assert time.perf_counter() - start < 60
    drawn = next(counter)
    assert result.steps + 1 <= drawn <= result.steps + 1 + 2 * pb._fit.ITERATOR_CHUNK


def test_fit_ends_where_the_iterator_does():
    """5 batches: 5 points, theta_0 .. theta_4, outside jit and under it."""
    sgd = optax.sgd(1e-3)
    result = fit(batch=counting([FIT_BATCH] * 5)[0], max_steps=100, opt=sgd)
    assert result.stop_reason == "max_steps" and result.steps == 4

    @jax.jit
    def traced(params):
        return pb.fit(FIT_RESIDUALS, params, sgd, iter([FIT_BATCH] * 5), max_steps=100)

    result = traced(FIT_PARAMS)
    assert result.stop_reason == "max_steps" and int(result.steps) == 4


def test_fit_keeps_nan_in_the_data_honest():
    """A NaN target: "non_finite" at step 0, the parameters untouched (a good behaviour)."""
    ys = FIT_BATCH[1].at[3].set(jnp.nan)
    result = fit(batch=(FIT_XS, ys), max_steps=5)
    assert result.stop_reason == "non_finite" and result.steps == 0 and not result.converged
    jax.tree.map(np.testing.assert_array_equal, result.params, FIT_PARAMS)


# --- solvers -----------------------------------------------------------------------------------

SOLVER_XS = jnp.linspace(-1, 1, 20)[:, None]
SOLVER_BATCH = (SOLVER_XS, jnp.sin(3 * SOLVER_XS))


def plain_residuals(params, batch):
    """A plain whole-batch residual function (not marked per example)."""
    return jax.vmap(FIT_APPLY, (None, 0))(params, batch[0]) - batch[1]


def cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


# (params dtype, data dtype, optimiser): each must run, its steps in the parameters' dtype, and
# decrease the loss. Before: a while_loop carry TypeError (dual with float32 params and float64
# data; every form with float16 params) or LAPACK's "Unsupported dtype float16".
F16, BF16, F32, F64 = jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64
MIXED_DTYPES = {
    "f32 params, f64 data, LM auto": (F32, F64, pb.levenberg_marquardt()),
    "f32 params, f64 data, LM dual": (F32, F64, pb.levenberg_marquardt(solve="dual")),
    "f32 params, f64 data, LM cg": (F32, F64, pb.levenberg_marquardt(solve="cg")),
    "f16 params, f32 data, LM auto": (F16, F32, pb.levenberg_marquardt()),
    "f16 params, f32 data, LM dual": (F16, F32, pb.levenberg_marquardt(solve="dual")),
    "f16, LM auto": (F16, F16, pb.levenberg_marquardt()),
    "f16, LM qr": (F16, F16, pb.levenberg_marquardt(solve="qr")),
    "bf16, LM auto": (BF16, BF16, pb.levenberg_marquardt()),
    "bf16, LM qr": (BF16, BF16, pb.levenberg_marquardt(solve="qr")),
}


@pytest.mark.parametrize("case", MIXED_DTYPES)
def test_solvers_compute_in_a_supported_dtype(case):
    params_dtype, data_dtype, opt = MIXED_DTYPES[case]
    params, batch = cast(FIT_PARAMS, params_dtype), cast(SOLVER_BATCH, data_dtype)
    # diverge_factor: pb.fit's default (1e12) does not fit in float16.
    result = pb.fit(plain_residuals, params, opt, batch, max_steps=8, diverge_factor=np.inf)
    assert all(leaf.dtype == params_dtype for leaf in jax.tree.leaves(result.params))
    loss = np.asarray(result.history.loss, np.float64)
    assert np.all(np.isfinite(loss)) and loss[-1] < 0.5 * loss[0], loss
    assert bool(np.any(result.history.accepted))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("solve", ["auto", "primal", "qr", "dual", "cg"])
def test_gauss_newton_in_half_precision_solves_in_float32(dtype, solve):
    """Linear least squares in float16 / bfloat16: one GN step lands on the solution to the
    dtype's rounding (the solve runs in float32 and is rounded back)."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(12, 3)), dtype)
    x = jnp.asarray([0.5, -1.0, 2.0], dtype)
    y = a @ x
    opt = pb.gauss_newton(solve=solve)
    params = jnp.zeros(3, dtype)
    step, state = opt.update(None, opt.init(params), params,
                             residual_fn=lambda p, b: b[0] @ p - b[1], batch=(a, y))  # fmt: skip
    assert step.dtype == dtype and bool(state.step_info.accepted)
    np.testing.assert_allclose(np.asarray(step, np.float64), np.asarray(x, np.float64),
                               rtol=0, atol=8 * float(jnp.finfo(dtype).eps) * 2)  # fmt: skip


def _other_state():
    init, _ = pb.nets.mlp([1, 5, 1])
    return pb.levenberg_marquardt().init(init(jax.random.key(1)))


SOLVER_STATE_ERRORS = {
    # name: (optimiser, state, exception, message)
    "LM given an Adam state": (
        pb.levenberg_marquardt(), optax.adam(1e-3).init(FIT_PARAMS), TypeError,
        "expected the LevenbergMarquardtState",
    ),
    "LM given another network's state": (
        pb.levenberg_marquardt(), _other_state(), ValueError,
        "the state was built for 16 parameters; these params have 13",
    ),
    "LM given a float32 state for float64 params": (
        pb.levenberg_marquardt(), pb.levenberg_marquardt().init(cast(FIT_PARAMS, jnp.float32)),
        ValueError, "holds float32 numbers but these params compute in float64",
    ),
    "GN given an LM state": (
        pb.gauss_newton(), pb.levenberg_marquardt().init(FIT_PARAMS), TypeError,
        "expected the GaussNewtonState",
    ),
    "GN given an Adam state": (
        pb.gauss_newton(), optax.adam(1e-3).init(FIT_PARAMS), TypeError,
        "expected the GaussNewtonState",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", SOLVER_STATE_ERRORS)
def test_solver_update_refuses_a_state_not_its_own(case):
    opt, state, exception, pattern = SOLVER_STATE_ERRORS[case]
    with pytest.raises(exception, match=pattern):
        opt.update(None, state, FIT_PARAMS, residual_fn=FIT_RESIDUALS, batch=FIT_BATCH)


# --- linearisation, Jacobians and curvature (issue 12) ---------------------------------------

_MLP_INIT, _MLP_APPLY = pb.nets.mlp([2, 3, 1])
_MLP = _MLP_INIT(jax.random.key(0))
_EMPTY = (jnp.zeros((0, 2)), jnp.zeros((0, 1)))


@pytest.mark.parametrize(
    "call",
    [
        lambda: pb.jacobian(_MLP_APPLY, _MLP, _EMPTY[0]),
        lambda: pb.ntk(_MLP_APPLY, _MLP, _EMPTY[0]),
        lambda: pb.ggn_vector_product(pb.regression_residuals(_MLP_APPLY), _MLP, _EMPTY, _MLP),
        lambda: pb.per_example_grad_norms(pb.regression_residuals(_MLP_APPLY), _MLP, _EMPTY),
        lambda: pb.linearize(pb.regression_residuals(_MLP_APPLY), _MLP, _EMPTY),
    ],
    ids=["jacobian", "ntk", "ggn_vector_product", "per_example_grad_norms", "linearize"],
)
def test_empty_batch_is_a_clear_error(call):
    with pytest.raises(ValueError, match=r"the batch is empty \(N = 0\)"):
        call()


def test_extra_parameter_leaf_beside_an_mlp_gets_zero_columns_and_its_labels():
    """An extra leaf the network never reads: 2 zero columns, labelled, in every mode (the
    structured mode used to shift columns and drop labels)."""
    params = {**_MLP, "extra": jnp.array([1.0, 2.0])}
    xs = jax.random.normal(jax.random.key(1), (4, 2))
    for mode in ("structured", "per_example", "fwd"):
        jac = pb.jacobian(_MLP_APPLY, params, xs, mode=mode)
        assert jac.matrix.shape == (4, 15) and len(jac.labels) == 15
        extra = [i for i, label in enumerate(jac.labels) if label.startswith("extra")]
        np.testing.assert_array_equal(jac.matrix[:, extra], 0.0)
    diag = pb.jtj_diag(_MLP_APPLY, params, xs)
    np.testing.assert_array_equal(diag["extra"], 0.0)
    fn = pb.regression_residuals(_MLP_APPLY)
    gv = pb.ggn_vector_product(fn, params, (xs, jnp.zeros((4, 1))), params)
    np.testing.assert_array_equal(gv["extra"], 0.0)
    assert pb.linearize(fn, params, (xs, jnp.zeros((4, 1)))).plan.forms()["extra"] == "unused"


def test_regression_residuals_of_a_dict_batch_says_to_pass_a_pair():
    batch = {"x": jnp.ones((3, 2)), "y": jnp.ones((3, 1))}
    with pytest.raises(TypeError, match=r"pair \(xs, ys\).*\(batch\['x'\], batch\['y'\]\)"):
        pb.loss(pb.regression_residuals(_MLP_APPLY), _MLP, batch)


def test_jacobian_honours_a_budget_given_with_an_explicit_chunk():
    xs = jnp.ones((100, 2))
    with pytest.raises(pb.memory.MemoryBudgetError, match="largest chunk that fits"):
        pb.jacobian(_MLP_APPLY, _MLP, xs, chunk_size=10, memory_budget=11_000)
    assert pb.jacobian(_MLP_APPLY, _MLP, xs, chunk_size=10, memory_budget=10**8).shape == (100, 13)
