"""Gradient descent against Levenberg-Marquardt on a 1-D curve fit, through one ``pb.fit``.

The residual function is the single source of truth: gradient descent (any optax optimiser)
follows the gradient J^T r of 1/2 ||r||^2 computed from it, Levenberg-Marquardt linearises it and
solves (J^T J + lambda I) delta = -J^T r each step. Only the ``opt`` argument of ``pb.fit``
changes between the runs below.

Finding: on a small, smooth least-squares fit Levenberg-Marquardt reaches the target loss in
tens of steps, where Adam needs hundreds and plain gradient descent tens of thousands; although
each of its steps costs far more, it is about as fast as Adam in wall-clock time, or faster.
"""

from __future__ import annotations

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax

import paribus as pb


def main(quick: bool = False, out=_common.DEFAULT_OUT):
    # 100 points of a wiggly curve and a 1-16-16-1 tanh network (P = 321) to fit them.
    xs = jnp.linspace(-1.0, 1.0, 100)[:, None]
    ys = jnp.sin(2 * jnp.pi * xs) + 0.5 * xs
    init, apply = pb.nets.mlp([1, 16, 16, 1], "tanh")
    params = init(jax.random.key(0))
    residual_fn = pb.regression_residuals(apply)
    batch = (xs, ys)

    # The target: an RMS residual of 0.01, i.e. L = 1/2 N 0.01^2.
    target = 0.5 * len(xs) * 0.01**2
    max_steps = 3_000 if quick else 30_000

    # Three optimisers, one call each. pb.fit runs the whole loop inside jit; _common.timed_fit
    # calls it twice and times the second call, so compilation is not counted.
    methods = {
        # The loss is a sum over 100 points, so plain gradient descent needs a small rate: at
        # 0.01 it diverges within 50 steps.
        "gradient descent (lr 0.002)": optax.sgd(0.002),
        "Adam (lr 0.01)": optax.adam(0.01),
        "Levenberg-Marquardt": pb.levenberg_marquardt(),
    }
    runs = {}
    for name, opt in methods.items():
        result, seconds = _common.timed_fit(
            residual_fn, params, opt, batch, max_steps=max_steps, target_loss=target
        )
        runs[name] = result, seconds
        reached = result.stop_reason.name == "target_loss"
        print(
            f"{name:28s} {result.steps:6d} steps, {seconds * 1e3:8.1f} ms, "
            f"final loss {float(result.history.loss[-1]):.2e}, stop: {result.stop_reason}"
            + ("" if reached else "  (target not reached)")
        )

    # --- The picture: loss against steps, log-log -------------------------------------------------
    import matplotlib.pyplot as plt

    fig, (ax, ax_fit) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (result, _) in runs.items():
        loss = np.asarray(result.history.loss)
        ax.loglog(np.arange(1, len(loss) + 1), loss, label=name)
        ax_fit.plot(xs[:, 0], jax.vmap(apply, (None, 0))(result.params, xs)[:, 0], label=name)
    ax.axhline(target, color="k", ls=":", label="target (RMS 0.01)")
    ax.set_xlabel("step + 1")
    ax.set_ylabel("loss 1/2 ||r||^2")
    ax.legend()
    ax_fit.plot(xs[:, 0], ys[:, 0], "k.", ms=3, label="data")
    ax_fit.set_title("the fits where each run stopped")
    ax_fit.legend(fontsize=8)
    path = _common.save_figure(fig, out, "02_gd_vs_lm.png")
    print(f"picture in {path}")

    # --- The finding ------------------------------------------------------------------------------
    parts = []
    for name in runs:
        result, seconds = runs[name]
        if result.stop_reason.name == "target_loss":
            parts.append(f"{name.split(' (')[0]}: {result.steps} steps, {seconds * 1e3:.0f} ms")
        else:
            parts.append(
                f"{name.split(' (')[0]}: not in {result.steps} steps ({result.stop_reason})"
            )
    print("FINDING: to an RMS residual of 0.01, " + "; ".join(parts))


if __name__ == "__main__":
    _common.run(main, plot=True)
