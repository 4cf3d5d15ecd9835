"""damping="minpack": MINPACK's trust region (Moré 1978), against slow numpy twins."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nets_zoo import ZOO, N
from zoo import PROBLEMS

import paribus as pb
from paribus.solvers import _minpack, _model

BY_NAME = {p.name: p for p in PROBLEMS}


def _model_of(jac: np.ndarray, r0: np.ndarray, dtype=jnp.float64):
    """The Gauss-Newton model of the linear residuals J theta + r0 at theta = 0."""
    j, r = jnp.asarray(jac, dtype), jnp.asarray(r0, dtype)
    params = jnp.zeros(jac.shape[1], dtype)
    return _model.build(lambda p, b: j @ p + r, params, None, where="test")


def _twin_step(jac, r, w, radius):
    """The step solving (J^T J + par W^2) p = -J^T r with ||W p|| = radius, by numpy: Gauss-
    Newton's step of least ||W p|| (the limit of p(par) as par -> 0) where it is within 1.1
    radius, else par by bisection (in log par) on the monotone ||W p(par)||, each par a dense
    solve."""
    g = jac.T @ r
    newton = np.linalg.lstsq(jac / w, -r, rcond=None)[0] / w
    if np.linalg.norm(w * newton) - radius <= 0.1 * radius:
        return newton, 0.0
    a = jac.T @ jac

    def p_of(par):
        return np.linalg.solve(a + par * np.diag(w**2), -g)

    hi = np.linalg.norm(g / w) / radius
    lo = hi * 1e-40
    for _ in range(300):
        mid = np.sqrt(lo * hi)
        if np.linalg.norm(w * p_of(mid)) > radius:
            lo = mid
        else:
            hi = mid
    par = np.sqrt(lo * hi)
    return p_of(par), par


@pytest.mark.parametrize(
    "shape, radius, rank",
    [((12, 5), 0.05, 5), ((12, 5), 1e3, 5), ((4, 9), 0.05, 4), ((4, 9), 1e3, 4),
     ((12, 5), 0.05, 3), ((12, 5), 1e3, 3)],
)  # fmt: skip
def test_step_solves_the_secular_equation(shape, radius, rank):
    """The step is the damped step on the boundary ||D^1/2 p|| = radius (or Gauss-Newton's
    minimum-norm step inside it), as the numpy twin finds by bisection; also for a wide J and
    a rank-deficient one (Gauss-Newton's step then comes from the SVD of J)."""
    rng = np.random.default_rng(sum(shape) + rank)
    jac = rng.normal(size=(shape[0], rank)) @ rng.normal(size=(rank, shape[1]))
    jac = jac * rng.uniform(0.1, 10, size=shape[1])  # columns on different scales
    r = rng.normal(size=shape[0])
    d = rng.uniform(0.5, 4.0, size=shape[1])
    model = _model_of(jac, r)
    got = _minpack.step(model, jnp.asarray(d), jnp.asarray(radius))
    want, par = _twin_step(jac, r, np.sqrt(d), radius)
    np.testing.assert_allclose(np.asarray(got.solution.delta), want, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(float(got.par), par, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got.solution.jd), jac @ want, rtol=1e-7, atol=1e-9)
    if par > 0:
        np.testing.assert_allclose(float(got.scaled_norm), radius, rtol=1e-9)
    else:
        assert float(got.scaled_norm) <= 1.1 * radius


def test_step_in_float32_meets_the_radius():
    rng = np.random.default_rng(0)
    jac, r = rng.normal(size=(30, 6)), rng.normal(size=30)
    model = _model_of(jac, r, jnp.float32)
    got = _minpack.step(model, None, jnp.asarray(0.01, jnp.float32))
    assert got.solution.delta.dtype == jnp.float32
    assert float(got.par) > 0
    np.testing.assert_allclose(float(got.scaled_norm), 0.01, rtol=1e-4)
    want, _ = _twin_step(jac, r, np.ones(6), 0.01)
    np.testing.assert_allclose(np.asarray(got.solution.delta), want, rtol=2e-3, atol=1e-6)


def _twin_lmder(residuals, x0, n_trials):
    """MINPACK's lmder, written out in numpy (mode 1 scaling, factor 100): the trial losses
    1/2 ||r(x + p)||^2 of its first ``n_trials`` trials."""
    fun = jax.jit(residuals)
    jac_fn = jax.jit(jax.jacfwd(residuals))
    x = np.asarray(x0, float)
    r, jac = np.asarray(fun(x)), np.asarray(jac_fn(x))
    scale = np.zeros_like(x)
    radius, out = None, []
    for k in range(n_trials):
        scale = np.maximum(scale, np.sum(jac**2, axis=0))
        d = np.where(scale.max() > 0, np.maximum(scale, 1e-12 * scale.max()), 1)
        w = np.sqrt(d)
        if k == 0:
            radius = 100 * np.linalg.norm(w * x) or 100.0
        p, par = _twin_step(jac, r, w, radius)
        pnorm = np.linalg.norm(w * p)
        if k == 0:
            radius = min(radius, pnorm)
        rt = np.asarray(fun(x + p))
        value, trial = 0.5 * r @ r, 0.5 * rt @ rt
        out.append(trial)
        jd = jac @ p
        rho = (value - trial) / -(jd @ (r + 0.5 * jd))
        actred = (value - trial) / value
        dirder = -(jd @ jd + par * pnorm**2) / (2 * value)
        if rho <= 0.25:
            t = 0.5 if actred >= 0 else 0.5 * dirder / (dirder + 0.5 * actred)
            if trial >= 100 * value or t < 0.1:
                t = 0.1
            radius = t * min(radius, pnorm / 0.1)
        elif par == 0 or rho >= 0.75:
            radius = pnorm / 0.5
        if rho > 1e-4:
            x = x + p
            r, jac = rt, np.asarray(jac_fn(x))
    return np.asarray(out)


@pytest.mark.parametrize("name", ["bard", "box_3d", "osborne1", "kowalik_osborne", "meyer"])
def test_minpack_follows_lmder_trial_for_trial(name):
    """The jitted update against the numpy lmder twin from the standard start: the same
    trial losses, trial for trial, over the first 12 trials (rejections included)."""
    problem = BY_NAME[name]
    x0 = jnp.asarray(problem.x0, jnp.float64)
    opt = pb.levenberg_marquardt(damping="minpack")
    residual_fn = lambda p, b: problem.residuals(p)  # noqa: E731
    update = jax.jit(lambda s, p: opt.update(None, s, p, residual_fn=residual_fn, batch=None))
    state, params, got, kept = opt.init(x0), x0, [], []
    for _ in range(12):
        step, state = update(state, params)
        params = params + step
        got.append(float(state.step_info.trial_loss))
        kept.append(bool(state.step_info.accepted))
    want = _twin_lmder(problem.residuals, np.asarray(x0), 12)
    if name == "meyer":  # the radius's shrinking rules are exercised too
        assert not all(kept)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-25)  # box_3d reaches F = 0


