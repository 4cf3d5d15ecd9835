"""Data-parallel paribus on 8 host devices: every sharded result equals the single-device one.

conftest.py gives the process 8 CPU devices. The batch is split over them
(``NamedSharding(mesh, P("data"))``), the parameters replicated, and everything runs through
``jax.jit`` with JAX's own sharding propagation: no paribus code knows it is sharded.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec

import paribus as pb
from paribus import curvature, sharding
from tests.helpers import assert_compiles_once, random_mlp

fit, levenberg_marquardt = pb.fit, pb.levenberg_marquardt
N_DEV = 8
SIZES = [3, 8, 8, 2]  # P = 122 parameters
N = 32  # R = N * m = 64 residuals < P: the dual form's regime


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < N_DEV:
        pytest.skip(f"needs {N_DEV} devices (conftest sets XLA_FLAGS); have {jax.device_count()}")
    return sharding.data_mesh(jax.devices()[:N_DEV])


@pytest.fixture(scope="module")
def problem():
    params, apply = random_mlp(jax.random.key(0), SIZES)
    kx, ky = jax.random.split(jax.random.key(1))
    xs = jax.random.normal(kx, (N, SIZES[0]))
    ys = jnp.sin(xs[:, :2] * 2.0) + 0.1 * jax.random.normal(ky, (N, SIZES[-1]))
    return apply, params, (xs, ys)


def _placed(mesh, params, batch):
    return sharding.replicate(params, mesh), sharding.shard_batch(batch, mesh)


def _assert_close(actual, expected, rtol):
    """Every leaf within rtol of the largest entry of the expected leaf."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        e = np.asarray(e)
        scale = max(float(np.max(np.abs(e))), 1.0) if e.size else 1.0
        np.testing.assert_allclose(np.asarray(a), e, rtol=0, atol=rtol * scale)


def _spec(x) -> PartitionSpec:
    return x.sharding.spec


def _is_replicated(tree) -> bool:
    return all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(tree))


# --- placement helpers ---------------------------------------------------------------------


def test_data_mesh_spans_devices_with_auto_axis(mesh):
    assert mesh.shape == {"data": N_DEV}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    assert list(mesh.devices.flat) == jax.devices()[:N_DEV]
    assert sharding.data_mesh().size == jax.device_count()
    with pytest.raises(ValueError, match="distinct"):
        sharding.data_mesh([jax.devices()[0]] * 2)
    with pytest.raises(ValueError, match="no devices"):
        sharding.data_mesh([])


def test_shard_batch_splits_examples_and_keeps_values(mesh, problem):
    _, params, batch = problem
    placed_params, placed = _placed(mesh, params, batch)
    for leaf, orig in zip(placed, batch, strict=True):
        assert _spec(leaf) == PartitionSpec("data")
        assert {s.data.shape for s in leaf.addressable_shards} == {(N // N_DEV, orig.shape[1])}
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(orig))
        # Device d holds examples d*N/D .. (d+1)*N/D - 1.
        for shard in leaf.addressable_shards:
            d = list(mesh.devices.flat).index(shard.device)
            np.testing.assert_array_equal(shard.data, orig[d * 4 : (d + 1) * 4])
    assert _is_replicated(placed_params)
    assert sharding.local_examples(placed) == N // N_DEV
    assert sharding.local_examples(batch) == N


def test_shard_batch_says_which_sizes_would_split(mesh):
    with pytest.raises(ValueError) as info:
        sharding.shard_batch(jnp.zeros((100, 3)), mesh)
    message = str(info.value)
    assert "N = 100" in message and "8 devices" in message
    assert "96 or 104" in message and "[1, 2, 4, 5]" in message
    with pytest.raises(ValueError, match="axis 'model' is not an axis"):
        sharding.shard_batch(jnp.zeros((8, 3)), mesh, axis="model")


# --- sharded derivatives equal single-device ones ------------------------------------------


def test_residuals_jvp_vjp_sharded(mesh, problem):
    apply, params, batch = problem
    residual_fn = pb.regression_residuals(apply)
    p_s, b_s = _placed(mesh, params, batch)
    tangent = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape),
                           params)  # fmt: skip
    cot = jnp.sin(jnp.arange(N * 2.0)).reshape(N, 2)

    def products(p, b, v, u):
        r, jv = jax.jvp(lambda q: residual_fn(q, b), (p,), (v,))
        _, pullback = jax.vjp(lambda q: residual_fn(q, b), p)
        return r, jv, pullback(u)[0]

    expected = jax.jit(products)(params, batch, tangent, cot)
    u_s = jax.device_put(cot, sharding.batch_sharding(mesh))
    got = jax.jit(products)(p_s, b_s, sharding.replicate(tangent, mesh), u_s)
    _assert_close(got, expected, 1e-13)
    r, jv, jtu = got
    assert _spec(r) == _spec(jv) == PartitionSpec("data")  # rows stay where their examples are
    assert _is_replicated(jtu)  # J^T u: a sum over examples, all-reduced


