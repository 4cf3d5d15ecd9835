"""Gauss-Newton and Levenberg-Marquardt steps: every solve form against its slow, obvious twin."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import paribus as pb
from paribus.solvers import _cg, _damping, _dual, _forms, _linear, _model

FORMS = pb.solvers.FORMS


def linear_problem(n, p, seed=0):
    rng = np.random.default_rng(seed)
    a, y = rng.normal(size=(n, p)), rng.normal(size=n)
    return jnp.asarray(a), jnp.asarray(y), jnp.asarray(rng.normal(size=p))


def linear_residuals(params, batch):
    a, y = batch
    return a @ params["x"] - y


def mlp_problem(n=5, sizes=(2, 6, 2), seed=0):
    init, apply = pb.nets.mlp(list(sizes), b_init=jax.nn.initializers.normal(0.5))
    key_p, key_x = jax.random.split(jax.random.key(seed))
    xs = jax.random.normal(key_x, (n, sizes[0]))
    ys = jnp.sin(xs[:, :1] * 2) * jnp.ones((1, sizes[-1]))
    residual_fn = pb.per_example(lambda p, ex: apply(p, ex[0]) - ex[1])
    return init(key_p), residual_fn, (xs, ys)


def one_step(opt, params, residual_fn, batch):
    state = opt.init(params)
    return jax.jit(lambda p, s: opt.update(None, s, p, residual_fn=residual_fn, batch=batch))(
        params, state
    )


def dense_jacobian(residual_fn, params, batch):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    r = lambda th: jax.flatten_util.ravel_pytree(residual_fn(unravel(th), batch))[0]  # noqa: E731
    return np.asarray(jax.jacfwd(r)(flat)), np.asarray(r(flat)), flat


def naive_lm_step(residual_fn, params, batch, lam, d=None):
    """(J^T J + lam D)^-1 (-J^T r) by numpy on the dense Jacobian: the slow twin."""
    jac, r, _ = dense_jacobian(residual_fn, params, batch)
    d = np.ones(jac.shape[1]) if d is None else d
    return np.linalg.solve(jac.T @ jac + lam * np.diag(d), -jac.T @ r)


def flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


# --- Gauss-Newton -------------------------------------------------------------------------------


@pytest.mark.parametrize("solve", FORMS)
@pytest.mark.parametrize("shape", [(20, 5), (4, 10)], ids=["overdetermined", "underdetermined"])
def test_gauss_newton_one_step_solves_linear_least_squares(solve, shape):
    """One GN step is the exact (minimum-norm) least-squares solution, in every form."""
    a, y, x0 = linear_problem(*shape)
    params = {"x": x0}
    step, state = one_step(
        pb.gauss_newton(solve=solve, cg_max_steps=50), params, linear_residuals, (a, y)
    )
    expected = x0 + np.linalg.lstsq(a, y - a @ x0, rcond=None)[0]
    np.testing.assert_allclose(x0 + step["x"], expected, atol=1e-9)
    assert int(state.step_info.form) == FORMS.index(solve) and bool(state.step_info.accepted)


@pytest.mark.parametrize("solve", FORMS)
def test_gauss_newton_rank_deficient_is_minimum_norm_and_finite(solve):
    """Two identical columns and R < P: the step is J^+ r, never NaN (optimistix gives NaN)."""
    a, y, _ = linear_problem(3, 6)
    a = a.at[:, 1].set(a[:, 0])
    params = {"x": jnp.zeros(6)}
    step, _ = one_step(pb.gauss_newton(solve=solve), params, linear_residuals, (a, y))
    np.testing.assert_allclose(step["x"], np.linalg.pinv(np.asarray(a)) @ np.asarray(y), atol=1e-9)


@pytest.mark.parametrize("solve", ["primal", "dual"])
def test_gauss_newton_step_matches_pseudo_inverse_on_mlp(solve):
    params, residual_fn, batch = mlp_problem()
    step, state = one_step(pb.gauss_newton(solve=solve), params, residual_fn, batch)
    jac, r, _ = dense_jacobian(residual_fn, params, batch)
    np.testing.assert_allclose(flat(step), -np.linalg.pinv(jac) @ r, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(state.step_info.grad_norm, np.linalg.norm(jac.T @ r), rtol=1e-12)


# --- Levenberg-Marquardt: forms against the dense twin -------------------------------------------


def raw_step(solve, params, residual_fn, batch, lam, d=None, min_norm=False, cg_steps=200):
    """The solve form alone (no accept/reject), jitted: delta (P,), J delta (R,), ||g||."""

    def go(params):
        model = _model.build(residual_fn, params, batch, where="test")
        options = _cg.CGOptions(cg_steps, 1e-14)
        dd = None if d is None else jnp.asarray(d)
        return _forms.solve(solve, model, lam, dd, min_norm=min_norm, cg_options=options)[:3]

    return [np.asarray(a) for a in jax.jit(go)(params)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scaling", ["identity", "marquardt"])
@pytest.mark.parametrize("sizes", [(2, 6, 2), (1, 3, 1)], ids=["R<P", "R>P"])
def test_every_form_equals_dense_twin(seed, scaling, sizes):
    """primal == qr == dual == cg == numpy solve of the normal equations (D = I and diag)."""
    n = 5 if sizes[0] == 2 else 30
    params, residual_fn, batch = mlp_problem(n, sizes, seed)
    jac, r, _ = dense_jacobian(residual_fn, params, batch)
    d = None if scaling == "identity" else np.sum(jac**2, 0) + 0.1
    lam = 0.37
    expected = naive_lm_step(residual_fn, params, batch, lam, d)
    for solve in FORMS:
        delta, jd, gnorm = raw_step(solve, params, residual_fn, batch, lam, d)
        tol = 1e-7 if solve == "cg" else 1e-10
        np.testing.assert_allclose(delta, expected, rtol=tol, atol=tol, err_msg=solve)
        np.testing.assert_allclose(jd, jac @ expected, rtol=tol, atol=tol, err_msg=solve)
        # dual reads ||g|| off the kernel (sqrt(r^T J J^T r)): agreement to rounding of that.
        np.testing.assert_allclose(gnorm, np.linalg.norm(jac.T @ r), rtol=1e-10, err_msg=solve)


def test_dual_equals_primal_to_1e10_on_overparameterised_mlp():
    """R = 4 < P = 353. Primal squares the condition number of J, so at tiny lam it is the
    inaccurate one: there the reference is qr (J stacked on sqrt(lam) I)."""
    params, residual_fn, batch = mlp_problem(4, (3, 16, 16, 1), seed=3)
    for lam, reference in ((1e-2, "primal"), (1.0, "primal"), (10.0, "primal"), (1e-6, "qr")):
        ref = raw_step(reference, params, residual_fn, batch, lam)[0]
        dual = raw_step("dual", params, residual_fn, batch, lam)[0]
        np.testing.assert_allclose(dual, ref, rtol=0, atol=1e-10 * np.abs(ref).max())


def test_refined_dual_equals_qr_and_its_own_j_delta():
    """The PCG-refined dual step (forced at every lam) is the LM step: equal to the qr twin,
    and its J delta is J times its delta (the predicted decrease is the step's own)."""
    params, residual_fn, batch = mlp_problem(6, (2, 12, 1), seed=5)
    jac, _, _ = dense_jacobian(residual_fn, params, batch)
    forced = _dual.DualOptions(max_steps=50, tol=1e-13, switch=np.inf)

    def refined(lam):
        def go(params):
            model = _model.build(residual_fn, params, batch, where="test")
            return _dual.dual(model, lam, None, False, forced)[:3]

        return [np.asarray(a) for a in jax.jit(go)(params)]

    for lam in (1e-8, 1e-3, 1.0):
        ref = raw_step("qr", params, residual_fn, batch, lam)[0]
        delta, jd, _ = refined(lam)
        np.testing.assert_allclose(delta, ref, rtol=0, atol=1e-9 * np.abs(ref).max())
        np.testing.assert_allclose(jd, jac @ delta, rtol=0, atol=1e-12 * np.abs(jd).max())


def test_dual_step_vmaps_with_lanes_on_both_sides_of_the_switch():
    """Under vmap the direct/refined cond becomes a select and the PCG loop runs for the
    slowest lane: each lane must still get its own LM step (checked against qr)."""
    params, residual_fn, batch = mlp_problem(6, (2, 12, 1), seed=6)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 1.1 * a]), params)
    lams = jnp.array([1e-6, 1.0])  # switch * floor is ~1e-4: lane 0 refines, lane 1 does not
    options = _dual.DualOptions(max_steps=60, tol=1e-13, switch=1e10)

    def step(params, lam):
        model = _model.build(residual_fn, params, batch, where="test")
        floor = _linear.rounding_floor(model.ntk())
        return _dual.dual(model, lam, None, False, options)[0], lam >= options.switch * floor

    deltas, direct = jax.jit(jax.vmap(step))(stacked, lams)
    assert not bool(direct[0]) and bool(direct[1])
    for lane in range(2):
        lane_params = jax.tree.map(lambda a, i=lane: a[i], stacked)
        ref = raw_step("qr", lane_params, residual_fn, batch, float(lams[lane]))[0]
        np.testing.assert_allclose(deltas[lane], ref, rtol=0, atol=1e-8 * np.abs(ref).max())


