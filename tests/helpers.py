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


_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_counters: list[list[int]] = []


def _on_event(event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == _BACKEND_COMPILE:
        for counter in _counters:
            counter[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def count_compiles(fn, *args, **kwargs) -> int:
    """XLA backend compilations made while calling ``fn`` (and waiting for its result)."""
    counter = [0]
    _counters.append(counter)
    try:
        jax.block_until_ready(fn(*args, **kwargs))
    finally:
        _counters.remove(counter)
    return counter[0]


def assert_compiles_once(jitted, *args, **kwargs):
    """Call ``jitted`` twice with the same shapes: the first call compiles one XLA program, the
    second none. Counted from JAX's compile events, not ``jitted._cache_size()``: in a long
    session the C++ dispatch cache was seen empty after two calls (its entries are not kept
    for every function) while nothing recompiled."""
    first = count_compiles(jitted, *args, **kwargs)
    second = count_compiles(jitted, *args, **kwargs)
    assert first == 1 and second == 0, (
        f"expected one compilation then none; the calls compiled {first} and {second}"
    )
