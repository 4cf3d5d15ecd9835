"""Residual functions: J^T r is the gradient of 1/2 ||r||^2; the wrappers' Jacobians."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_mlp
from jax.flatten_util import ravel_pytree

import paribus as pb


def regression_problem(n=7, sizes=(2, 4, 3)):
    params, apply = random_mlp(jax.random.key(0), list(sizes))
    xs = jax.random.normal(jax.random.key(1), (n, sizes[0]), jnp.float64)
    ys = jax.random.normal(jax.random.key(2), (n, sizes[-1]), jnp.float64)
    return params, apply, (xs, ys)


def plain_residuals(params, batch):
    """Not per-example (the mean couples the rows), residuals as a pytree."""
    xs, ys = batch
    h = jnp.tanh(xs @ params["w"])
    return {"fit": h @ params["v"] - ys[:, 0], "reg": params["v"] - jnp.mean(h, axis=0)}


def plain_problem():
    params = {
        "w": jax.random.normal(jax.random.key(3), (2, 3), jnp.float64),
        "v": jax.random.normal(jax.random.key(4), (3,), jnp.float64),
    }
    xs = jax.random.normal(jax.random.key(5), (5, 2), jnp.float64)
    return params, (xs, jnp.ones((5, 1)))


def test_jt_r_is_the_gradient_of_half_squared_norm_regression():
    params, apply, batch = regression_problem()
    residual_fn = pb.regression_residuals(apply)
    r = residual_fn(params, batch)
    chex.assert_shape(r, (7, 3))
    J = pb.residual_jacobian(residual_fn, params, batch)
    chex.assert_shape(J, (21, 4 * 2 + 4 + 3 * 4 + 3))
    jt_r = J.T @ r.reshape(-1)
    grad = jax.grad(lambda p: 0.5 * jnp.sum(residual_fn(p, batch) ** 2))(params)
    np.testing.assert_allclose(jt_r, ravel_pytree(grad)[0], rtol=1e-12, atol=1e-14)
    value, g, r2 = pb.loss_and_grad(residual_fn, params, batch)
    np.testing.assert_allclose(value, 0.5 * np.sum(np.asarray(r) ** 2), rtol=1e-14)
    np.testing.assert_allclose(ravel_pytree(g)[0], jt_r, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(r2, r)
    np.testing.assert_allclose(pb.loss(residual_fn, params, batch), value, rtol=1e-14)


def test_jt_r_is_the_gradient_for_a_plain_pytree_residual_function():
    params, batch = plain_problem()
    J = pb.residual_jacobian(plain_residuals, params, batch)
    r = ravel_pytree(plain_residuals(params, batch))[0]
    chex.assert_shape(J, (5 + 3, 9))
    value, g, _ = pb.loss_and_grad(plain_residuals, params, batch)
    np.testing.assert_allclose(J.T @ r, ravel_pytree(g)[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(value, 0.5 * np.sum(np.asarray(r) ** 2), rtol=1e-14)


def test_residual_jacobian_matches_jacfwd_of_the_batched_function():
    """The slow twin: jax.jacfwd of the flattened residuals, for every residual kind."""
    params, apply, batch = regression_problem()

    def dense(residual_fn, params, batch):
        flat, unravel = ravel_pytree(params)
        return jax.jacfwd(lambda t: ravel_pytree(residual_fn(unravel(t), batch))[0])(flat)

    regression = pb.regression_residuals(apply)
    per_example = pb.per_example(lambda p, e: apply(p, e[0]) - e[1])
    for residual_fn in (regression, per_example):
        for mode in ("auto", "per_example", "fwd", "rev"):
            np.testing.assert_allclose(
                pb.residual_jacobian(residual_fn, params, batch, mode=mode),
                dense(residual_fn, params, batch),
                rtol=1e-12,
                atol=1e-14,
            )
    plain_params, plain_batch = plain_problem()
    np.testing.assert_allclose(
        pb.residual_jacobian(plain_residuals, plain_params, plain_batch),
        dense(plain_residuals, plain_params, plain_batch),
        rtol=1e-12,
    )


def test_per_example_wrapper_batches_with_vmap():
    params, apply, batch = regression_problem()
    residual_fn = pb.per_example(lambda p, e: apply(p, e[0]) - e[1])
    assert isinstance(residual_fn, pb.PerExample) and residual_fn.apply is None
    expected = jax.vmap(apply, (None, 0))(params, batch[0]) - batch[1]
    np.testing.assert_allclose(residual_fn(params, batch), expected, rtol=1e-14)
    assert pb.regression_residuals(apply).apply is apply


def test_loss_and_grad_under_jit():
    params, apply, batch = regression_problem()
    residual_fn = pb.regression_residuals(apply)
    jitted = jax.jit(lambda p, b: pb.loss_and_grad(residual_fn, p, b)[:2])
    value, g = jitted(params, batch)
    eager_value, eager_g, _ = pb.loss_and_grad(residual_fn, params, batch)
    np.testing.assert_allclose(value, eager_value, rtol=1e-14)
    chex.assert_trees_all_close(g, eager_g, rtol=1e-13)


def test_float32_residuals():
    params, apply = random_mlp(jax.random.key(6), [2, 5, 1], dtype=jnp.float32)
    xs = jax.random.normal(jax.random.key(7), (4, 2), jnp.float32)
    batch = (xs, jnp.zeros((4, 1), jnp.float32))
    residual_fn = pb.regression_residuals(apply)
    J = pb.residual_jacobian(residual_fn, params, batch)
    _, g, r = pb.loss_and_grad(residual_fn, params, batch)
    assert J.dtype == jnp.float32
    np.testing.assert_allclose(J.T @ r.reshape(-1), ravel_pytree(g)[0], rtol=1e-5, atol=1e-6)


def test_regression_target_of_the_wrong_shape():
    params, apply, (xs, ys) = regression_problem()
    residual_fn = pb.regression_residuals(apply)
    with pytest.raises(ValueError, match=r"apply\(params, x\) has shape \(3,\) but the target"):
        residual_fn(params, (xs, ys[:, :1]))
    with pytest.raises(ValueError, match="same leading"):
        residual_fn(params, (xs, ys[:3]))