def test_float32_dual_step_resolves_kernel_directions_below_its_rounding():
    """float32, 1-300-1 tanh, N = 64: ||K|| ~ 1e4, so eigenvalues of J J^T under ~1e-3 are
    rounding noise in the formed kernel. At lam = 1e-4 the bare Cholesky step is 41% off the
    float64 step; the refinement (VJP/JVP products, backward stable) brings it to < 1e-3."""
    xs = jnp.linspace(-1.0, 1.0, 64)[:, None]
    init, apply = pb.nets.mlp([1, 300, 1], "tanh")
    residual_fn = pb.regression_residuals(apply)
    params = init(jax.random.key(0))
    batch = (xs, 0.5 * jnp.sin(3 * jnp.pi * xs))
    to32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)  # noqa: E731

    def step(params, batch, options):
        model = _model.build(residual_fn, params, batch, where="test")
        return _dual.dual(model, 1e-4, None, False, options)[0]

    step = jax.jit(step, static_argnums=2)
    ref = np.asarray(step(params, batch, _dual.DualOptions(max_steps=0)))
    err = {}
    for name, options in (("bare", _dual.DualOptions(max_steps=0)), ("refined", None)):
        got = step(to32(params), to32(batch), options or _dual.DualOptions())
        assert got.dtype == jnp.float32
        err[name] = np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref)
    assert err["bare"] > 1e-2 and err["refined"] < 1e-3, err


