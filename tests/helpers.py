"""Shared test helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import paribus as pb


def random_mlp(key, sizes, activation="tanh", dtype=jnp.float64):
    """An MLP with random (not zero) biases, so every column of J is exercised."""
    init, apply = pb.nets.mlp(
        sizes, activation, b_init=jax.nn.initializers.normal(0.5), dtype=dtype
    )
    return init(key), apply


def assert_compiles_once(jitted, *args, **kwargs):
    """Call ``jitted`` twice with the same shapes and assert the second call did not compile."""
    jax.block_until_ready(jitted(*args, **kwargs))
    before = jitted._cache_size()
    jax.block_until_ready(jitted(*args, **kwargs))
    assert jitted._cache_size() == before == 1, (
        f"expected one compilation, cache has {jitted._cache_size()} entries"
    )