def test_per_example_quantities_and_jacobian_sharded(mesh, problem):
    apply, params, batch = problem
    p_s, b_s = _placed(mesh, params, batch)

    def example_loss(p, example):
        x, y = example
        return 0.5 * jnp.sum((apply(p, x) - y) ** 2)

    def quantities(p, b):
        grads = pb.per_example_grads(example_loss, p, b)
        jac = pb.jacobian(apply, p, b[0]).matrix
        return grads, jac

    expected = jax.jit(quantities)(params, batch)
    got = jax.jit(quantities)(p_s, b_s)
    _assert_close(got, expected, 1e-13)
    grads, jac = got
    assert all(_spec(leaf)[0] == "data" for leaf in jax.tree.leaves(grads))
    assert _spec(jac)[0] == "data"  # J's rows (i*m + j) follow the examples


def test_ntk_and_jtj_diag_sharded(mesh, problem):
    apply, params, batch = problem
    residual_fn = pb.regression_residuals(apply)
    p_s, b_s = _placed(mesh, params, batch)

    def kernels(p, b):
        return (
            curvature.residual_ntk(residual_fn, p, b),
            curvature.residual_jtj_diag(residual_fn, p, b),
            pb.ntk(apply, p, b[0]),
        )

    expected = jax.jit(kernels)(params, batch)
    got = jax.jit(kernels)(p_s, b_s)
    _assert_close(got, expected, 1e-13)
    # The slow twin: J J^T from the dense per-example Jacobian.
    jac = np.asarray(pb.residual_jacobian(residual_fn, params, batch))
    np.testing.assert_allclose(np.asarray(got[0]), jac @ jac.T, rtol=0, atol=1e-12 * N)
    assert _is_replicated(got[1])


_COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|all-to-all|collective-permute)\("
)


def _collective_sizes(hlo: str) -> list[tuple[str, int]]:
    """(op, number of elements in its result) for each collective of a compiled HLO text."""
    out = []
    for line in hlo.splitlines():
        match = _COLLECTIVE.search(line)
        if match:
            shapes = re.findall(r"[a-z]+\d*\[([\d,]*)\]", match.group(1))
            size = sum(int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes)
            out.append((match.group(2), size))
    return out


def test_sharded_ntk_gathers_factors_not_jacobian(mesh):
    """XLA partitions the structured NTK by itself: each device computes its examples' layer
    inputs and backprop signals, the factors (N * sum of widths numbers) are all-gathered, and
    no collective moves anything of J's size (N * m * P numbers)."""
    sizes, n = [4, 64, 64, 1], 64
    params, apply = random_mlp(jax.random.key(2), sizes)
    batch = (jax.random.normal(jax.random.key(3), (n, 4)), jnp.zeros((n, 1)))
    residual_fn = pb.regression_residuals(apply)
    n_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    ntk = jax.jit(lambda p, b: curvature.residual_ntk(residual_fn, p, b))
    placed = _placed(mesh, params, batch)
    collectives = _collective_sizes(ntk.lower(*placed).compile().as_text())
    gathered = sum(size for op, size in collectives if op == "all-gather")
    # A_l (with the column of ones of each fused bias) and D_l over the batch.
    factors = n * (sum(sizes[:-1]) + len(sizes) - 1) + n * sum(sizes[1:])
    assert 0 < gathered <= factors, collectives
    assert max(size for _, size in collectives) < n * n_params / 10, collectives
    np.testing.assert_allclose(
        np.asarray(ntk(*placed)), np.asarray(ntk(params, batch)), rtol=0, atol=1e-12 * n
    )