def test_matmul_eps_follows_platform_and_precision_setting():
    """The kernel's rounding floor uses the precision XLA computes float32 products in."""
    eps32, eps64 = float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)
    f32, f64 = jnp.float32, jnp.float64
    cases = [
        (f32, "cpu", None, eps32),
        (f32, "gpu", None, 2.0**-10),  # TF32 tensor cores
        (f32, "gpu", "highest", eps32),
        (f32, "gpu", "F32_F32_F32", eps32),
        (f32, "gpu", "bfloat16", 2.0**-7),
        (f32, "tpu", None, 2.0**-7),  # one bfloat16 pass
        (f32, "tpu", "high", 2.0**-16),
        (f32, "tpu", "float32", eps32),
        (f64, "gpu", None, eps64),
        (f64, "tpu", "bfloat16", eps64),
    ]
    for dtype, platform, setting, want in cases:
        got = _linear.matmul_eps(dtype, platform, setting)
        assert got == want, (dtype, platform, setting, got, want)
    assert _linear.matmul_eps(f32) == eps32  # this machine: CPU
    with jax.default_matmul_precision("bfloat16"):
        assert _linear.matmul_eps(f32, "gpu") == 2.0**-7


def test_float32_dual_lm_reaches_target_where_kernel_rounding_stalled_it():
    """The width-sweep failure: float32 dual LM on 1-1000-1 tanh (P = 3,001), N = 256, stalled
    at ~2x the target (MSE 1e-4) with the bare Cholesky step; refined, it reaches it."""
    xs = jnp.linspace(-1.0, 1.0, 256, dtype=jnp.float32)[:, None]
    batch = (xs, 0.5 * jnp.sin(3 * jnp.pi * xs))
    init, apply = pb.nets.mlp([1, 1000, 1], "tanh")
    residual_fn = pb.regression_residuals(apply)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), init(jax.random.key(0)))
    target = 0.5 * 256 * 1e-4

    def run(refine):
        opt = pb.levenberg_marquardt(solve="dual", dual_refine_steps=refine)
        return pb.fit(residual_fn, params, opt, batch, max_steps=150, target_loss=target)

    refined, bare = run(10), run(0)
    assert refined.stop_reason == "target_loss" and refined.history.loss[-1] <= target
    assert bare.history.loss[-1] > target


