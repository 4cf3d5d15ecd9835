"""Curvature: structured paths equal the generic ones; the GGN equals J^T H J formed densely."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_mlp
from hypothesis import given
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import paribus as pb
from paribus import curvature, losses

LOSSES = {
    "none": None,
    "squared": losses.squared(),
    "softmax_cross_entropy": losses.softmax_cross_entropy(),
    "sigmoid_binary_cross_entropy": losses.sigmoid_binary_cross_entropy(),
}


def _problem(seed, sizes, activation, n, loss_name):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params, apply = random_mlp(k1, sizes, activation)
    xs = jax.random.normal(k2, (n, sizes[0]))
    m = sizes[-1]
    if loss_name == "none":
        return params, pb.regression_residuals(apply), (xs, jax.random.normal(k3, (n, m)))
    if loss_name == "softmax_cross_entropy":
        targets = jax.random.randint(k3, (n,), 0, m)
    elif loss_name == "sigmoid_binary_cross_entropy":
        targets = jax.random.bernoulli(k3, 0.5, (n, m)).astype(jnp.float64)
    else:
        targets = jax.random.normal(k3, (n, m))
    return params, losses.network_outputs(apply), (xs, targets)


def _plain(residual_fn):
    """The same function with its structure hidden: forces every generic path."""
    return lambda params, batch: residual_fn(params, batch)


@functools.partial(jax.jit, static_argnames=("residual_fn", "loss"))
def _quantities(residual_fn, params, batch, v, loss):
    return {
        "ntk": curvature.residual_ntk(residual_fn, params, batch, loss=loss),
        "jtj_diag": curvature.residual_jtj_diag(residual_fn, params, batch, loss=loss),
        "ggn_v": curvature.ggn_vector_product(residual_fn, params, batch, v, loss=loss),
        "norms": curvature.per_example_grad_norms(residual_fn, params, batch, loss=loss),
    }


@given(
    st.integers(0, 2**16),
    st.lists(st.integers(1, 5), min_size=1, max_size=3),
    st.integers(1, 3),
    st.sampled_from(["tanh", "sigmoid", "gelu", "softplus"]),
    st.integers(1, 4),
    st.sampled_from(sorted(LOSSES)),
)
def test_structured_equals_generic(seed, hidden, m, activation, n, loss_name):
    loss = LOSSES[loss_name]
    if loss_name == "softmax_cross_entropy":
        m = max(m, 2)
    params, residual_fn, batch = _problem(seed, [2, *hidden, m], activation, n, loss_name)
    v = ravel_pytree(params)[1](jax.random.normal(jax.random.key(seed + 1), (pb_size(params),)))
    got = _quantities(residual_fn, params, batch, v, loss)
    expected = _quantities(_plain(residual_fn), params, batch, v, loss)
    for name in expected:
        chex.assert_trees_all_close(
            got[name], expected[name], rtol=1e-10, atol=1e-12, custom_message=name
        )


def pb_size(params):
    return ravel_pytree(params)[0].size


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_ggn_equals_dense_jt_h_j(loss_name):
    """G = sum_i J_i^T H_i J_i with J from pb.jacobian and H_i from jax.hessian of the loss."""
    loss = LOSSES[loss_name]
    params, residual_fn, batch = _problem(3, [2, 4, 3], "tanh", 5, loss_name)
    xs, targets = batch
    jac = pb.jacobian(residual_fn.apply, params, xs, mode="per_example").matrix
    n, m = xs.shape[0], 3
    jac = jac.reshape(n, m, -1)
    if loss is None:
        hess = jnp.broadcast_to(jnp.eye(m), (n, m, m))
    else:
        outputs = jax.vmap(residual_fn.apply, (None, 0))(params, xs)
        hess = jax.vmap(jax.hessian(loss.value))(outputs, targets)
    ggn = jnp.einsum("nip,nij,njq->pq", jac, hess, jac)
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.key(0), flat.shape)
    for fn in (residual_fn, _plain(residual_fn)):
        gv = curvature.ggn_vector_product(fn, params, batch, unravel(v), loss=loss)
        np.testing.assert_allclose(ravel_pytree(gv)[0], ggn @ v, rtol=1e-10, atol=1e-12)
        diag = curvature.residual_jtj_diag(fn, params, batch, loss=loss)
        np.testing.assert_allclose(diag, jnp.diag(ggn), rtol=1e-10, atol=1e-12)
    # The whitened NTK has the GGN's nonzero spectrum: J' J'^T and J'^T J' share eigenvalues.
    kernel = curvature.residual_ntk(residual_fn, params, batch, loss=loss)
    top = np.sort(np.linalg.eigvalsh(kernel))[::-1][:4]
    np.testing.assert_allclose(top, np.sort(np.linalg.eigvalsh(ggn))[::-1][:4], rtol=1e-8)


def test_ggn_operator_one_output_structured_path():
    """m = 1 takes the factored operator; it equals the dense J^T J v."""
    params, residual_fn, batch = _problem(1, [3, 6, 5, 1], "sigmoid", 7, "none")
    jac = pb.jacobian(residual_fn.apply, params, batch[0], mode="per_example").matrix
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.key(2), flat.shape)
    op = jax.jit(lambda p, w: curvature.ggn_operator(residual_fn, p, batch)(w))
    np.testing.assert_allclose(ravel_pytree(op(params, unravel(v)))[0], jac.T @ (jac @ v))


def test_network_level_ntk_and_diag():
    params, apply = random_mlp(jax.random.key(0), [2, 5, 2], "tanh")
    xs = jax.random.normal(jax.random.key(1), (4, 2))
    xs2 = jax.random.normal(jax.random.key(2), (3, 2))
    j1 = pb.jacobian(apply, params, xs, mode="per_example").matrix
    j2 = pb.jacobian(apply, params, xs2, mode="per_example").matrix
    plain = lambda p, x: apply(p, x)  # noqa: E731
    for fn in (apply, plain):
        kernel = curvature.ntk(fn, params, xs, xs2)
        chex.assert_shape(kernel, (8, 6))
        np.testing.assert_allclose(kernel, j1 @ j2.T, rtol=1e-12, atol=1e-14)
        diag = curvature.jtj_diag(fn, params, xs)
        chex.assert_trees_all_equal_structs(diag, params)
        np.testing.assert_allclose(ravel_pytree(diag)[0], jnp.sum(j1**2, 0), rtol=1e-12)


def test_float32_works():
    params, apply = random_mlp(jax.random.key(0), [2, 8, 1], "tanh", dtype=jnp.float32)
    xs = jax.random.normal(jax.random.key(1), (6, 2), jnp.float32)
    batch = (xs, jnp.zeros((6, 1), jnp.float32))
    residual_fn = pb.regression_residuals(apply)
    with jax.default_matmul_precision("float32"):  # not TF32 on GPUs
        kernel = curvature.residual_ntk(residual_fn, params, batch)
        norms = curvature.per_example_grad_norms(residual_fn, params, batch)
        jac = pb.jacobian(apply, params, xs, mode="per_example").matrix
        expected = jac @ jac.T
    assert kernel.dtype == norms.dtype == jnp.float32
    np.testing.assert_allclose(kernel, expected, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise():
    params, residual_fn, batch = _problem(0, [2, 3, 2], "tanh", 4, "none")
    with pytest.raises(TypeError, match="must return a pair"):
        curvature.residual_ntk(residual_fn, params, batch, loss=losses.squared())
    with pytest.raises(ValueError, match="tangent must be shaped like params"):
        curvature.ggn_vector_product(residual_fn, params, batch, {"w": jnp.ones(3)})


def test_lm_trains_a_classifier():
    """A synthetic 3-class problem: generalised Gauss-Newton LM reaches high accuracy."""
    if not hasattr(pb, "levenberg_marquardt"):
        pytest.skip("pb.levenberg_marquardt (issue 3) is not available yet")
    key = jax.random.key(0)
    centres = jnp.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    labels = jnp.arange(90) % 3
    xs = centres[labels] + 0.6 * jax.random.normal(key, (90, 2))
    init, apply = pb.nets.mlp([2, 16, 3], "tanh")
    loss = losses.softmax_cross_entropy()
    residual_fn = losses.network_outputs(apply)
    result = pb.fit(
        residual_fn,
        init(jax.random.key(1)),
        pb.levenberg_marquardt(loss=loss),
        (xs, labels),
        max_steps=30,
        loss=loss,
    )
    logits = jax.vmap(apply, (None, 0))(result.params, xs)
    accuracy = float(jnp.mean(jnp.argmax(logits, 1) == labels))
    assert accuracy >= 0.95, (accuracy, result.stop_reason)
    assert result.history.loss[-1] < 0.5 * result.history.loss[0]


def test_memory_chunk_sizes():
    from paribus import memory

    assert memory.chunk_size(100, 10, fixed_bytes=50, budget=2000) is None
    assert memory.chunk_size(100, 10, fixed_bytes=50, budget=550) == 50
    assert memory.chunk_size(100, 10, fixed_bytes=50, budget=60) == 1
    with pytest.raises(
        memory.MemoryBudgetError, match="budget of 59 B: it needs 50 B .* at least 60 B"
    ):
        memory.chunk_size(100, 10, fixed_bytes=50, budget=59)
    # J of 512 x 271,873 float32 is 557 MB: 600 MiB leaves room for 66 examples' rows.
    assert memory.jacobian_chunk_size(512, 1, 271_873, "float32", budget=600 * 2**20) == 66
    with pytest.raises(memory.MemoryBudgetError, match="at most 95 examples would fit"):
        memory.jacobian_chunk_size(512, 1, 271_873, "float32", budget=100 * 2**20)
    assert memory.default_budget() > 0
    assert memory.default_budget(0.25) <= memory.default_budget(0.5)
    with pytest.raises(ValueError, match="fraction"):
        memory.default_budget(0.0)