def test_dual_solve_and_cg_sharded(mesh, problem):
    """The pieces of one LM step: Cholesky of K + lam I on the NTK, and CG on J^T J + lam I."""
    apply, params, batch = problem
    residual_fn = pb.regression_residuals(apply)
    lam = 0.1

    def steps(p, b):
        flat, unravel = ravel_pytree(p)
        r_fn = lambda t: residual_fn(unravel(t), b).reshape(-1)  # noqa: E731
        r, jvp = jax.linearize(r_fn, flat)
        vjp = jax.linear_transpose(jvp, flat)
        kernel = curvature.residual_ntk(residual_fn, p, b)
        coef = jnp.linalg.solve(kernel + lam * jnp.eye(r.shape[0]), r)
        dual = -vjp(coef)[0]
        normal = lambda v: vjp(jvp(v))[0] + lam * v  # noqa: E731
        cg, _ = jax.scipy.sparse.linalg.cg(normal, -vjp(r)[0], tol=1e-14, maxiter=500)
        return dual, cg

    dual, cg = jax.jit(steps)(params, batch)
    np.testing.assert_allclose(np.asarray(cg), np.asarray(dual), rtol=0, atol=1e-8)
    got = jax.jit(steps)(*_placed(mesh, params, batch))
    _assert_close(got, (dual, cg), 1e-11)
    assert _is_replicated(got)


def test_library_dual_step_sharded_bare_and_refined(mesh, problem):
    """pb's own dual step (factored model; Cholesky, and the PCG refinement forced at every lam)
    gives the same delta and J delta sharded as on one device, replicated."""
    from paribus.solvers import _dual, _model

    apply, params, batch = problem
    residual_fn = pb.regression_residuals(apply)
    forced = _dual.DualOptions(max_steps=20, tol=1e-12, switch=np.inf)

    def steps(p, b):
        model = _model.build(residual_fn, p, b, where="test")
        bare = _dual.dual(model, 1e-3, None, False, _dual.DualOptions(max_steps=0))
        refined = _dual.dual(model, 1e-3, None, False, forced)
        return bare[:2], refined[:2]

    single = jax.jit(steps)(params, batch)
    _assert_close(single[1], single[0], 1e-8)  # the refinement converges to the same step
    got = jax.jit(steps)(*_placed(mesh, params, batch))
    _assert_close(got, single, 1e-10)
    assert _is_replicated(got[0][0]) and _is_replicated(got[1][0])


# --- sharded pb.fit equals the single-device run --------------------------------------------


def _optimisers():
    return [
        pytest.param(optax.sgd(1e-2), 1e-12, id="gd"),
        pytest.param(levenberg_marquardt(solve="dual"), 1e-9, id="lm-dual"),
        # CG run to convergence: a truncated CG iterate amplifies rounding differences (the
        # order of the sums over shards) far above rounding level, on any device count. This
        # small run compiles with XLA's quick settings (pb.fit's default here), which round
        # otherwise again: 1.07e-8 seen, hence 5e-8. Monotone LM: the default's watchdog (on
        # here, R < P, float64) has CG solve Gauss-Newton's nearly singular system, which 200
        # steps do not converge, so its first trial's loss differs by 2e-3 between 1 and 8
        # devices (the watchdog's sharded runs: lm-dual above).
        pytest.param(
            levenberg_marquardt(solve="cg", cg_max_steps=200, watchdog=None), 5e-8, id="lm-cg"
        ),  # fmt: skip
        # MINPACK's trust region: an SVD of the (row-sharded) J, or eigh of its Gram.
        pytest.param(levenberg_marquardt(damping="minpack"), 1e-9, id="lm-minpack"),
    ]


@pytest.mark.parametrize(("opt", "rtol"), _optimisers())
def test_fit_sharded_equals_single_device(mesh, problem, opt, rtol):
    apply, params, batch = problem
    residual_fn = pb.regression_residuals(apply)
    single = fit(residual_fn, params, opt, batch, max_steps=8)
    p_s, b_s = _placed(mesh, params, batch)
    sharded = fit(residual_fn, p_s, opt, b_s, max_steps=8)
    assert sharded.steps == single.steps == 8 and sharded.stop_reason == single.stop_reason
    assert single.history.loss[-1] < single.history.loss[0]  # it did train
    _assert_close(sharded.params, single.params, rtol)
    np.testing.assert_allclose(sharded.history.loss, single.history.loss, rtol=rtol)
    np.testing.assert_array_equal(sharded.history.accepted, single.history.accepted)
    np.testing.assert_array_equal(sharded.history.solve_form, single.history.solve_form)
    # Parameters come back replicated: every device holds the same full copy.
    assert _is_replicated(sharded.params)