def test_cg_approaches_primal_as_iterations_grow():
    """CG minimises the error in the A-norm, A = J^T J + lam I: monotone in the iterations."""
    params, residual_fn, batch = mlp_problem(12, (1, 5, 1), seed=4)
    lam = 1e-3
    jac, _, _ = dense_jacobian(residual_fn, params, batch)
    a = jac.T @ jac + lam * np.eye(jac.shape[1])
    primal = raw_step("primal", params, residual_fn, batch, lam)[0]

    def a_norm_error(k):
        e = raw_step("cg", params, residual_fn, batch, lam, cg_steps=k)[0] - primal
        return float(np.sqrt(e @ a @ e))

    errors = [a_norm_error(k) for k in (1, 2, 4, 8, 64)]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 1e-2 * np.sqrt(primal @ a @ primal)
    assert errors[-1] < 1e-8 * np.sqrt(primal @ a @ primal)


# --- repairs, the gradient of a saturated loss, the minimum-norm promise in float32 --------------


def to32(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def repair_of(state):
    return pb.solvers.REPAIRS[int(state.step_info.repair)]


def test_primal_repairs_a_damping_below_its_rounding_floor_with_qr():
    """float32, lam far below eps ||J^T J||: the Cholesky step is noise (or NaN), so the trial
    is solved by QR of [J; sqrt(lam) I] in the same update and says so: a trial evaluated,
    its step the qr form's and close to the float64 step. At a lam well above the floor,
    Cholesky."""
    params, residual_fn, batch = mlp_problem(40, (1, 6, 1), seed=7)
    for lam, repair in ((1e-7, "qr"), (1.0, "none")):
        opt = pb.levenberg_marquardt(init_damping=lam, init_damping_relative=False)
        step, state = one_step(opt, to32(params), residual_fn, to32(batch))
        assert repair_of(state) == repair and np.isfinite(state.step_info.trial_loss), lam
        taken = flat(step) if bool(state.step_info.accepted) else None
        qr = raw_step("qr", to32(params), residual_fn, to32(batch), lam)[0]
        ref = raw_step("qr", params, residual_fn, batch, lam)[0]
        delta = raw_step("primal", to32(params), residual_fn, to32(batch), lam)[0]
        np.testing.assert_allclose(delta, qr, rtol=0, atol=1e-4 * np.abs(qr).max())
        np.testing.assert_allclose(delta, ref, rtol=0, atol=1e-2 * np.abs(ref).max())
        if taken is not None:
            np.testing.assert_array_equal(taken, delta)


def test_float32_fit_never_rejects_a_trial_for_a_failed_factorisation():
    """Issue 11: 1-20-1 tanh, 2,000 points, float32, full batch and minibatches of 1,000. The
    Cholesky of J^T J + lam I failed on a third of the trials (gain ratio -inf, lam pinned near
    1e-4, MSE 1.1e-10 after 200 trials); repaired, no trial fails and the fit gets as far as
    solve="qr" does."""
    n = 2000
    xs = jnp.linspace(-1, 1, n, dtype=jnp.float32)[:, None]
    batch = (xs, jnp.exp(-(xs**2)))
    init, apply = pb.nets.mlp([1, 20, 1], "tanh")
    residual_fn = pb.regression_residuals(apply)
    params = to32(init(jax.random.key(0)))
    rng = np.random.default_rng(0)
    minibatches = np.stack([rng.permutation(n)[:1000] for _ in range(100)])

    def mse(solve, **kwargs):
        opt = pb.levenberg_marquardt(solve=solve)
        result = pb.fit(residual_fn, params, opt, batch, max_steps=100, **kwargs)
        assert not np.any(np.isneginf(result.history.gain_ratio)), solve
        return 2 * float(pb.loss(residual_fn, result.params, batch)) / n

    for kwargs in ({}, {"batch_indices": minibatches}):
        auto, qr = mse("auto", **kwargs), mse("qr", **kwargs)
        assert auto < 1e-9 and auto < 3 * qr, (auto, qr, kwargs)


def ill_conditioned_least_squares(cond, m=50, n=8, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(m, n)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = (u * np.logspace(0, -np.log10(cond), n)) @ v.T
    x = rng.normal(size=n)
    return a, x, a @ x


@pytest.mark.parametrize("solve", ["auto", "primal", "qr", "cg"])
def test_float32_gauss_newton_does_not_square_the_condition_number(solve):
    """Issue 12: float32 linear least squares with cond(A) = 1e4 (cond(A^T A) = 1e8 > 1/eps).
    The pseudo-inverse of A^T A ended at relative error 0.49; primal now sees that its normal
    matrix cannot resolve the spectrum and solves from A by SVD (QR-level accuracy)."""
    a, x, y = ill_conditioned_least_squares(1e4)
    residual_fn = lambda p, b: b[0] @ p - b[1]  # noqa: E731
    batch = (jnp.asarray(a, jnp.float32), jnp.asarray(y, jnp.float32))
    result = pb.fit(residual_fn, jnp.zeros(8, jnp.float32), pb.gauss_newton(solve=solve), batch,
                    max_steps=10)  # fmt: skip
    err = np.linalg.norm(np.asarray(result.params, np.float64) - x) / np.linalg.norm(x)
    assert err < 1e-4, err
    if solve in ("auto", "primal"):
        assert repair_of(result.state.opt_state) == "svd"


@pytest.mark.parametrize("case", ["N<P", "duplicated examples"])
def test_float32_gauss_newton_cg_keeps_the_minimum_norm_promise(case):
    """Issue 12: CG on the normal equations in float32 took a step 381 (N < P) and 9e7
    (duplicated examples) times the minimum-norm one. CGLS stays in the row space of J."""
    if case == "N<P":
        xs, sizes = jnp.linspace(-1, 1, 10)[:, None], [1, 32, 1]
    else:
        xs, sizes = jnp.tile(jnp.linspace(-1, 1, 5)[:, None], (8, 1)), [1, 4, 1]
    init, apply = pb.nets.mlp(sizes, "tanh")
    residual_fn = pb.regression_residuals(apply)
    params, batch = init(jax.random.key(0)), (xs, jnp.sin(3 * xs))
    step, _ = one_step(pb.gauss_newton(solve="cg"), to32(params), residual_fn, to32(batch))
    jac, r, _ = dense_jacobian(residual_fn, params, batch)
    min_norm = -np.linalg.pinv(jac) @ r
    got = flat(step).astype(np.float64)
    assert np.linalg.norm(got) <= 1.01 * np.linalg.norm(min_norm)
    assert np.linalg.norm(got - min_norm) <= 1e-2 * np.linalg.norm(min_norm)


def test_dual_kernel_cholesky_failure_is_shifted_and_refined():
    """A kernel that is not positive definite even at its rounding floor (here: corrupted on
    purpose) is factorised at a larger shift and the step refined with the exact products:
    the LM step all the same, repair "shifted"."""
    params, residual_fn, batch = mlp_problem(6, (2, 12, 1), seed=5)
    options = _dual.DualOptions(max_steps=60, tol=1e-13)

    def go(params):
        model = _model.build(residual_fn, params, batch, where="test")
        kernel = model.ntk() - 0.5 * jnp.eye(6)  # indefinite
        w, u, repair = _dual._damped(kernel, 1e-3, model.r, model.jvp, model.vjp, options)
        return -w, repair

    delta, repair = jax.jit(go)(params)
    assert pb.solvers.REPAIRS[int(repair)] == "shifted"
    ref = raw_step("qr", params, residual_fn, batch, 1e-3)[0]
    np.testing.assert_allclose(delta, ref, rtol=0, atol=1e-8 * np.abs(ref).max())


def saturated_classifier(scale=100.0, n=40, seed=0):
    """Softmax cross-entropy at logits ~ 1e2: several examples wrong with p_true < eps^2."""
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.normal(size=(n, 2)))
    labels = jnp.asarray((xs[:, 0] > 0).astype(int) + (xs[:, 1] > 1).astype(int))
    init, apply = pb.nets.mlp([2, 6, 3], "tanh")
    params = jax.tree.map(lambda a: scale * a, init(jax.random.key(seed)))
    loss = pb.losses.softmax_cross_entropy()
    return params, pb.losses.network_outputs(apply, loss), (xs, labels), loss


def test_model_gradient_is_the_true_gradient_where_the_whitening_floors():
    """g = J^T r + e equals jax.grad of the loss (the slow twin), and every form solves
    (G + lam I) delta = -g with G the dense GGN, where J^T r alone (r floored at 1/eps) was at
    cosine ~1e-5 to it."""
    params, residual_fn, batch, loss = saturated_classifier()
    model = _model.build(residual_fn, params, batch, where="test")
    want = flat(jax.grad(lambda p: pb.loss(residual_fn, p, batch))(params))
    got = np.asarray(model.r @ model.linearization.dense() + model.e)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
    jac = np.asarray(model.linearization.dense())
    lams = (1e-2,)

    def steps(params):
        model = _model.build(residual_fn, params, batch, where="test")
        options = _cg.CGOptions(400, 1e-15)
        return [[_forms.solve(f, model, lam, None, min_norm=False, cg_options=options).delta
                 for f in FORMS] for lam in lams]  # fmt: skip

    for lam, deltas in zip(lams, jax.jit(steps)(params), strict=True):
        expected = -np.linalg.solve(jac.T @ jac + lam * np.eye(jac.shape[1]), want)
        for form, delta in zip(FORMS, deltas, strict=True):
            np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-6 * np.abs(expected).max(),
                                       err_msg=f"{form} lam={lam}")  # fmt: skip