@pytest.mark.parametrize(
    "kwargs, given",
    [({"solve": "cg"}, "solve='cg'"), ({"geodesic": 0.75}, "geodesic=0.75"),
     ({"watchdog": 8}, "watchdog=8"), ({"init_damping": 1e-3}, "init_damping=0.001")],
)  # fmt: skip
def test_minpack_refuses_what_drives_lam(kwargs, given):
    with pytest.raises(ValueError, match=f"cannot be combined with {given}"):
        pb.levenberg_marquardt(damping="minpack", **kwargs)


def test_minpack_recovers_from_a_non_finite_trial_and_stops_honestly():
    """sqrt(p) - 1 from p = 100: the first trial (Gauss-Newton's, p = -80) leaves sqrt's
    domain. It is rejected, the radius shrinks to a tenth (lmder's rule for such a trial),
    the parameters never become NaN, and the run converges to p = 1 in float64 and float32."""
    for dtype in (jnp.float64, jnp.float32):
        fn = lambda p, b: jnp.sqrt(p) - 1.0  # noqa: E731
        result = pb.fit(fn, jnp.array([100.0], dtype), pb.levenberg_marquardt(damping="minpack"),
                        max_steps=50)  # fmt: skip
        history = result.history
        # Entry k describes the trial from theta_(k-1); a non-finite trial has rho = -inf.
        assert not bool(history.accepted[1]) and float(history.gain_ratio[1]) == -np.inf
        assert float(history.damping[1]) == 0 and float(history.damping[2]) > 0
        assert np.all(np.isfinite(np.asarray(history.loss)))
        assert result.converged, result.stop_reason
        np.testing.assert_allclose(float(result.params[0]), 1.0, rtol=1e-5)


