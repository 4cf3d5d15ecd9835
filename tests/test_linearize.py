"""pb.linearize on the networks users bring, against the dense twin (float64, relative 1e-10).

The twin is the obvious computation: ``jax.jacrev`` of the whole batch's (whitened) residuals
with respect to the ravelled parameters, then J J^T, J v, J^T u, sum J^2, and per-example
gradients J_i^T u_i. Every quantity of the linearisation (built from the layers it finds in the
function's jaxpr, or by the fallbacks) must equal it, with the squared loss and with softmax
cross-entropy.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import count_compiles
from jax.flatten_util import ravel_pytree
from nets_zoo import ZOO, N

import paribus as pb

LOSSES = {"squared": None, "softmax": pb.losses.softmax_cross_entropy()}


def _batched_mlp(params, xs):
    """The pb.nets MLP written over the whole batch, as most users write it."""
    a = xs
    layers = params["layers"]
    for i, layer in enumerate(layers):
        a = a @ layer["w"] + layer["b"][None, :]
        a = a if i == len(layers) - 1 else jnp.tanh(a)
    return a


def problem(arch: str, loss_name: str, whole_batch: bool = False):
    """(residual_fn, params, batch, loss) for one network of the zoo."""
    apply, params, xs = ZOO[arch]()
    loss = LOSSES[loss_name]
    keys = jax.random.split(jax.random.key(7), 2)
    if loss is None:
        ys = jax.random.normal(keys[0], (N, 2), xs.dtype)
        if whole_batch:
            return (lambda p, b: _batched_mlp(p, b[0]) - b[1]), params, (xs, ys), None
        return pb.regression_residuals(apply), params, (xs, ys), None
    labels = jax.random.randint(keys[1], (N,), 0, 2)
    if whole_batch:
        return (lambda p, b: (_batched_mlp(p, b[0]), b[1])), params, (xs, labels), loss
    return pb.losses.network_outputs(apply, loss), params, (xs, labels), loss


def dense_twin(residual_fn, params, batch, loss):
    """(r (R,), J (R, P)) of the whitened problem, by jax.jacrev of the whole batch."""
    flat, unravel = ravel_pytree(params)
    if loss is None:

        def r_of(theta):
            return ravel_pytree(residual_fn(unravel(theta), batch))[0]

        return r_of(flat), jax.jacrev(r_of)(flat)
    z, t = residual_fn(params, batch)
    jac = jax.jacrev(lambda th: residual_fn(unravel(th), batch)[0])(flat)  # (N, m, P)
    rw, s = jax.vmap(loss.whiten)(z, t)
    return rw.reshape(-1), jnp.einsum("nij,njp->nip", s, jac).reshape(-1, flat.size)


def close(got, want, what, rtol=1e-10):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(np.max(np.abs(want)), 1e-300)
    err = np.max(np.abs(got - want)) / scale
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


CASES = [(arch, loss, False) for arch in ZOO for loss in LOSSES]
CASES += [("pbnets", "squared", True), ("pbnets", "softmax", True)]


@pytest.mark.parametrize(
    "arch, loss_name, whole_batch", CASES, ids=[f"{a}-{b}{'-batch' * c}" for a, b, c in CASES]
)
def test_every_quantity_equals_the_dense_twin(arch, loss_name, whole_batch):
    residual_fn, params, batch, loss = problem(arch, loss_name, whole_batch)
    flat, unravel = ravel_pytree(params)
    r, jac = dense_twin(residual_fn, params, batch, loss)
    v = jax.random.normal(jax.random.key(3), flat.shape, flat.dtype)
    u = jax.random.normal(jax.random.key(4), r.shape, r.dtype)

    @jax.jit
    def everything(params):
        lin = pb.linearize(residual_fn, params, batch, loss=loss)
        return {
            "value": lin.value,
            "r": lin.r,
            "ntk": lin.ntk(),
            "jvp": lin.jvp(unravel(v)),
            "vjp": ravel_pytree(lin.vjp(u))[0],
            "grad": ravel_pytree(lin.grad())[0],
            "diag": ravel_pytree(lin.jtj_diag())[0],
            "norms": lin.per_example_grad_norms(),
            "dense": lin.dense(),
            "structured": lin.dense(structured=True),
            "kernel": (ops := lin.kernel()).matrix,
            "kernel vjp": ops.vjp_flat(u),
            "kernel jvp": ops.jvp_flat(v),
        }

    got = everything(params)
    per_example = jnp.einsum("nm,nmp->np", r.reshape(N, -1), jac.reshape(N, -1, flat.size))
    if loss is None:
        value = 0.5 * jnp.vdot(r, r)
    else:
        z, t = residual_fn(params, batch)
        value = jnp.sum(jax.vmap(loss.value)(z, t))
    want = {
        "value": value,
        "r": r,
        "ntk": jac @ jac.T,
        "jvp": jac @ v,
        "vjp": jac.T @ u,
        "grad": jac.T @ r,
        "diag": jnp.sum(jac**2, axis=0),
        "norms": jnp.linalg.norm(per_example, axis=1),
        "dense": jac,
        "structured": jac,
        "kernel": jac @ jac.T,
        "kernel vjp": jac.T @ u,
        "kernel jvp": jac @ v,
    }
    for name in want:
        close(got[name], want[name], name)
    plan = pb.linearize(residual_fn, params, batch, loss=loss).plan
    assert plan.source == ("separable" if whole_batch else "per_example"), plan
    assert plan.loss == ("squared" if loss is None else loss.name)


@pytest.mark.parametrize("arch", ["equinox", "cnn", "transformer", "rnn"])
@pytest.mark.parametrize("solve", ["primal", "dual", "cg"])
def test_one_lm_step_equals_the_normal_equations(arch, solve):
    """(J^T J + lam I) delta = -J^T r on the dense twin, for every solve form."""
    residual_fn, params, batch, loss = problem(arch, "softmax")
    r, jac = dense_twin(residual_fn, params, batch, loss)
    lam = 0.3
    a = np.asarray(jac.T @ jac) + lam * np.eye(jac.shape[1])
    want = -np.linalg.solve(a, np.asarray(jac.T @ r))
    # Monotone LM: the default's watchdog (on here, R < P) would try lam 1e-9-fold first.
    opt = pb.levenberg_marquardt(solve=solve, init_damping=lam, init_damping_relative=False,
                                 cg_max_steps=500, cg_tol=1e-14, watchdog=None)  # fmt: skip
    step_info = jax.jit(
        lambda p: opt.update(None, opt.init(p), p, residual_fn=residual_fn, batch=batch)[1]
    )(params).step_info
    # The trial's own norm (accepted or not) is that of the solve.
    close(step_info.step_norm, np.linalg.norm(want), f"{solve} step norm", rtol=1e-8)
    assert int(step_info.form) == pb.solvers.FORMS.index(solve)


def test_float32_agrees_with_float64():
    apply, params, xs = ZOO["cnn"](jnp.float32)
    labels = jnp.arange(N) % 2
    fn = pb.losses.network_outputs(apply, pb.losses.softmax_cross_entropy())
    lin32 = pb.linearize(fn, params, (xs, labels))
    p64, x64 = jax.tree.map(lambda a: a.astype(jnp.float64), (params, xs))
    lin64 = pb.linearize(fn, p64, (x64, labels))
    assert lin32.ntk().dtype == jnp.float32
    close(lin32.ntk(), lin64.ntk(), "float32 ntk", rtol=1e-5)
    close(ravel_pytree(lin32.jtj_diag())[0], ravel_pytree(lin64.jtj_diag())[0], "diag", 1e-5)


def test_plans_say_what_was_found():
    forms = pb.linearize(*problem("pbnets", "squared")[:3]).plan.forms()
    assert forms["layers[1].w"] == "factored" and forms["layers[1].b"] == "factored"
    plan = pb.linearize(*problem("cnn", "squared")[:3]).plan
    assert plan.forms()["conv"] == "rows" and plan.forms()["w"] == "factored"
    plan = pb.linearize(*problem("rnn", "squared")[:3]).plan
    assert {plan.forms()[k] for k in ("W", "U", "b")} == {"columns"}, plan
    assert plan.forms()["V"] == "factored"
    assert "scan" in str(plan) and "columns" in str(plan)
    plan = pb.linearize(*problem("transformer", "squared")[:3]).plan
    assert plan.forms()["wq"] in ("factored", "rows") and "position" in str(plan)
    assert plan.forms()["ln1_s"] == "rows"


def test_whole_batch_functions_that_mix_examples_stay_opaque_and_say_why():
    apply, params, xs = ZOO["pbnets"]()
    ys = jnp.ones((N, 2))
    mixing = {
        "reduce_sum": lambda p, b: (
            _batched_mlp(p, (b[0] - b[0].mean(0, keepdims=True)) / b[0].std(0, keepdims=True))
            - b[1]
        ),
        "reduce_max": lambda p, b: jax.nn.softmax(_batched_mlp(p, b[0]), axis=0) - b[1],
        "closed over": (lambda y: lambda p, b: _batched_mlp(p, b[0]) - y)(ys),
    }
    for why, fn in mixing.items():
        lin = pb.linearize(fn, params, (xs, ys))
        assert lin.plan.source == "opaque" and why in lin.plan.note, (why, lin.plan)
        r, jac = dense_twin(fn, params, (xs, ys), None)
        close(lin.ntk(), jac @ jac.T, f"opaque ntk ({why})")
        with pytest.raises(ValueError, match="not per example"):
            lin.per_example_grad_norms()


def test_pytree_residuals_keep_the_users_row_order():
    apply, params, xs = ZOO["equinox"]()
    ys = jnp.ones((N, 2))

    def two_leaves(p, b):
        z = jax.vmap(apply, (None, 0))(p, b[0]) - b[1]
        return {"first": z[:, 0], "second": z[:, 1:]}

    for fn in (
        two_leaves,
        pb.per_example(
            lambda p, ex: {"a": apply(p, ex[0])[0] - ex[1][0], "b": apply(p, ex[0])[1:] - ex[1][1:]}
        ),
    ):
        lin = pb.linearize(fn, params, (xs, ys))
        r, jac = dense_twin(fn, params, (xs, ys), None)
        close(lin.r, r, "r")
        close(lin.ntk(), jac @ jac.T, "ntk")
        close(lin.dense(), jac, "dense")


def test_linearisation_under_jit_closes_over_traced_values_and_compiles_once():
    """A residual function built inside jit from traced data (a closure over tracers)."""
    apply, params, xs = ZOO["equinox"]()

    @jax.jit
    def kernel(params, xs, shift):
        fn = pb.regression_residuals(lambda p, x: apply(p, x) + shift)
        return pb.linearize(fn, params, (xs, jnp.zeros((N, 2)))).ntk()

    k = kernel(params, xs, jnp.ones(2))
    fn = pb.regression_residuals(apply)
    close(k, pb.linearize(fn, params, (xs, -jnp.ones((N, 2)))).ntk(), "closure ntk")
    assert count_compiles(kernel, params, xs + 1, jnp.zeros(2)) == 0


def test_data_dependent_branches():
    """lax.cond on the data is a documented fallback; Python control flow on traced data is
    JAX's own clear error."""

    def branchy(p, x):
        return jax.lax.cond(x[0] > 0, lambda: jnp.tanh(p["w"] @ x), lambda: p["w"] @ x)

    params = {"w": jnp.ones((2, 3))}
    xs = jax.random.normal(jax.random.key(0), (N, 3))
    fn = pb.regression_residuals(branchy)
    lin = pb.linearize(fn, params, (xs, jnp.zeros((N, 2))))
    assert lin.plan.forms()["w"] == "columns" and "cond" in str(lin.plan)
    _, jac = dense_twin(fn, params, (xs, jnp.zeros((N, 2))), None)
    close(lin.ntk(), jac @ jac.T, "cond ntk")

    def python_if(p, x):
        return p["w"] @ x if x[0] > 0 else -(p["w"] @ x)

    with pytest.raises(jax.errors.ConcretizationTypeError):
        pb.linearize(pb.regression_residuals(python_if), params, (xs, jnp.zeros((N, 2))))


