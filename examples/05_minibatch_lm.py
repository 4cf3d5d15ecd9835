"""Minibatch Levenberg-Marquardt: each step sees a few hundred examples of a large data set.

A Levenberg-Marquardt step on all N examples linearises all N residuals: with N = 50,000 and
P = 1,185 that is a 50,000 x 1,185 Jacobian per step. On a minibatch of B < P examples, the
step's dual form needs only the B x B kernel J J^T (the empirical NTK of the batch), computed from
the layers' inputs and output cotangents without forming J.

``pb.fit`` takes the whole data set once, as ``batch``, and a schedule of minibatches as
``batch_indices`` (S, B): step k uses the examples ``batch_indices[k % S]``. The data stay on
the device and the whole loop stays in one jit. (An iterator of minibatches works too, for data
that do not fit on the device; see ``pb.fit``'s docstring.) The LM damping then adapts from
each minibatch's own gain ratio.

Finding: on a noisy regression, minibatch Levenberg-Marquardt lowers the loss on the whole data
set towards the noise floor in far fewer steps than Adam on the same minibatches.
"""

from __future__ import annotations

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax

import paribus as pb


def main(quick: bool = False, out=_common.DEFAULT_OUT):
    # --- A large noisy data set: y = sin(2 x0) cos(x1) + noise on N points ------------------------
    n = 5_000 if quick else 50_000
    kx, kn = jax.random.split(jax.random.key(0))
    xs = jax.random.uniform(kx, (n, 2), minval=-2.0, maxval=2.0)
    noise = 0.05
    clean = jnp.sin(2 * xs[:, 0]) * jnp.cos(xs[:, 1])
    ys = clean[:, None] + noise * jax.random.normal(kn, (n, 1))
    data = (xs, ys)

    init, apply = pb.nets.mlp([2, 32, 32, 1], "tanh")
    params = init(jax.random.key(1))
    residual_fn = pb.regression_residuals(apply)
    print(f"N = {n:,} examples, P = {pb.num_params(params):,} parameters")

    # --- The schedule: shuffled minibatches of B examples, a fresh shuffle every epoch ------------
    batch_size = 256
    steps = 100 if quick else 600
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    keys = jax.random.split(jax.random.key(2), epochs)
    batch_indices = jnp.concatenate(
        [jax.random.permutation(k, n)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
         for k in keys]
    )[:steps]  # fmt: skip

    # The full-data loss, as a mean so that it reads as a squared error per example.
    @jax.jit
    def full_mse(p):
        return 2 * pb.loss(residual_fn, p, data) / n

    # --- LM and Adam on the same minibatches ------------------------------------------------------
    # With minibatches pb.fit has no divergence test: the losses of different minibatches are
    # not comparable.
    methods = {
        "Levenberg-Marquardt": pb.levenberg_marquardt(),
        "Adam (lr 0.01)": optax.adam(0.01),
    }
    curves, finals = {}, {}
    for name, opt in methods.items():
        # The callback receives the parameters (on the host) every 10 steps; the full-data
        # loss is evaluated afterwards, outside the training loop.
        snapshots = []
        result = pb.fit(
            residual_fn, params, opt, data, max_steps=steps, batch_indices=batch_indices,
            callback=lambda progress, into=snapshots: into.append((progress.step, progress.params)),
            callback_every=10, callback_params=True,
        )  # fmt: skip
        curves[name] = np.array([(k, float(full_mse(p))) for k, p in snapshots])
        finals[name] = curves[name][-1, 1], result.steps
        print(
            f"{name:22s} {result.steps} steps ({result.stop_reason}), full-data MSE "
            f"{curves[name][0, 1]:.4f} -> {finals[name][0]:.4f}"
        )

    # --- The picture ------------------------------------------------------------------------------
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.semilogy(curve[:, 0], curve[:, 1], label=name)
    ax.axhline(noise**2, color="k", ls=":", label="noise variance")
    ax.set_xlabel(f"minibatch step (B = {batch_size}, N = {n:,})")
    ax.set_ylabel("mean squared error on all N examples")
    ax.legend()
    path = _common.save_figure(fig, out, "05_minibatch_lm.png")
    print(f"picture in {path}")

    (lm, lm_steps), (adam, adam_steps) = finals["Levenberg-Marquardt"], finals["Adam (lr 0.01)"]
    print(
        f"FINDING: on minibatches of {batch_size} of {n:,} examples, full-data MSE LM {lm:.4f} "
        f"after {lm_steps} steps, Adam {adam:.4f} after {adam_steps} (noise variance "
        f"{noise**2:.4f})"
    )


if __name__ == "__main__":
    _common.run(main, plot=True)