def test_minpack_sharded_with_more_residuals_than_parameters(mesh):
    """damping="minpack" where R = 256 > P = 122 (the eigendecomposition of J^T J and its SVD
    repair under lax.cond, not the R < P path the problem above takes): sharded and
    single-device runs agree."""
    params, apply = random_mlp(jax.random.key(0), SIZES)
    xs = jax.random.normal(jax.random.key(2), (128, SIZES[0]))
    batch = (xs, jnp.sin(xs[:, :2] * 2.0))
    residual_fn = pb.regression_residuals(apply)
    opt = levenberg_marquardt(damping="minpack")
    single = fit(residual_fn, params, opt, batch, max_steps=8)
    p_s, b_s = _placed(mesh, params, batch)
    sharded = fit(residual_fn, p_s, opt, b_s, max_steps=8)
    assert single.history.loss[-1] < 0.5 * single.history.loss[0]
    np.testing.assert_allclose(sharded.history.loss, single.history.loss, rtol=1e-9)
    np.testing.assert_array_equal(sharded.history.accepted, single.history.accepted)
    _assert_close(sharded.params, single.params, 1e-8)


def test_fit_loop_makes_no_host_transfer(mesh, problem):
    """The whole sharded fit, jitted with inputs already placed, runs under a transfer guard
    that forbids every host <-> device transfer; its compiled program has no host callback."""
    apply, params, batch = problem
    residual_fn = pb.regression_residuals(apply)
    opt = levenberg_marquardt(solve="dual")

    @jax.jit
    def train(p, b):
        result = fit(residual_fn, p, opt, b, max_steps=6)
        return result.params, result.history.loss, result.steps

    p_s, b_s = _placed(mesh, params, batch)
    assert_compiles_once(train, p_s, b_s)  # compile outside the guard, and only once
    with jax.transfer_guard("disallow"):
        out_params, losses, steps = jax.block_until_ready(train(p_s, b_s))
    assert _is_replicated(out_params)
    # The default's watchdog (on here, R < P) may raise the loss for a few steps; it ends lower.
    assert int(steps) == 6 and np.asarray(losses)[6] < np.asarray(losses)[0]
    hlo = train.lower(p_s, b_s).compile().as_text()
    assert "while" in hlo
    assert "callback" not in hlo.lower() and "outfeed" not in hlo.lower()


# --- several processes: jax.distributed over two CPU "hosts" -------------------------------

_WORKER = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
import numpy as np
import paribus as pb
from paribus import sharding
from jax.flatten_util import ravel_pytree
data = np.load(sys.argv[3])
init, apply = pb.nets.mlp([3, 8, 8, 1])
mesh = sharding.data_mesh()  # 8 devices, 4 in each process
half = slice(pid * 16, (pid + 1) * 16)  # this process's own examples
batch = sharding.shard_batch((data["xs"][half], data["ys"][half]), mesh)
params = sharding.replicate(init(jax.random.key(0)), mesh)
result = pb.fit(pb.regression_residuals(apply), params, pb.levenberg_marquardt(solve="dual"),
                batch, max_steps=4)
print("RESULT", json.dumps({"devices": mesh.size, "global_n": batch[0].shape[0],
      "loss": result.history.loss.tolist(),
      "params": np.asarray(ravel_pytree(result.params)[0]).tolist()}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """What a multi-host user runs: jax.distributed.initialize in every process, each process
    shards its own examples; the result equals the single-device fit on all examples."""
    xs = np.asarray(jax.random.normal(jax.random.key(1), (32, 3)))
    ys = np.sin(xs[:, :1])
    np.savez(tmp_path / "data.npz", xs=xs, ys=ys)
    (tmp_path / "worker.py").write_text(_WORKER)
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(tmp_path / "worker.py"),
                str(pid),
                port,
                str(tmp_path / "data.npz"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )  # fmt: skip
        for pid in range(2)
    ]
    outs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=240)
        finally:
            proc.kill()
        assert proc.returncode == 0, out[-3000:]
        outs.append(json.loads(out.split("RESULT", 1)[1]))
    init, apply = pb.nets.mlp([3, 8, 8, 1])
    single = fit(pb.regression_residuals(apply), init(jax.random.key(0)),
                 levenberg_marquardt(solve="dual"), (xs, ys), max_steps=4)  # fmt: skip
    flat = np.asarray(ravel_pytree(single.params)[0])
    assert single.history.loss[-1] < 0.5 * single.history.loss[0]
    for out in outs:
        assert out["devices"] == 8 and out["global_n"] == 32
        np.testing.assert_allclose(out["loss"], single.history.loss, rtol=1e-10)
        np.testing.assert_allclose(out["params"], flat, rtol=0, atol=1e-10 * np.max(np.abs(flat)))