def test_levenberg_marquardt_trains_out_of_saturated_logits():
    """Issue 12: LM stopped at loss 2,457 with ||g|| = 1,341 (Adam from the same start: 0.028),
    its model gradient blind to the examples wrong with extreme confidence. With the true
    gradient in the model it takes the loss down by orders of magnitude."""
    params, residual_fn, batch, loss = saturated_classifier()
    result = pb.fit(residual_fn, params, pb.levenberg_marquardt(loss=loss), batch, max_steps=150)
    start = result.history.loss[0]
    assert start > 1e3 and result.history.loss[-1] < 1e-3 * start, result.history.loss[-1]


# --- Levenberg-Marquardt: the update ------------------------------------------------------------


def test_linear_problem_gain_ratio_is_one_and_step_is_the_twin():
    a, y, x0 = linear_problem(20, 5)
    params = {"x": x0}
    opt = pb.levenberg_marquardt(init_damping=0.5, init_damping_relative=False)
    step, state = one_step(opt, params, linear_residuals, (a, y))
    expected = naive_lm_step(linear_residuals, params, (a, y), 0.5)
    np.testing.assert_allclose(step["x"], expected, rtol=1e-11)
    assert float(state.step_info.gain_ratio) == pytest.approx(1.0, abs=1e-10)
    assert bool(state.step_info.accepted) and int(state.step_info.form) == FORMS.index("primal")
    np.testing.assert_allclose(state.step_info.loss, 0.5 * np.sum((a @ x0 - y) ** 2), rtol=1e-14)


