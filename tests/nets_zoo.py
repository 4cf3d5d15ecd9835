"""Networks users bring, small, for the linearisation tests: each returns
``(per-example apply(params, x), params, xs)`` with a few examples, float64 by default.

- ``pbnets``: a ``pb.nets`` MLP;
- ``closure``: the same MLP behind a plain lambda (nothing for paribus to recognise by type);
- ``equinox``: ``eqx.nn.MLP``, split into arrays and static parts;
- ``flax``: a Flax NNX module (dense, gelu, LayerNorm, dense);
- ``cnn``: ``lax.conv_general_dilated``, tanh, average pooling, a dense head;
- ``transformer``: one block over S tokens: layer norm, multi-head self-attention, a per-token
  MLP, mean pooling and a dense head;
- ``rnn``: an Elman RNN by ``lax.scan`` (its recurrent weights fall back to per-example
  Jacobian columns), with a dense read-out.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

import paribus as pb

N = 6


def pbnets(dtype=jnp.float64, m=2):
    init, apply = pb.nets.mlp([3, 5, 4, m], b_init=jax.nn.initializers.normal(0.5), dtype=dtype)
    xs = jax.random.normal(jax.random.key(1), (N, 3), dtype)
    return apply, init(jax.random.key(0)), xs


def closure(dtype=jnp.float64, m=2):
    apply, params, xs = pbnets(dtype, m)
    return (lambda p, x: apply(p, x)), params, xs


def equinox(dtype=jnp.float64, m=2):
    model = eqx.nn.MLP(3, m, 5, 2, activation=jnp.tanh, key=jax.random.key(0), dtype=dtype)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    xs = jax.random.normal(jax.random.key(1), (N, 3), dtype)
    return (lambda p, x: eqx.combine(p, static)(x)), params, xs


class _FlaxNet(nnx.Module):
    def __init__(self, m, dtype, rngs):
        self.l1 = nnx.Linear(3, 4, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.norm = nnx.LayerNorm(4, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.l2 = nnx.Linear(4, m, rngs=rngs, param_dtype=dtype, dtype=dtype)

    def __call__(self, x):
        return self.l2(self.norm(jax.nn.gelu(self.l1(x))))


def flax(dtype=jnp.float64, m=2):
    graphdef, params = nnx.split(_FlaxNet(m, dtype, nnx.Rngs(0)), nnx.Param)
    # LayerNorm starts at scale 1, bias 0: move them so their columns are not special.
    params = jax.tree.map(lambda a: a + 0.1 * jnp.arange(a.size, dtype=a.dtype).reshape(a.shape),
                          params)  # fmt: skip
    xs = jax.random.normal(jax.random.key(1), (N, 3), dtype)
    return (lambda p, x: nnx.merge(graphdef, p)(x)), params, xs


def _cnn_apply(p, x):
    """x (H, W, C) -> (m,)."""
    dn = ("NHWC", "HWIO", "NHWC")
    y = lax.conv_general_dilated(x[None], p["conv"], (1, 1), "SAME", dimension_numbers=dn)[0]
    y = jnp.tanh(y + p["conv_b"][None, None, :])
    y = lax.reduce_window(y, 0.0, lax.add, (2, 2, 1), (2, 2, 1), "VALID") / 4
    return y.reshape(-1) @ p["w"] + p["b"]


def cnn(dtype=jnp.float64, m=2):
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "conv": 0.5 * jax.random.normal(k[0], (3, 3, 1, 2), dtype),
        "conv_b": 0.1 * jax.random.normal(k[1], (2,), dtype),
        "w": jax.random.normal(k[2], (8, m), dtype),
        "b": 0.1 * jax.random.normal(k[3], (m,), dtype),
    }
    xs = jax.random.normal(jax.random.key(1), (N, 4, 4, 1), dtype)
    return _cnn_apply, params, xs


def _layer_norm(x, scale, bias):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-6) * scale[None, :] + bias[None, :]


def _transformer_apply(p, x, heads=2):
    """x (S, d) tokens -> (m,): one pre-norm block, then mean pooling and a dense head."""
    s, d = x.shape
    h = _layer_norm(x, p["ln1_s"], p["ln1_b"])
    q = (h @ p["wq"]).reshape(s, heads, -1)
    k = (h @ p["wk"]).reshape(s, heads, -1)
    v = (h @ p["wv"]).reshape(s, heads, -1)
    att = jax.nn.softmax(jnp.einsum("shd,thd->hst", q, k) / jnp.sqrt(q.shape[-1]), axis=-1)
    x = x + jnp.einsum("hst,thd->shd", att, v).reshape(s, d) @ p["wo"]
    h = _layer_norm(x, p["ln2_s"], p["ln2_b"])
    x = x + jax.nn.gelu(h @ p["w1"] + p["b1"][None, :]) @ p["w2"]
    return jnp.mean(x, axis=0) @ p["head"]


def transformer(dtype=jnp.float64, m=2, s=3, d=4):
    shapes = dict(ln1_s=(d,), ln1_b=(d,), wq=(d, d), wk=(d, d), wv=(d, d), wo=(d, d),
                  ln2_s=(d,), ln2_b=(d,), w1=(d, 6), b1=(6,), w2=(6, d), head=(d, m))  # fmt: skip
    keys = jax.random.split(jax.random.key(0), len(shapes))
    params = {
        name: 0.6 * jax.random.normal(key, shape, dtype) + (1.0 if name.endswith("_s") else 0.0)
        for key, (name, shape) in zip(keys, shapes.items(), strict=True)
    }
    xs = jax.random.normal(jax.random.key(1), (N, s, d), dtype)
    return _transformer_apply, params, xs


def _rnn_apply(p, xs_t):
    """xs_t (T, n_in) -> (m,): h_t = tanh(W h_(t-1) + U x_t + b), read out from h_T."""

    def cell(h, x):
        return jnp.tanh(p["W"] @ h + p["U"] @ x + p["b"]), None

    h, _ = lax.scan(cell, jnp.zeros(p["b"].shape, p["b"].dtype), xs_t)
    return p["V"] @ h + p["c"]


def rnn(dtype=jnp.float64, m=2):
    k = jax.random.split(jax.random.key(0), 5)
    params = {
        "W": 0.5 * jax.random.normal(k[0], (3, 3), dtype),
        "U": jax.random.normal(k[1], (3, 2), dtype),
        "b": 0.1 * jax.random.normal(k[2], (3,), dtype),
        "V": jax.random.normal(k[3], (m, 3), dtype),
        "c": 0.1 * jax.random.normal(k[4], (m,), dtype),
    }
    xs = jax.random.normal(jax.random.key(1), (N, 4, 2), dtype)
    return _rnn_apply, params, xs


ZOO = {
    "pbnets": pbnets,
    "closure": closure,
    "equinox": equinox,
    "flax": flax,
    "cnn": cnn,
    "transformer": transformer,
    "rnn": rnn,
}
