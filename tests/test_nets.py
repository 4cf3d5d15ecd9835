"""pb.nets.mlp: shapes, the documented initialisation, activations, batching, bad inputs."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_compiles_once

import paribus as pb

ACTIVATION_FORMULAS = {
    "tanh": np.tanh,
    "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
    "relu": lambda z: np.maximum(z, 0),
    "softplus": lambda z: np.log1p(np.exp(z)),
    "silu": lambda z: z / (1 + np.exp(-z)),
    "identity": lambda z: z,
    "gelu": None,  # jax.nn.gelu's tanh approximation; checked against jax.nn.gelu below
}


def test_params_are_a_plain_pytree_with_documented_shapes():
    init, apply = pb.nets.mlp([3, 5, 4, 2])
    params = init(jax.random.key(0))
    assert isinstance(params, dict) and isinstance(params["layers"], list)
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {
        "layers": [
            {"w": (3, 5), "b": (5,)},
            {"w": (5, 4), "b": (4,)},
            {"w": (4, 2), "b": (2,)},
        ]
    }
    chex.assert_shape(apply(params, jnp.ones(3)), (2,))
    assert params["layers"][0]["w"].dtype == jnp.float64  # x64 is on in the tests


def test_default_init_is_lecun_normal_weights_and_zero_biases():
    init, _ = pb.nets.mlp([400, 300, 1])
    params = init(jax.random.key(1))
    w, b = params["layers"][0]["w"], params["layers"][0]["b"]
    # Var(w) = 1 / n_in; 120,000 draws give the std to about 0.3%.
    np.testing.assert_allclose(np.std(np.asarray(w)), 1 / np.sqrt(400), rtol=0.02)
    np.testing.assert_array_equal(b, np.zeros(300))
    # Different layers get different keys.
    assert not np.allclose(params["layers"][1]["w"][:5, 0], w[:5, 0])


def test_init_is_overridable_and_dtype_is_respected():
    init, _ = pb.nets.mlp(
        [2, 3, 1],
        w_init=jax.nn.initializers.constant(0.25),
        b_init=jax.nn.initializers.constant(-1.0),
        dtype=jnp.float32,
    )
    params = init(jax.random.key(2))
    np.testing.assert_array_equal(params["layers"][0]["w"], np.full((2, 3), 0.25))
    np.testing.assert_array_equal(params["layers"][1]["b"], np.array([-1.0]))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("activation", sorted(ACTIVATION_FORMULAS))
def test_forward_pass_matches_the_formula(activation):
    """f(x) = sigma(x W1 + b1) W2 + b2, computed in numpy; the output layer is linear."""
    init, apply = pb.nets.mlp([3, 4, 2], activation, b_init=jax.nn.initializers.normal(1.0))
    params = init(jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (3,), jnp.float64)
    (l1, l2) = [{k: np.asarray(v) for k, v in layer.items()} for layer in params["layers"]]
    z = np.asarray(x) @ l1["w"] + l1["b"]
    sigma = ACTIVATION_FORMULAS[activation]
    hidden = np.asarray(jax.nn.gelu(z)) if sigma is None else sigma(z)
    np.testing.assert_allclose(apply(params, x), hidden @ l2["w"] + l2["b"], rtol=1e-12)


def test_callable_activation():
    init, apply = pb.nets.mlp([1, 2, 1], activation=jnp.sin)
    params = init(jax.random.key(5))
    x = jnp.array([0.7])
    l1, l2 = params["layers"]
    expected = jnp.sin(x @ l1["w"] + l1["b"]) @ l2["w"] + l2["b"]
    np.testing.assert_allclose(apply(params, x), expected, rtol=1e-14)


def test_batching_is_vmap_and_jit_compiles_once():
    init, apply = pb.nets.mlp([2, 8, 3])
    params = init(jax.random.key(6))
    xs = jax.random.normal(jax.random.key(7), (5, 2), jnp.float64)
    batched = jax.jit(jax.vmap(apply, (None, 0)))
    assert_compiles_once(batched, params, xs)
    out = batched(params, xs)
    chex.assert_shape(out, (5, 3))
    np.testing.assert_allclose(out[3], apply(params, xs[3]), rtol=1e-14)


def test_unknown_activation_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown activation 'tahn'; expected one of \[.*'tanh'"):
        pb.nets.mlp([1, 2, 1], activation="tahn")


@pytest.mark.parametrize("sizes", [[3], [], [2, 0, 1], [2, -1]])
def test_bad_sizes(sizes):
    with pytest.raises(ValueError, match="at least two positive widths"):
        pb.nets.mlp(sizes)


def test_wrong_x_shape_names_expected_and_given():
    init, apply = pb.nets.mlp([3, 4, 1])
    params = init(jax.random.key(8))
    with pytest.raises(
        ValueError, match=r"expected one example x of shape \(3,\), got shape \(2,\)"
    ):
        apply(params, jnp.ones(2))
    # A batch passed where one example is expected: the message says how to batch.
    with pytest.raises(ValueError, match=r"got shape \(10, 3\) \(batch with jax.vmap"):
        apply(params, jnp.ones((10, 3)))
    # ... at trace time, under jit too.
    with pytest.raises(ValueError, match=r"expected one example x of shape \(3,\)"):
        jax.jit(apply)(params, jnp.ones(4))


def test_wrong_params_structure():
    init, apply = pb.nets.mlp([3, 4, 1])
    params = init(jax.random.key(9))
    with pytest.raises(ValueError, match=r"expected params \{'layers': \[...\]\} with 2 layers"):
        apply(params["layers"], jnp.ones(3))
    with pytest.raises(ValueError, match=r"layer 1 expected w \(4, 1\) and b \(1,\), got"):
        apply({"layers": [params["layers"][0], params["layers"][0]]}, jnp.ones(3))
    with pytest.raises(ValueError, match=r"layer 0 expected a dict \{'w', 'b'\}; got tuple"):
        apply({"layers": [(1.0, 2.0), params["layers"][1]]}, jnp.ones(3))
