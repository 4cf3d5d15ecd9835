"""Every structured quantity of an MLP equals its generic twin (float64, random MLPs)."""

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
from paribus import structured

ACTIVATIONS = ["tanh", "sigmoid", "softplus", "gelu", "identity", "silu"]


@st.composite
def problems(draw):
    """A random MLP (depth 1-3, widths 1-5, 1-3 outputs), examples, and a seed."""
    depth = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 5)) for _ in range(depth)] + [draw(st.integers(1, 3))]
    activation = draw(st.sampled_from(ACTIVATIONS))
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params, apply = random_mlp(k1, sizes, activation)
    xs = jax.random.normal(k2, (n, sizes[0]))
    return apply, params, xs, k3


def _dense(apply, params, xs):
    """The slow, obvious twin: reverse mode per example (never the structured mode)."""
    return pb.jacobian(apply, params, xs, mode="per_example").matrix


def _random_like(key, tree):
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.random.normal(key, flat.shape))


@functools.partial(jax.jit, static_argnames="apply")
def _all_structured(params, xs, xs2, v, u, apply):
    f = structured.batch_factors(apply, params, xs)
    f2 = structured.batch_factors(apply, params, xs2)
    _, inputs, deltas = structured.output_deltas(apply, params, xs, lambda z: u)
    return {
        "outputs": f.outputs.reshape(-1),
        "ntk": structured.ntk(f),
        "cross_ntk": structured.ntk(f, f2),
        "jvp": structured.jvp(f, v).reshape(-1),
        "vjp": ravel_pytree(structured.vjp(f, u))[0],
        "jtj_diag": ravel_pytree(structured.jtj_diag(f))[0],
        "per_example_grads": structured.per_example_grads(f, u),
        "norms": jnp.sqrt(structured.per_example_sq_norms_from(inputs, deltas)),
        "jacobian": pb.jacobian(apply, params, xs, mode="structured").matrix,
    }


@functools.partial(jax.jit, static_argnames="apply")
def _all_generic(params, xs, xs2, v, u, apply):
    """The slow, obvious twins: reverse mode per example, dense products, vmap(grad)."""
    jac = pb.jacobian(apply, params, xs, mode="per_example").matrix
    jac2 = pb.jacobian(apply, params, xs2, mode="per_example").matrix

    def example_dot(p, x, u_i):  # grad_theta <u_i, f(x_i)> = J_i^T u_i
        return jnp.vdot(u_i, apply(p, x))

    grads = jax.vmap(jax.grad(example_dot), (None, 0, 0))(params, xs, u)
    flat_grads = jnp.concatenate([g.reshape(xs.shape[0], -1) for g in jax.tree.leaves(grads)], 1)
    return {
        "outputs": jax.vmap(apply, (None, 0))(params, xs).reshape(-1),
        "ntk": jac @ jac.T,
        "cross_ntk": jac @ jac2.T,
        "jvp": jac @ ravel_pytree(v)[0],
        "vjp": jac.T @ u.reshape(-1),
        "jtj_diag": jnp.sum(jac**2, axis=0),
        "per_example_grads": grads,
        "norms": jnp.linalg.norm(flat_grads, axis=1),
        "jacobian": jac,
    }


@given(problems())
def test_every_structured_quantity_equals_its_generic_twin(problem):
    apply, params, xs, key = problem
    k1, k2, k3 = jax.random.split(key, 3)
    xs2 = jax.random.normal(k1, (3, xs.shape[1]))
    v = _random_like(k2, params)
    u = jax.random.normal(k3, (xs.shape[0], apply.sizes[-1]))
    got = _all_structured(params, xs, xs2, v, u, apply)
    expected = _all_generic(params, xs, xs2, v, u, apply)
    for name in expected:
        chex.assert_trees_all_close(
            got[name], expected[name], rtol=1e-10, atol=1e-12, custom_message=name
        )


def test_structured_jacobian_chunked_and_float32():
    params, apply = random_mlp(jax.random.key(0), [3, 6, 5, 2], "tanh", dtype=jnp.float32)
    xs = jax.random.normal(jax.random.key(1), (7, 3), jnp.float32)
    # Full float32 products: on GPUs the default matmul precision is TF32 (10-bit mantissa).
    with jax.default_matmul_precision("float32"):
        full = pb.jacobian(apply, params, xs, mode="structured").matrix
        chunked = pb.jacobian(apply, params, xs, mode="structured", chunk_size=3).matrix
        dense = _dense(apply, params, xs)
    assert full.dtype == jnp.float32 and full.shape == (14, 3 * 6 + 6 + 6 * 5 + 5 + 5 * 2 + 2)
    np.testing.assert_allclose(chunked, full, rtol=1e-6)
    np.testing.assert_allclose(full, dense, rtol=1e-4, atol=1e-5)


def test_wrong_input_width_raises():
    params, apply = random_mlp(jax.random.key(0), [3, 4, 1])
    with pytest.raises(ValueError, match=r"expected one example x of shape \(3,\)"):
        structured.batch_factors(apply, params, jnp.ones((5, 2)))