def test_non_finite_trial_is_a_rejection_not_a_poisoned_state():
    # Monotone LM, explicitly (watchdog="auto" would be on here, R = P = 1; the watchdog's own
    # NaN-first-trial test is in test_lm_defaults.py).
    opt = pb.levenberg_marquardt(init_damping=1e-9, init_damping_relative=False, watchdog=None)
    residual_fn = lambda p, b: jnp.sqrt(p) - 1.0  # noqa: E731
    params = jnp.array([100.0])
    step, state = one_step(opt, params, residual_fn, None)
    assert not bool(state.step_info.accepted) and np.isneginf(state.step_info.gain_ratio)
    np.testing.assert_array_equal(step, [0.0])
    # Only the trial's own numbers may be non-finite: rho = -inf and the trial loss NaN.
    info = state.step_info._replace(gain_ratio=0.0, trial_loss=0.0)
    leaves = [np.asarray(x) for x in jax.tree.leaves(state._replace(step_info=info))]
    assert all(np.all(np.isfinite(x)) for x in leaves)
    assert float(state.damping) == pytest.approx(2e-9)  # nielsen: lam *= nu = 2


def test_relative_and_absolute_initial_damping():
    params, residual_fn, batch = mlp_problem()  # R = 10 < P = 32: the default's watchdog is on
    jac, _, _ = dense_jacobian(residual_fn, params, batch)
    mono = {"watchdog": None}
    _, state = one_step(pb.levenberg_marquardt(**mono), params, residual_fn, batch)
    assert float(state.step_info.damping) == pytest.approx(1e-3 * np.max(np.sum(jac**2, 0)))
    # With the watchdog the first trial is Gauss-Newton's: 1e-9 of that lam0.
    for opt in (pb.levenberg_marquardt(), pb.levenberg_marquardt(watchdog=8)):
        _, state = one_step(opt, params, residual_fn, batch)
        assert float(state.step_info.damping) == pytest.approx(1e-12 * np.max(np.sum(jac**2, 0)))
    opt = pb.levenberg_marquardt(damping="marquardt", **mono)
    _, state = one_step(opt, params, residual_fn, batch)
    assert float(state.step_info.damping) == pytest.approx(1e-3)
    opt = pb.levenberg_marquardt(init_damping=0.25, init_damping_relative=True, **mono)
    _, state = one_step(opt, params, residual_fn, batch)
    assert float(state.step_info.damping) == pytest.approx(0.25 * np.max(np.sum(jac**2, 0)))