def test_bad_inputs():
    apply, params, xs = ZOO["pbnets"]()
    fn = pb.regression_residuals(apply)
    with pytest.raises(TypeError, match="floating-point"):
        pb.linearize(fn, {**params, "n": jnp.arange(3)}, (xs, jnp.zeros((N, 2))))
    with pytest.raises(ValueError, match=r"the batch is empty \(N = 0\)"):
        pb.linearize(fn, params, (xs[:0], jnp.zeros((0, 2))))
    lin = pb.linearize(fn, params, (xs, jnp.zeros((N, 2))))
    with pytest.raises(ValueError, match=r"expected a cotangent of shape \(12,\)"):
        lin.vjp(jnp.ones(5))
    with pytest.raises(ValueError, match="shaped like params"):
        lin.jvp({"layers": []})
    with pytest.raises(ValueError, match="carries the loss"):
        pb.linearize(
            pb.losses.network_outputs(apply, pb.losses.softmax_cross_entropy()),
            params,
            (xs, jnp.zeros(N, int)),
            loss=pb.losses.sigmoid_binary_cross_entropy(),
        )
    with pytest.raises(ValueError, match="without a loss"):
        pb.linearize(pb.losses.network_outputs(apply), params, (xs, jnp.zeros(N, int)))


def test_sharded_over_eight_devices_equals_one_device():
    """The Equinox network's NTK and dual LM step, examples split over 8 host devices."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py asks XLA for 8 host devices)")
    apply, params, _ = ZOO["equinox"]()
    xs = jax.random.normal(jax.random.key(1), (16, 3))
    batch = (xs, jnp.sin(xs[:, :2]))
    fn = pb.regression_residuals(apply)
    mesh = pb.sharding.data_mesh()
    # At lam = 0.1 (monotone LM; the default's watchdog would take Gauss-Newton's step, lam
    # 1e-10, where the sums' order over devices moves the step by 1.5e-10 relative).
    opt = pb.levenberg_marquardt(solve="dual", init_damping=0.1, init_damping_relative=False,
                                 watchdog=None)  # fmt: skip

    @jax.jit
    def run(params, batch):
        step, state = opt.update(None, opt.init(params), params, residual_fn=fn, batch=batch)
        return pb.linearize(fn, params, batch).ntk(), step

    single = run(params, batch)
    sharded = run(pb.sharding.replicate(params, mesh), pb.sharding.shard_batch(batch, mesh))
    chex.assert_trees_all_close(sharded, single, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("arch", sorted(ZOO))
def test_gauss_newton_rcond_step_on_every_network(arch, dtype):
    """pb.gauss_newton(rcond=) on the network a user brings equals the truncated pseudo-inverse
    step of the dense twin's J (numpy SVD, float64), in float64 and in float32."""
    residual_fn, params, batch, _ = problem(arch, "squared")
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    batch = jax.tree.map(lambda a: a.astype(dtype), batch)
    rcond = 1e-2
    opt = pb.gauss_newton(rcond=rcond)
    step, state = jax.jit(
        lambda p: opt.update(None, opt.init(p), p, residual_fn=residual_fn, batch=batch)
    )(params)
    r, jac = dense_twin(residual_fn, jax.tree.map(lambda a: a.astype(jnp.float64), params),
                        jax.tree.map(lambda a: a.astype(jnp.float64), batch), None)  # fmt: skip
    u, s, vt = np.linalg.svd(np.asarray(jac), full_matrices=False)
    keep = s > rcond * s[0]
    twin = -(vt[keep].T @ ((u[:, keep].T @ np.asarray(r)) / s[keep]))
    got = np.asarray(ravel_pytree(step)[0], np.float64)
    tol = 1e-9 if dtype == jnp.float64 else 2e-3
    assert np.linalg.norm(got - twin) <= tol * np.linalg.norm(twin), (arch, state.step_info.form)
