"""Bring your own network: an Equinox MLP and a Flax NNX module, trained with LM.

paribus needs two things from a network: its parameters as a pytree of arrays, and a function
``apply(params, x)`` of one example. Equinox gives them with ``eqx.partition`` (arrays apart from
everything else), Flax NNX with ``nnx.split(module, nnx.Param)``; ``eqx.combine`` and
``nnx.merge`` put the module back together inside ``apply``. From there on the module is an
ordinary client: ``pb.linearize`` reads its layers from the jaxpr and prints its plan (which
layers it found and how it computes each block of J), and ``pb.fit`` trains it.

Finding: an Equinox and a Flax NNX module train with Levenberg-Marquardt exactly as a
``pb.nets`` network does, and paribus places every layer of both (its Jacobian blocks come from
the layers' inputs and output cotangents, not from per-example Jacobian columns).
"""

from __future__ import annotations

import _common
import equinox as eqx
import jax
import jax.numpy as jnp
from flax import nnx

import paribus as pb


class FlaxNet(nnx.Module):
    """2 -> 32 -> 32 -> 1 with tanh; one example in, one output out."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(2, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 32, rngs=rngs)
        self.l3 = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x):
        return self.l3(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))


def main(quick: bool = False):
    # Data: a smooth surface over the square, y = sin(x0) cos(x1) on N random points.
    n = 64 if quick else 256
    xs = jax.random.uniform(jax.random.key(1), (n, 2), minval=-2.0, maxval=2.0)
    ys = (jnp.sin(xs[:, 0]) * jnp.cos(xs[:, 1]))[:, None]
    batch = (xs, ys)
    target = 0.5 * n * 0.01**2  # an RMS residual of 0.01

    # --- Equinox: partition the module into arrays and the rest -----------------------------------
    model = eqx.nn.MLP(2, 1, width_size=32, depth=2, activation=jnp.tanh, key=jax.random.key(0))
    eqx_params, static = eqx.partition(model, eqx.is_inexact_array)

    def eqx_apply(params, x):
        return eqx.combine(params, static)(x)

    # --- Flax NNX: split the module into its graph and its parameters -----------------------------
    graphdef, nnx_params = nnx.split(FlaxNet(nnx.Rngs(0)), nnx.Param)

    def nnx_apply(params, x):
        return nnx.merge(graphdef, params)(x)

    found = {}
    for name, apply, params in (
        ("Equinox", eqx_apply, eqx_params),
        ("Flax NNX", nnx_apply, nnx_params),
    ):
        residual_fn = pb.regression_residuals(apply)

        # What paribus sees: one line per parameter leaf, with the form it uses for that block.
        plan = pb.linearize(residual_fn, params, batch).plan
        print(f"--- {name}, P = {pb.num_params(params):,}")
        print(plan)

        # Training is the same call as for any other network. The trained parameters come back
        # in the module's own structure: eqx.combine / nnx.merge gives a trained module.
        opt = pb.levenberg_marquardt()
        result = pb.fit(residual_fn, params, opt, batch, max_steps=300, target_loss=target)
        first, last = float(result.history.loss[0]), float(result.history.loss[-1])
        print(
            f"{name}: {result.steps} LM steps ({result.stop_reason}),",
            f"loss {first:.3g} to {last:.3g}",
        )
        found[name] = (plan.forms(), result)

    # "factored" and "rows" are the exact fast forms; "columns" is the fallback for what the
    # jaxpr reader cannot place (per-example Jacobian columns of that leaf).
    parts = []
    for name, (forms, result) in found.items():
        kinds = list(forms.values())
        placed = len(kinds) - kinds.count("columns")
        reached = (
            f"target reached in {result.steps} LM steps"
            if result.stop_reason.name == "target_loss"
            else f"target NOT reached ({result.stop_reason})"
        )
        parts.append(
            f"{name}: {placed}/{len(kinds)} leaves placed ({kinds.count('factored')} factored), "
            + reached
        )
    print("FINDING: " + "; ".join(parts))


if __name__ == "__main__":
    _common.run(main, plot=False)
