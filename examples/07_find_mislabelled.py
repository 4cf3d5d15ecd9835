"""Find mislabelled examples from per-example gradients and the neural tangent kernel.

Two per-example views of a trained network point at the examples that do not fit:

- the per-example gradient norm ||g_i|| = ||J_i^T r_i||: how hard example i pulls on the
  weights. ``pb.per_example_grad_norms`` computes all N norms from one forward and one backward
  pass, without forming any g_i.
- the empirical neural tangent kernel K = J J^T (``pb.ntk``): K_ij is how much a step that fits
  example j moves the output on example i. Kernel regression with K predicts each label from the
  others; the leave-one-out error, e_i = [(K + lam I)^-1 y]_i / [(K + lam I)^-1]_ii, is large for
  an example its neighbours (in the kernel's sense) disagree with.

Two interleaved half-moons, labels +1 and -1, fitted by least squares; a few labels are flipped
on purpose, and both scores rank all examples.

Finding: the examples with flipped labels rank at the top of both scores.
"""

from __future__ import annotations

import _common
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import make_moons

import paribus as pb


def main(quick: bool = False, out=_common.DEFAULT_OUT):
    # --- Data with a few wrong labels -------------------------------------------------------------
    n, n_flip = (200, 6) if quick else (600, 15)
    x, label = make_moons(n, noise=0.08, random_state=0)
    y = np.where(label == 1, 1.0, -1.0)
    flipped = np.random.default_rng(0).choice(n, n_flip, replace=False)
    y[flipped] *= -1
    xs, ys = jnp.asarray(x, jnp.float32), jnp.asarray(y[:, None], jnp.float32)
    batch = (xs, ys)

    # --- A small network, fitted by LM. With P = 65 < N it cannot memorise the flipped labels,
    # so they keep large residuals.
    init, apply = pb.nets.mlp([2, 16, 1], "tanh")
    residual_fn = pb.regression_residuals(apply)
    result = pb.fit(residual_fn, init(jax.random.key(0)), pb.levenberg_marquardt(), batch,
                    max_steps=50)  # fmt: skip
    params = result.params
    print(f"LM: {result.steps} steps, loss {float(result.history.loss[-1]):.3g}")

    # --- Score 1: per-example gradient norms ------------------------------------------------------
    grad_norms = np.asarray(pb.per_example_grad_norms(residual_fn, params, batch))

    # --- Score 2: leave-one-out error of kernel regression with the NTK ---------------------------
    K = np.asarray(pb.ntk(apply, params, xs), np.float64)  # (N, N): one output per example
    lam = 1e-3 * np.trace(K) / n
    inv = np.linalg.inv(K + lam * np.eye(n))
    loo = np.abs(inv @ y) / np.diag(inv)

    # --- How many of the flipped examples are in each score's top n_flip? -------------------------
    found = {}
    for name, score in (("gradient norm", grad_norms), ("NTK leave-one-out", loo)):
        top = np.argsort(-score)[:n_flip]
        found[name] = len(set(top) & set(flipped))
        print(f"{name:18s}: {found[name]}/{n_flip} flipped labels in its top {n_flip}")

    # --- The picture: the data, sized by score ----------------------------------------------------
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (name, score) in zip(
        axes, (("gradient norm", grad_norms), ("NTK LOO", loo)), strict=True
    ):
        size = 5 + 200 * score / score.max()
        ax.scatter(x[:, 0], x[:, 1], s=size, c=y, cmap="coolwarm", alpha=0.7)
        ax.scatter(x[flipped, 0], x[flipped, 1], s=220, facecolors="none", edgecolors="k",
                   label="label flipped")  # fmt: skip
        ax.set_title(f"marker size: {name}")
        ax.legend(loc="lower left")
    path = _common.save_figure(fig, out, "07_find_mislabelled.png")
    print(f"picture in {path}")

    print(
        f"FINDING: of {n_flip} flipped labels among {n} examples, the top {n_flip} by per-example "
        f"gradient norm hold {found['gradient norm']}, by NTK leave-one-out error "
        f"{found['NTK leave-one-out']}"
    )


if __name__ == "__main__":
    _common.run(main, plot=True)
