"""pb.hessian_free against its slow twin: Martens' algorithm written plainly in numpy on the
dense Gauss-Newton matrix G = J^T J (and J^T H J for softmax cross-entropy), float64."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import paribus as pb
from paribus.solvers import _hessian_free as hf
from tests.helpers import assert_compiles_once, random_mlp


def regression_problem(seed: int, sizes=(1, 3, 1), n: int = 8):
    params, apply = random_mlp(jax.random.key(seed), list(sizes))
    xs = jnp.linspace(-1.0, 1.0, n)[:, None]
    batch = (xs, jnp.sin(3.0 * xs))
    return pb.regression_residuals(apply), params, batch


def dense_model(residual_fn, params, batch):
    """(G, g, L(flat)) of 1/2 ||r||^2 from the dense Jacobian of jax.jacfwd."""
    flat, unravel = ravel_pytree(params)

    def r(v):
        return residual_fn(unravel(v), batch).reshape(-1)

    J = np.asarray(jax.jacfwd(r)(flat))
    res = np.asarray(r(flat))

    def loss_at(v):
        out = np.asarray(r(flat + jnp.asarray(v)))
        return 0.5 * float(out @ out)

    return J.T @ J, J.T @ res, loss_at


def slow_martens_step(G, g, lam, x0, precond_diag, *, max_steps, tol, loss_at, backtrack):
    """Martens (2010), plainly: PCG on (G + lam I) p = -g from x0 with his progress test, the
    iterates at ceil(1.3^j) kept, then backtracking on the loss. Returns (step, CG steps,
    how many kept iterates it stepped back)."""
    A = G + lam * np.eye(len(g))
    b = -g
    m = np.ones_like(g) if precond_diag is None else precond_diag
    save_at = {math.ceil(1.3**j) for j in range(200) if math.ceil(1.3**j) <= max_steps}
    x = x0.copy()
    r = b - A @ x
    y = r / m
    p = y.copy()
    phis = [-0.5 * x @ (b + r)]
    saved = []
    i = 0
    while i < max_steps:
        ap = A @ p
        curvature, ry = p @ ap, r @ y
        alpha = ry / curvature
        x = x + alpha * p
        r_new = r - alpha * ap
        y_new = r_new / m
        p = y_new + (r_new @ y_new) / ry * p
        r, y = r_new, y_new
        i += 1
        phi = -0.5 * x @ (b + r)
        phis.append(phi)
        if i in save_at:
            saved.append(x.copy())
        k = max(10, i // 10)
        if i > k and phi < 0 and (phi - phis[i - k]) / phi < k * tol:
            break
        if r @ r <= (16 * np.finfo(float).eps) ** 2 * (b @ b):
            break
    if not saved or not np.array_equal(saved[-1], x):
        saved.append(x)
    j = len(saved) - 1
    if backtrack:
        while j > 0 and loss_at(saved[j - 1]) < loss_at(saved[j]):
            j -= 1
    return saved[j], i, len(saved) - 1 - j


def one_update(opt, state, residual_fn, params, batch):
    step, state = jax.jit(
        lambda s, p: opt.update(None, s, p, residual_fn=residual_fn, batch=batch)
    )(state, params)
    return ravel_pytree(step)[0], state


@pytest.mark.parametrize("precondition", [False, True])
def test_converged_cg_step_is_the_damped_gauss_newton_step(precondition):
    residual_fn, params, batch = regression_problem(0)
    G, g, _ = dense_model(residual_fn, params, batch)
    lam = 0.3
    opt = pb.hessian_free(init_damping=lam, warm_start=0.0, backtrack=False, cg_max_steps=200,
                          cg_tol=1e-14, preconditioner="ggn" if precondition else None)  # fmt: skip
    step, state = one_update(opt, opt.init(params), residual_fn, params, batch)
    expected = np.linalg.solve(G + lam * np.eye(len(g)), -g)
    np.testing.assert_allclose(step, expected, rtol=1e-8, atol=1e-10)
    assert int(state.cg_steps) < 200  # Martens' progress test stopped it


@pytest.mark.parametrize(
    ("seed", "lam", "max_steps", "warm", "backtrack"),
    [(0, 1e-3, 6, 0.0, True), (1, 1e-1, 6, 0.95, True), (2, 1e-1, 30, 0.95, True),
     (3, 1e-2, 5, 0.95, False), (2, 1e-2, 4, 0.95, True)],
)  # fmt: skip
def test_step_equals_slow_twin_with_warm_start_preconditioner_and_backtracking(
    seed, lam, max_steps, warm, backtrack
):
    residual_fn, params, batch = regression_problem(seed, sizes=(1, 4, 1), n=12)
    G, g, loss_at = dense_model(residual_fn, params, batch)
    previous = np.asarray(jax.random.normal(jax.random.key(seed + 10), g.shape)) * 0.1
    opt = pb.hessian_free(init_damping=lam, warm_start=warm, backtrack=backtrack,
                          cg_max_steps=max_steps)  # fmt: skip
    state = opt.init(params)._replace(previous=jnp.asarray(previous))
    step, state = one_update(opt, state, residual_fn, params, batch)
    diag = (np.diag(G) + lam) ** 0.75
    twin, cg_steps, back = slow_martens_step(G, g, lam, warm * previous, diag,
                                             max_steps=max_steps, tol=5e-4, loss_at=loss_at,
                                             backtrack=backtrack)  # fmt: skip
    accepted = loss_at(twin) < loss_at(np.zeros_like(twin))
    assert bool(state.step_info.accepted) == accepted
    # Truncated CG amplifies the last-digit differences between the dense products and the
    # structured ones (by 10-1000x per iteration on these ill-conditioned problems): the cases
    # stop early enough for 1e-8.
    np.testing.assert_allclose(step, twin if accepted else 0 * twin, rtol=1e-8, atol=1e-12)
    assert int(state.cg_steps) == cg_steps
    assert int(state.backtracked) == back


def test_backtracking_steps_back_on_a_truncated_overshooting_solve():
    # Far from the minimum with a tiny damping, the later CG iterates overshoot: the twin and
    # the transformation both step back, to the same iterate.
    residual_fn, params, batch = regression_problem(0, sizes=(1, 6, 1), n=16)
    G, g, loss_at = dense_model(residual_fn, params, batch)
    lam, max_steps = 1e-2, 7
    opt = pb.hessian_free(init_damping=lam, warm_start=0.0, cg_max_steps=max_steps)
    step, state = one_update(opt, opt.init(params), residual_fn, params, batch)
    twin, _, back = slow_martens_step(G, g, lam, np.zeros_like(g), (np.diag(G) + lam) ** 0.75,
                                      max_steps=max_steps, tol=5e-4, loss_at=loss_at,
                                      backtrack=True)  # fmt: skip
    assert back > 0 and int(state.backtracked) == back
    np.testing.assert_allclose(step, twin, rtol=1e-10, atol=1e-12)


def test_gain_ratio_and_damping_follow_martens_rule():
    residual_fn, params, batch = regression_problem(5)
    G, g, loss_at = dense_model(residual_fn, params, batch)
    opt = pb.hessian_free(warm_start=0.0, backtrack=False)
    update = jax.jit(lambda s: opt.update(None, s, params, residual_fn=residual_fn, batch=batch))
    for lam in (1e-3, 1.0, 1e3):
        step, state = update(opt.init(params)._replace(damping=jnp.asarray(lam)))
        step = ravel_pytree(step)[0]
        info = state.step_info
        l0, l1 = loss_at(np.zeros_like(g)), loss_at(step if bool(info.accepted) else 0 * g)
        predicted = -(g @ np.asarray(step) + 0.5 * np.asarray(step) @ G @ np.asarray(step))
        if bool(info.accepted):
            np.testing.assert_allclose(float(info.gain_ratio), (l0 - l1) / predicted, rtol=1e-7)
        rho = float(info.gain_ratio)
        factor = 1.5 if rho < 0.25 else (2 / 3 if rho > 0.75 else 1.0)
        np.testing.assert_allclose(float(state.damping), lam * factor, rtol=1e-12)
        assert float(info.damping) == lam
        np.testing.assert_allclose(float(info.loss), l0, rtol=1e-12)
        np.testing.assert_allclose(float(info.grad_norm), np.linalg.norm(g), rtol=1e-10)


@pytest.mark.parametrize(
    ("rho", "factor"),
    [(-np.inf, 1.5), (-1.0, 1.5), (0.2, 1.5), (0.25, 1.0), (0.5, 1.0), (0.75, 1.0), (0.9, 2 / 3)],
)
def test_damping_rule_table(rho, factor):
    lam = jnp.asarray(2.0)
    new = hf._next_damping(lam, jnp.asarray(rho), True, 1e-20, 1e16)
    np.testing.assert_allclose(float(new), 2.0 * factor)
    assert float(hf._next_damping(lam, jnp.asarray(rho), False, 1e-20, 1e16)) == 2.0
    assert float(hf._next_damping(jnp.asarray(1e16), jnp.asarray(-1.0), True, 1e-20, 1e16)) == 1e16


def test_generalised_gauss_newton_step_on_softmax_cross_entropy():
    loss = pb.losses.softmax_cross_entropy()
    params, apply = random_mlp(jax.random.key(6), [2, 4, 3])
    xs = jax.random.normal(jax.random.key(7), (10, 2))
    labels = jnp.arange(10) % 3
    residual_fn = pb.losses.network_outputs(apply, loss)
    flat, unravel = ravel_pytree(params)
    logits = lambda v: jax.vmap(apply, (None, 0))(unravel(v), xs)  # noqa: E731
    J = np.asarray(jax.jacfwd(logits)(flat))  # (N, m, P)
    probs = np.asarray(jax.nn.softmax(logits(flat)))
    H = np.stack([np.diag(p) - np.outer(p, p) for p in probs])
    G = np.einsum("nip,nij,njq->pq", J, H, J)
    total = lambda v: jnp.sum(jax.vmap(loss.value)(logits(v), labels))  # noqa: E731
    g = np.asarray(jax.grad(total)(flat))
    lam = 0.1
    opt = pb.hessian_free(init_damping=lam, warm_start=0.0, backtrack=False, cg_max_steps=300,
                          cg_tol=1e-14, preconditioner=None)  # fmt: skip
    _, state = one_update(opt, opt.init(params), residual_fn, params, (xs, labels))
    # state.previous is the CG solution, whether or not the step lowered the loss
    np.testing.assert_allclose(state.previous, np.linalg.solve(G + lam * np.eye(len(g)), -g),
                               rtol=1e-7, atol=1e-10)  # fmt: skip
    np.testing.assert_allclose(float(state.step_info.grad_norm), np.linalg.norm(g), rtol=1e-10)


def test_non_finite_trial_is_rejected_with_zeros_and_more_damping():
    residual_fn = lambda p, b: jnp.sqrt(p) - 1.0  # noqa: E731
    opt = pb.hessian_free(init_damping=1e-6)
    params = jnp.array([100.0])
    step, state = opt.update(None, opt.init(params), params, residual_fn=residual_fn, batch=None)
    info = state.step_info
    assert float(step[0]) == 0.0 and not bool(info.accepted)
    assert float(info.gain_ratio) == -np.inf and float(info.step_norm) > 100
    np.testing.assert_allclose(float(state.damping), 1.5e-6)


def test_fit_records_damping_gain_ratio_and_acceptance_and_converges():
    residual_fn, params, batch = regression_problem(8, sizes=(1, 5, 1), n=20)
    opt = pb.hessian_free(init_damping=1e-2, cg_max_steps=40)
    result = pb.fit(residual_fn, params, opt, batch, max_steps=60)
    h = result.history
    # The last entry is what the final state's StepInfo says.
    info = result.state.opt_state.step_info
    k = result.steps
    for field in ("damping", "gain_ratio", "step_norm"):
        np.testing.assert_allclose(getattr(h, field)[k], float(getattr(info, field)), rtol=1e-12)
    assert h.accepted[k] == bool(info.accepted)
    # Every recorded damping follows Martens' rule from the gain ratio recorded before it.
    for j in range(1, k):
        factor = 1.5 if h.gain_ratio[j] < 0.25 else (2 / 3 if h.gain_ratio[j] > 0.75 else 1.0)
        np.testing.assert_allclose(h.damping[j + 1], h.damping[j] * factor, rtol=1e-12)
    # A rejected step leaves the loss where it was; an accepted one lowers it.
    dl = np.diff(h.loss)
    assert (dl[~h.accepted[1:]] == 0).all() and (dl[h.accepted[1:]] < 0).all()
    assert h.accepted[1:].any() and (~h.accepted[1:]).any()
    assert (h.solve_form[1:] == pb.solvers.FORMS.index("cg")).all()
    assert h.loss[-1] < 1e-3 * h.loss[0]


def test_state_is_arrays_only_vmaps_and_update_compiles_once():
    residual_fn, params, batch = regression_problem(9)
    opt = pb.hessian_free()
    state = opt.init(params)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))
    stacked = jax.tree.map(lambda a: jnp.stack([a, 1.1 * a]), params)

    def run(p):
        return pb.fit(residual_fn, p, opt, batch, max_steps=5).history.loss

    losses = jax.jit(jax.vmap(run))(stacked)
    assert losses.shape == (2, 6) and bool(jnp.all(jnp.isfinite(losses)))
    update = jax.jit(lambda s, p: opt.update(None, s, p, residual_fn=residual_fn, batch=batch))
    assert_compiles_once(update, state, params)


def test_save_points_are_martens_geometric_iterations():
    assert hf.save_points(10).tolist() == [1, 2, 3, 4, 5, 7, 9]
    assert hf.save_points(1).tolist() == [1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"damping_bounds": (1.0, 0.5)}, "damping_bounds"),
        ({"init_damping": 0.0}, "init_damping"),
        ({"warm_start": 1.5}, "warm_start"),
        ({"preconditioner": "fisher"}, "preconditioner"),
        ({"cg_max_steps": 0}, "cg_max_steps"),
        ({"cg_tol": -1.0}, "cg_tol"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pb.hessian_free(**kwargs)


def test_update_without_residual_fn_says_what_it_needs():
    opt = pb.hessian_free()
    params = jnp.zeros(2)
    with pytest.raises(TypeError, match="residual_fn"):
        opt.update(None, opt.init(params), params)