def test_damping_is_bounded():
    params, residual_fn, batch = mlp_problem()
    opt = pb.levenberg_marquardt(
        init_damping=1e9, init_damping_relative=False, damping_bounds=(1e-3, 10.0), watchdog=None
    )
    _, state = one_step(opt, params, residual_fn, batch)
    assert float(state.step_info.damping) == 10.0 and float(state.damping) <= 10.0
    # The watchdog's Gauss-Newton trial (lam0 1e-9-fold) is bounded below the same way.
    opt = pb.levenberg_marquardt(init_damping=1e9, init_damping_relative=False,
                                 damping_bounds=(1e-3, 10.0))  # fmt: skip
    _, state = one_step(opt, params, residual_fn, batch)
    assert float(state.step_info.damping) == 1e-3


def test_marquardt_scaling_is_a_running_max():
    params, residual_fn, batch = mlp_problem()
    opt = pb.levenberg_marquardt(scaling="marquardt")
    update = jax.jit(lambda p, s, b: opt.update(None, s, p, residual_fn=residual_fn, batch=b))
    state = opt.init(params)
    _, state = update(params, state, batch)
    first = np.asarray(state.scale)
    jac, _, _ = dense_jacobian(residual_fn, params, batch)
    np.testing.assert_allclose(first, np.sum(jac**2, 0), rtol=1e-12)
    small = (batch[0] * 0.1, batch[1])  # smaller inputs: smaller diag(J^T J) for most columns
    _, state = update(params, state, small)
    jac_small, _, _ = dense_jacobian(residual_fn, params, small)
    np.testing.assert_allclose(state.scale, np.maximum(first, np.sum(jac_small**2, 0)))


@pytest.mark.parametrize(
    ("rho", "accepted", "lam", "nu"),
    [
        (1.0, True, 1 / 3, 2.0),
        (0.5, True, 1.0, 2.0),
        (0.75, True, 0.875, 2.0),
        (-1, False, 2.0, 4.0),
    ],
)
def test_nielsen_rule(rho, accepted, lam, nu):
    out = _damping.RULES["nielsen"].update(
        jnp.asarray(1.0), jnp.asarray(2.0), jnp.asarray(1.0), jnp.asarray(rho),
        jnp.asarray(accepted), jnp.asarray(0.5),
    )  # fmt: skip
    np.testing.assert_allclose(out[:2], (lam, nu))


def test_marquardt_and_trust_region_rules():
    one, two = jnp.asarray(1.0), jnp.asarray(2.0)
    rule = _damping.RULES["marquardt"].update
    assert float(rule(one, two, one, 0.5, jnp.asarray(True), one)[0]) == pytest.approx(0.1)
    assert float(rule(one, two, one, -1.0, jnp.asarray(False), one)[0]) == pytest.approx(10)
    rule = _damping.RULES["trust_region"].update
    # rho < 1/4: radius = 1/2 min(2, 10 * 1) = 1; the step (1) fits: lam *= 2.
    lam, _, radius = rule(one, two, two, jnp.asarray(0.1), jnp.asarray(True), one)
    assert float(radius) == pytest.approx(1.0) and float(lam) == pytest.approx(2.0)
    # rejected with a step of 8 > radius 2: radius 1, lam *= 2 * (8 / 1).
    lam, _, radius = rule(one, two, two, jnp.asarray(-1.0), jnp.asarray(False), 4 * two)
    assert float(radius) == pytest.approx(1.0) and float(lam) == pytest.approx(16.0)
    # rho >= 3/4: radius = 2 ||step||, lam /= 2.
    lam, _, radius = rule(one, two, two, jnp.asarray(0.9), jnp.asarray(True), two)
    assert float(radius) == pytest.approx(4.0) and float(lam) == pytest.approx(0.5)


def test_composes_with_optax_chain():
    a, y, x0 = linear_problem(20, 5)
    params = {"x": x0}
    lm = pb.levenberg_marquardt(init_damping=0.5, init_damping_relative=False)
    chained = optax.chain(lm, optax.scale(0.5))
    step, _ = one_step(chained, params, linear_residuals, (a, y))
    full, _ = one_step(lm, params, linear_residuals, (a, y))
    np.testing.assert_allclose(step["x"], 0.5 * full["x"], rtol=1e-14)