def test_minpack_is_vmappable_and_float32_works():
    """Two starts of an exponential fit in one jit(vmap(pb.fit)), float32: both reach the
    generating parameters."""
    x = jnp.linspace(0, 3, 50, dtype=jnp.float32)
    y = 2 * jnp.exp(-1.3 * x) + 0.5
    fn = lambda p, b: p[0] * jnp.exp(-p[1] * x) + p[2] - y  # noqa: E731
    opt = pb.levenberg_marquardt(damping="minpack")
    starts = jnp.array([[1.0, 1.0, 0.0], [3.0, 0.5, 1.0]], jnp.float32)
    fitted = jax.jit(jax.vmap(lambda s: pb.fit(fn, s, opt, max_steps=60).params))(starts)
    assert fitted.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(fitted), [[2.0, 1.3, 0.5]] * 2, rtol=1e-4)


def test_minpack_with_a_loss_at_the_outputs():
    """Generalised Gauss-Newton (softmax cross-entropy, 300 digits, 64-8-10 tanh: R = 3,000 >
    P = 610, float32): the trust region works on the whitened residuals (identity scaling
    under a loss) and lowers the loss 1,000-fold in 20 trials, as Nielsen's damping does."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    batch = (jnp.asarray(digits.data[:300] / 16.0, jnp.float32),
             jnp.asarray(digits.target[:300], jnp.int32))  # fmt: skip
    init, apply = pb.nets.mlp([64, 8, 10], "tanh", dtype=jnp.float32)
    loss = pb.losses.softmax_cross_entropy()
    fn = pb.losses.network_outputs(apply, loss)
    for damping in ("minpack", "nielsen"):
        opt = pb.levenberg_marquardt(loss=loss, damping=damping)
        result = pb.fit(fn, init(jax.random.key(0)), opt, batch, max_steps=20)
        history = np.asarray(result.history.loss)
        assert np.all(np.isfinite(history)) and np.all(np.diff(history) <= 0), damping
        assert history[-1] < 1e-3 * history[0], (damping, history[-1] / history[0])


def test_minpack_refuses_a_problem_auto_sends_to_cg():
    """With a memory budget too small for a dense form, solve="auto" picks matrix-free cg;
    MINPACK's trust region needs the dense Jacobian, so it says so instead of forming it."""
    opt = pb.levenberg_marquardt(damping="minpack", memory_budget=1)
    x0 = jnp.ones(3)
    with pytest.raises(ValueError, match="chose matrix-free 'cg'"):
        opt.update(None, opt.init(x0), x0, residual_fn=lambda p, b: p**2 - 1.0, batch=None)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(ZOO))
def test_minpack_on_the_networks_users_bring(name, dtype):
    """Every network of tests/nets_zoo.py (pb.nets, a closure, Equinox, Flax NNX, a CNN, an
    attention block, an RNN), float64 and float32, with R = 2 N < P (the SVD path) and R > P
    (the Gram's eigendecomposition): the runs stay finite, never accept a rise of L, and
    lower it."""
    apply, params, xs = ZOO[name](dtype=dtype)
    n_params = sum(np.size(p) for p in jax.tree.leaves(params))
    rounding = 1e3 * np.finfo(dtype).eps
    for n in (N, n_params):  # R = 2 N: below P, then above it
        inputs = jax.random.normal(jax.random.key(n), (n, *xs.shape[1:]), dtype)
        batch = (inputs, jnp.sin(jnp.arange(2 * n, dtype=dtype).reshape(n, 2)))
        result = pb.fit(pb.regression_residuals(apply), params,
                        pb.levenberg_marquardt(damping="minpack"), batch, max_steps=10)  # fmt: skip
        loss = np.asarray(result.history.loss, float)
        assert result.history.loss.dtype == dtype
        assert np.all(np.isfinite(loss)), (n, loss)
        assert np.all(np.diff(loss) <= rounding * loss[:-1]), (n, loss)
        assert loss[-1] < 0.9 * loss[0], (n, loss)
