"""Pure-function networks: ``init, apply = mlp(sizes)`` over plain pytrees.

``apply(params, x)`` takes **one** example; batch with ``jax.vmap(apply, (None, 0))``. Per-example
gradients and Jacobian rows then fall out of ``vmap``.

The parameters of an MLP with widths ``n_0, ..., n_L`` are

    params = {"layers": [{"w": (n_0, n_1), "b": (n_1,)}, ..., {"w": (n_{L-1}, n_L), "b": (n_L,)}]}

and the network is ``a_0 = x``, ``z_l = a_{l-1} @ w_l + b_l``, ``a_l = sigma(z_l)`` for hidden
layers and ``f(x) = z_L`` (a linear output layer). Column labels such as ``"layers[1].w[3,7]"``
name the weight from unit 3 of layer 1's input to unit 7 of its output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Initializer = Callable[[jax.Array, tuple[int, ...], Any], Array]

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "softplus": jax.nn.softplus,
    "silu": jax.nn.silu,
    "identity": lambda z: z,
}


def _resolve_activation(activation: str | Callable[[Array], Array]) -> Callable[[Array], Array]:
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)} "
            "or a callable mapping an array to an array of the same shape."
        )
    return ACTIVATIONS[activation]


class MLPApply:
    """``apply(params, x) -> (n_out,)`` for one example ``x`` of shape ``(n_in,)``.

    A callable object rather than a closure so that the structured fast paths of
    :mod:`paribus.curvature` can recognise the network and reuse its per-layer activations.
    """

    def __init__(self, sizes: tuple[int, ...], activation: Callable[[Array], Array]):
        self.sizes = sizes
        self.activation = activation

    def __repr__(self) -> str:
        name = getattr(self.activation, "__name__", repr(self.activation))
        return f"mlp_apply(sizes={list(self.sizes)}, activation={name})"

    def check(self, params: Any, x: Array) -> None:
        """Raise at trace time when ``params`` or ``x`` do not fit the network."""
        n_in = self.sizes[0]
        if jnp.shape(x) != (n_in,):
            hint = " (batch with jax.vmap(apply, (None, 0)))" if jnp.ndim(x) == 2 else ""
            raise ValueError(
                f"mlp {list(self.sizes)}: expected one example x of shape ({n_in},), "
                f"got shape {jnp.shape(x)}{hint}."
            )
        layers = params.get("layers") if isinstance(params, dict) else None
        if not isinstance(layers, list | tuple) or len(layers) != len(self.sizes) - 1:
            raise ValueError(
                f"mlp {list(self.sizes)}: expected params {{'layers': [...]}} with "
                f"{len(self.sizes) - 1} layers; got {jax.tree.structure(params)}."
            )
        for i, (layer, n_a, n_b) in enumerate(
            zip(layers, self.sizes[:-1], self.sizes[1:], strict=True)
        ):
            if not isinstance(layer, dict):
                raise ValueError(
                    f"mlp {list(self.sizes)}: layer {i} expected a dict {{'w', 'b'}}; "
                    f"got {type(layer).__name__}."
                )
            shapes = {k: jnp.shape(v) for k, v in layer.items()}
            if shapes != {"w": (n_a, n_b), "b": (n_b,)}:
                raise ValueError(
                    f"mlp {list(self.sizes)}: layer {i} expected w ({n_a}, {n_b}) and b ({n_b},), "
                    f"got {shapes}."
                )

    def forward(self, params: Any, x: Array) -> tuple[Array, list[Array], list[Array]]:
        """The output and, per layer l = 1..L, its input ``a_{l-1}`` and pre-activation ``z_l``."""
        self.check(params, x)
        inputs, preacts = [], []
        a = x
        layers = params["layers"]
        for i, layer in enumerate(layers):
            z = a @ layer["w"] + layer["b"]
            inputs.append(a)
            preacts.append(z)
            a = z if i == len(layers) - 1 else self.activation(z)
        return a, inputs, preacts

    def __call__(self, params: Any, x: Array) -> Array:
        return self.forward(params, x)[0]


class Network(NamedTuple):
    """An ``(init, apply)`` pair; unpack it as ``init, apply = mlp(...)``."""

    init: Callable[[jax.Array], Any]
    apply: MLPApply


def mlp(
    sizes: Sequence[int],
    activation: str | Callable[[Array], Array] = "tanh",
    *,
    w_init: Initializer | None = None,
    b_init: Initializer | None = None,
    dtype: Any = None,
) -> Network:
    """A multilayer perceptron with a linear output layer.

    Args:
      sizes: widths ``[n_in, n_1, ..., n_out]``; at least two entries.
      activation: hidden-layer nonlinearity, one of ``"tanh"``, ``"sigmoid"``, ``"relu"``,
        ``"gelu"``, ``"softplus"``, ``"silu"``, ``"identity"``, or any callable.
      w_init: ``w_init(key, (n_in, n_out), dtype)``. Default: LeCun normal,
        ``w ~ N(0, 1 / n_in)``, which keeps pre-activations O(1) for tanh and sigmoid; pass
        ``jax.nn.initializers.he_normal()`` for ReLU networks.
      b_init: ``b_init(key, (n_out,), dtype)``. Default: zeros.
      dtype: parameter dtype; default JAX's default float (float32, or float64 under x64).

    Returns:
      ``Network(init, apply)``: ``init(key) -> params`` and ``apply(params, x) -> (n_out,)``.

    Example:
      >>> import jax, paribus as pb
      >>> init, apply = pb.nets.mlp([1, 15, 1], activation="sigmoid")
      >>> params = init(jax.random.key(0))
      >>> apply(params, jax.numpy.ones(1)).shape
      (1,)
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ValueError(f"mlp needs at least two positive widths [n_in, ..., n_out]; got {sizes}.")
    act = _resolve_activation(activation)
    w_init = w_init or jax.nn.initializers.lecun_normal()
    b_init = b_init or jax.nn.initializers.zeros

    def init(key: jax.Array) -> dict[str, list[dict[str, Array]]]:
        dt = dtype or jnp.zeros(()).dtype
        keys = jax.random.split(key, len(sizes) - 1)
        layers = []
        for k, n_a, n_b in zip(keys, sizes[:-1], sizes[1:], strict=True):
            kw, kb = jax.random.split(k)
            layers.append({"w": w_init(kw, (n_a, n_b), dt), "b": b_init(kb, (n_b,), dt)})
        return {"layers": layers}

    return Network(init, MLPApply(sizes, act))