def test_state_is_arrays_only_and_vmaps():
    params, residual_fn, batch = mlp_problem()
    opt = pb.levenberg_marquardt()
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
    states = jax.vmap(opt.init)(stacked)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(states))
    steps, states = jax.vmap(
        lambda p, s: opt.update(None, s, p, residual_fn=residual_fn, batch=batch)
    )(stacked, states)
    assert states.step_info.loss.shape == (2,) and np.all(np.isfinite(states.step_info.loss))


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"solve": "lu"}, "unknown solve='lu'"),
        ({"damping": "fletcher"}, "unknown damping='fletcher'"),
        ({"scaling": "adaptive"}, "unknown scaling='adaptive'"),
        ({"damping_bounds": (1.0, 0.5)}, "damping_bounds"),
        ({"init_damping": -1.0}, "init_damping"),
        ({"cg_max_steps": 0}, "cg_max_steps"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pb.levenberg_marquardt(**kwargs)


def test_bad_inputs_raise_clearly():
    opt = pb.gauss_newton()
    with pytest.raises(ValueError, match="unknown solve"):
        pb.gauss_newton(solve="svd")
    with pytest.raises(TypeError, match="floating-point"):
        opt.init({"x": jnp.arange(3)})
    params = {"x": jnp.ones(3)}
    with pytest.raises(TypeError, match="float array"):
        opt.update(None, opt.init(params), params,
                   residual_fn=lambda p, b: (p["x"] > 0).astype(jnp.int32), batch=None)  # fmt: skip
    with pytest.raises(TypeError, match="residual_fn=... and batch"):
        opt.update(None, opt.init(params), params)


def _designed(rows: int, cols: int, sigmas, seed: int = 0):
    """A (rows, cols) with singular values ``sigmas`` and a y it cannot fit exactly."""
    rng = np.random.default_rng(seed)
    k = len(sigmas)
    u = np.linalg.qr(rng.normal(size=(rows, k)))[0]
    v = np.linalg.qr(rng.normal(size=(cols, k)))[0]
    return (u * np.asarray(sigmas)) @ v.T, rng.normal(size=rows)


@pytest.mark.parametrize("solve, shape", [("primal", (12, 6)), ("qr", (12, 6)), ("dual", (5, 9)),
                                          ("auto", (12, 6)), ("auto", (5, 9))])  # fmt: skip
@pytest.mark.parametrize("rcond", [1e-6, 1e-3])
def test_gauss_newton_rcond_is_the_truncated_pseudo_inverse(solve, shape, rcond):
    """GN(rcond=c) == -V_k S_k^-1 U_k^T r over the singular values above c sigma_max (numpy
    SVD, the slow twin), on a linear problem whose J spans 1 .. 1e-9; without rcond the
    primal and qr steps keep the 1e-9 direction (the exact minimum-norm step; the dual form's
    kernel cannot resolve it and drops it by default)."""
    sigmas = [1.0, 0.3, 1e-2, 1e-4, 1e-9][: min(shape) - 0]
    a, y = _designed(*shape, sigmas)
    a, y = jnp.asarray(a), jnp.asarray(y)
    fn = lambda p, b: b[0] @ p - b[1]  # noqa: E731
    p0 = jnp.zeros(shape[1])
    opt = pb.gauss_newton(solve=solve, rcond=rcond)
    step, _ = opt.update(None, opt.init(p0), p0, residual_fn=fn, batch=(a, y))
    u, s, vt = np.linalg.svd(np.asarray(a), full_matrices=False)
    keep = s > rcond * s[0]
    twin = -(vt[keep].T @ ((u[:, keep].T @ -np.asarray(y)) / s[keep]))
    np.testing.assert_allclose(step, twin, rtol=1e-7, atol=1e-9)
    if shape[0] > shape[1]:
        exact, _ = pb.gauss_newton(solve=solve).update(
            None, opt.init(p0), p0, residual_fn=fn, batch=(a, y)
        )
        assert np.linalg.norm(exact) > 1e3 * np.linalg.norm(step)  # the 1e-9 direction


@pytest.mark.parametrize("kwargs", [dict(rcond=0.0), dict(rcond=1.0), dict(rcond=-1e-3),
                                    dict(rcond=1e-6, solve="cg")])  # fmt: skip
def test_gauss_newton_rcond_bad_values_are_refused(kwargs):
    with pytest.raises(ValueError, match="rcond"):
        pb.gauss_newton(**kwargs)
