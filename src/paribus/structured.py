"""Structured Jacobians of ``pb.nets`` MLPs from per-layer activations and backprop signals.

For one example, layer l has input ``a_{l-1}`` (n_{l-1},) and pre-activation ``z_l`` (n_l,).
The backprop signals of the m outputs are ``D_L = I_m`` and
``D_l = (D_{l+1} W_{l+1}^T) * sigma'(z_l)``, each (m, n_l). Then the Jacobian rows of the
example are, per layer,

    dJ / db_l = D_l                      (m, n_l)
    dJ / dW_l = a_{l-1} (outer) D_l      (m, n_{l-1}, n_l)

so J is written from the factors without any reverse pass over a computation graph.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from paribus.nets import MLPApply

PyTree = Any


def supports(fn: Any) -> bool:
    """Whether ``fn`` is a network whose structure the fast paths know."""
    return isinstance(fn, MLPApply)


def factors(apply: MLPApply, params: PyTree, x: jax.Array) -> tuple[list, list]:
    """Per-layer inputs ``a_{l-1}`` (n_{l-1},) and backprop signals ``D_l`` (m, n_l), one x."""
    _, inputs, preacts = apply.forward(params, x)
    layers = params["layers"]
    m = apply.sizes[-1]
    signal = jnp.eye(m, dtype=preacts[-1].dtype)
    signals = [signal]
    for layer_above, z in zip(layers[:0:-1], preacts[-2::-1], strict=True):
        # sigma'(z) by a forward-mode pass: activations are elementwise.
        slope = jax.jvp(apply.activation, (z,), (jnp.ones_like(z),))[1]
        signal = (signal @ layer_above["w"].T) * slope
        signals.append(signal)
    return inputs, signals[::-1]


def example_jacobian(apply: MLPApply, params: PyTree, x: jax.Array) -> jax.Array:
    """(m, P) Jacobian of one example, columns in ravel order (b before w in each layer)."""
    inputs, signals = factors(apply, params, x)
    m = apply.sizes[-1]
    blocks = []
    for a, d in zip(inputs, signals, strict=True):
        blocks.append(d)
        blocks.append((a[None, :, None] * d[:, None, :]).reshape(m, -1))
    return jnp.concatenate(blocks, axis=1)


def jacobian_matrix(
    apply: MLPApply, params: PyTree, xs: jax.Array, *, chunk_size: int | None = None
) -> jax.Array:
    """(N*m, P) Jacobian of ``apply`` over ``xs`` from the per-layer factors."""
    from paribus.jacobian import map_examples

    rows = map_examples(lambda x: example_jacobian(apply, params, x), xs, chunk_size)
    return rows.reshape(-1, rows.shape[-1])
