"""One partial derivative, then the whole Jacobian, read by rows and by columns.

A partial derivative dL/dtheta_k is how fast the loss moves when one weight moves and every
other stays put (*ceteris paribus*). ``pb.partial`` computes it exactly with one forward-mode
product; ``pb.nudge`` computes it the way the definition reads, by nudging that one weight both
ways. Stack every partial derivative of every residual and you have the Jacobian J: a row is one
observation's gradient, a column is how all observations respond to one parameter, and the
gradient of 1/2 ||r||^2 is J^T r.

Finding: the exact partial derivative and the nudged one agree to the finite difference's
O(h^2) error, and J^T r reproduces the gradient to rounding.
"""

from __future__ import annotations

import _common
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import paribus as pb

# This example is about the accuracy of derivatives, so it works in float64.
jax.config.update("jax_enable_x64", True)


def main(quick: bool = False, out=_common.DEFAULT_OUT):
    # A tiny 1-3-1 tanh network and a few points of a sine: P = 3 + 3 + 3 + 1 = 10 parameters.
    n = 8 if quick else 12
    init, apply = pb.nets.mlp([1, 3, 1], "tanh", dtype=jnp.float64)
    params = init(jax.random.key(0))
    xs = jnp.linspace(-1.0, 1.0, n)[:, None]
    ys = jnp.sin(jnp.pi * xs)
    residual_fn = pb.regression_residuals(apply)  # r_i = apply(params, x_i) - y_i

    def loss(p):  # L = 1/2 ||r||^2, a function of the parameters alone
        return pb.loss(residual_fn, p, (xs, ys))

    # --- One weight, ceteris paribus --------------------------------------------------------------
    # Parameters are named by labels like "layers[0].w[0,1]": layer 0's weight from the input to
    # hidden unit 1. The loss is not quadratic in it (it sits inside the tanh), so the nudge's
    # central difference carries an O(h^2) error; h defaults to about eps^(1/3) = 6e-6.
    # Exactly (one JVP with the one-hot tangent e_k) and by nudging it by +-h:
    k = "layers[0].w[0,1]"
    exact = float(pb.partial(loss, params, k))
    nudged = float(pb.nudge(loss, params, k))
    print(f"dL/d{k}: exact {exact:+.12f}, nudged {nudged:+.12f}")

    # --- The Jacobian of the network's outputs ----------------------------------------------------
    # One row per observation (m = 1 output here), one column per parameter.
    jac = pb.jacobian(apply, params, xs)
    J = np.asarray(jac.matrix)
    print(f"J has shape {J.shape}: {n} observations x {len(jac.labels)} parameters")
    print("columns:", ", ".join(jac.labels))

    # Read by rows: row i is the gradient of the output on example i alone.
    i = 3
    row_i = jax.grad(lambda p: apply(p, xs[i])[0])(params)
    row_gap = np.max(np.abs(J[i] - ravel_pytree(row_i)[0]))
    print(f"row {i} = gradient of f(x_{i}): max difference {row_gap:.1e}")

    # Read by columns: column k is how every output moves when theta_k alone moves; that is
    # pb.partial of the whole vector of outputs.
    col = jac.labels.index(k)
    column_k = pb.partial(lambda p: jax.vmap(apply, (None, 0))(p, xs)[:, 0], params, k)
    col_gap = np.max(np.abs(J[:, col] - np.asarray(column_k)))
    print(f"column {col} ({k}) = pb.partial of all outputs: max difference {col_gap:.1e}")

    # --- The gradient is J^T r --------------------------------------------------------------------
    # Here the residuals are outputs minus targets, so the residual Jacobian is J itself.
    value, grad, r = pb.loss_and_grad(residual_fn, params, (xs, ys))
    g = np.asarray(ravel_pytree(grad)[0])
    jtr = J.T @ np.asarray(r).ravel()
    grad_gap = np.max(np.abs(jtr - g)) / np.max(np.abs(g))
    print(f"L = {float(value):.6f}; J^T r vs the gradient: relative difference {grad_gap:.1e}")

    # --- A picture of J ---------------------------------------------------------------------------
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    lim = np.max(np.abs(J))
    im = ax.imshow(J, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(J.shape[1]), jac.labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("observation i (x from -1 to 1)")
    ax.set_title(
        f"J = df/dθ: a row per observation, a column per parameter\n"
        f"green: row {i}, the gradient of f(x_{i});  black: column {k}",
        fontsize=10,
    )
    ax.add_patch(plt.Rectangle((col - 0.5, -0.5), 1, n, fill=False, lw=2, ec="k"))
    ax.add_patch(plt.Rectangle((-0.5, i - 0.5), J.shape[1], 1, fill=False, lw=2, ec="C2"))
    fig.colorbar(im, ax=ax)
    path = _common.save_figure(fig, out, "01_jacobian.png")

    print(f"picture in {path}")

    rel = abs(exact - nudged) / abs(exact)
    print(
        f"FINDING: nudging {k} agrees with the exact partial derivative to {rel:.1e} (relative); "
        f"J^T r equals the gradient to {grad_gap:.1e}"
    )


if __name__ == "__main__":
    _common.run(main, plot=True)
