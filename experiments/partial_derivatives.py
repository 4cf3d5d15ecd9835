"""Ceteris paribus, made visible: what one partial derivative of the loss means for one weight.

Question: for a small network, what is dL/dtheta_k for one parameter theta_k? It should be the
slope of the loss when theta_k alone moves and every other parameter is held fixed. Do the exact
partial derivative (``pb.partial``: one JVP with the one-hot tangent e_k), the nudge
(``pb.nudge``: move theta_k by +-h, hold the rest, central difference) and the k-th entry of the
gradient (``jax.grad``) agree? What does the Jacobian J = df/dtheta of the outputs look like, is
J^T r the gradient of L = 1/2 ||r||^2, and what do all P partial derivatives cost?

Setup: a 1-16-1 tanh MLP (LeCun-normal weights, biases N(0, 0.5^2)) at its initialisation, on
N = 40 points of y = sin(3x), x evenly spaced in [-1, 1]; residuals r_i = f(x_i) - y_i;
L = 1/2 ||r||^2; float64 (a float32 nudge column shows what the dtype-aware step gives in single
precision). Slices: for four parameters (one per leaf: the hidden weight and bias with the
largest |dL/dtheta|, the output weight and bias), L(theta + t e_k) for t in [-1.5, 1.5], with the
tangent of slope ``pb.partial`` and a central-difference chord. Table: ``pb.partial``,
``pb.nudge`` and ``jax.grad`` for every parameter; seeds (batched with ``jax.vmap``) repeat the
agreement check over initialisations. Cost: all P partial derivatives, one JVP each, against one
reverse-mode gradient, as P grows (``jax.jit``, compile time apart, median of 20 runs).

Finding (``experiments/run_all.py`` of 2026-12-02, 5 seeds, one CPU core; results/REPORT.md):
``pb.partial`` equals the gradient entry to 3.4e-16 and ``pb.nudge`` to 3.2e-11 in float64
(2.3e-5 in float32); J^T r equals the gradient to 1.7e-16. Each partial derivative is the slope
of its one-parameter cut at t = 0 only. One partial costs about a forward pass: all P of them
one JVP at a time take 0.52x a reverse-mode gradient at P = 13 and 4,410x at P = 3,073.

    python experiments/partial_derivatives.py            # seconds
    python experiments/partial_derivatives.py --quick    # seconds (CI)
"""

from __future__ import annotations

import time

import _harness as h  # first: it sets OpenBLAS's threads before jax loads
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import paribus as pb

NAME = "partial_derivatives"
T_RANGE = 1.5  # how far each slice moves its parameter


def make_problem(hidden: int, n: int, dtype=jnp.float64):
    """``(init, apply, residual_fn, batch)`` for y = sin(3x) on N points."""
    init, apply = pb.nets.mlp(
        [1, hidden, 1], "tanh", b_init=jax.nn.initializers.normal(0.5), dtype=dtype
    )
    xs = jnp.linspace(-1.0, 1.0, n, dtype=dtype)[:, None]
    ys = jnp.sin(3.0 * xs)
    return init, apply, pb.regression_residuals(apply), (xs, ys)


def derivative_table(loss_fn, params):
    """Every partial derivative three ways: exact JVP, nudge, reverse-mode gradient."""
    n_params = ravel_pytree(params)[0].size
    ks = jnp.arange(n_params)
    partials = jax.vmap(lambda k: pb.partial(loss_fn, params, k))(ks)
    nudges = jax.vmap(lambda k: pb.nudge(loss_fn, params, k))(ks)
    grad = ravel_pytree(jax.grad(loss_fn)(params))[0]
    return partials, nudges, grad


def agreement_over_seeds(init, loss_of, seeds: int):
    """Max relative disagreement of partial and nudge with the gradient, one row per seed.

    The seeds are batched with ``jax.vmap``: one compiled program checks every initialisation.
    """

    def one(key):
        params = init(key)
        partials, nudges, grad = derivative_table(lambda p: loss_of(p), params)
        scale = jnp.max(jnp.abs(grad))
        return (
            jnp.max(jnp.abs(partials - grad)) / scale,
            jnp.max(jnp.abs(nudges - grad)) / scale,
        )

    keys = jax.random.split(jax.random.key(0), seeds)
    err_partial, err_nudge = jax.jit(jax.vmap(one))(keys)
    return [
        {"seed": s, "partial_vs_grad": float(a), "nudge_vs_grad": float(b)}
        for s, (a, b) in enumerate(zip(np.asarray(err_partial), np.asarray(err_nudge), strict=True))
    ]


def pick_parameters(labels, grad) -> list[int]:
    """One column per leaf: the largest |dL/dtheta| in each (a scalar-sized leaf: its one entry)."""
    leaves: dict[str, list[int]] = {}
    for k, label in enumerate(labels):
        leaves.setdefault(leaf_of(label), []).append(k)
    order = ["layers[0].w", "layers[0].b", "layers[1].w", "layers[1].b"]
    return [max(leaves[name], key=lambda k: abs(float(grad[k]))) for name in order]


def leaf_of(label: str) -> str:
    """``"layers[1].w[3,0]"`` -> ``"layers[1].w"``."""
    return label[: label.rindex("[")]


def slices(loss_fn, params, ks, *, points: int = 121):
    """L(theta + t e_k) for t in [-T, T] and each k in ``ks`` (every other parameter fixed)."""
    flat, unravel = ravel_pytree(params)
    ts = jnp.linspace(-T_RANGE, T_RANGE, points, dtype=flat.dtype)

    def cut(k):
        return jax.vmap(lambda t: loss_fn(unravel(flat.at[k].add(t))))(ts)

    return np.asarray(ts), np.asarray(jax.vmap(cut)(jnp.asarray(ks)))


def cost_sweep(hiddens, n: int, *, repeats: int, disable: bool) -> list[dict]:
    """Run time of all P partials (P JVPs), all P nudges and one gradient, as P grows."""
    rows = []
    for hidden in h.progress(hiddens, desc="cost vs P", disable=disable):
        init, _, residual_fn, batch = make_problem(hidden, n)
        params = init(jax.random.key(0))
        n_params = ravel_pytree(params)[0].size
        ks = jnp.arange(n_params)

        def loss_of(p, residual_fn=residual_fn, batch=batch):
            return pb.loss(residual_fn, p, batch)

        ways = {
            "pb.partial x P (P JVPs)": jax.jit(
                lambda p, f=loss_of, ks=ks: jax.vmap(lambda k: pb.partial(f, p, k))(ks)
            ),
            "pb.nudge x P (2P losses)": jax.jit(
                lambda p, f=loss_of, ks=ks: jax.vmap(lambda k: pb.nudge(f, p, k))(ks)
            ),
            "jax.grad (one reverse pass)": jax.jit(jax.grad(loss_of)),
        }
        for what, fn in ways.items():
            _, compile_s, run_s = h.time_call(fn, params, repeats=repeats)
            rows.append(
                {
                    "hidden": hidden,
                    "P": n_params,
                    "computation": what,
                    "run_ms": run_s * 1e3,
                    "compile_ms": compile_s * 1e3,
                }
            )
    for row in rows:
        grad_ms = next(
            r["run_ms"] for r in rows if r["P"] == row["P"] and r["computation"].startswith("jax")
        )
        row["x_grad"] = row["run_ms"] / grad_ms
    return rows


def plot_cost(rows):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for i, what in enumerate(dict.fromkeys(r["computation"] for r in rows)):
        sub = [r for r in rows if r["computation"] == what]
        ax.loglog(
            [r["P"] for r in sub], [r["run_ms"] for r in sub], "o-", color=f"C{i}", label=what
        )
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("P (number of parameters)")
    ax.set_ylabel("run time per full gradient (ms)")
    ax.set_title("All P partial derivatives: one at a time vs reverse mode", fontsize=11)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_slices(ts, curves, ks, labels, loss0, partials, nudges, grad):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.9), sharey=False)
    chord_h = 0.5
    nudge_h = float(np.cbrt(np.finfo(np.float64).eps))  # pb.nudge's default step for |theta| <= 1
    for ax, k, curve in zip(axes, ks, curves, strict=True):
        slope = float(partials[k])
        ax.plot(ts, curve, color="C0", lw=2.2, label=r"$L(\theta + t\,e_k)$")
        ax.plot(ts, loss0 + slope * ts, color="C3", lw=1.5, label="tangent, slope pb.partial")
        # A central-difference chord with a visible step; pb.nudge uses a tiny one.
        i_lo, i_hi = np.argmin(np.abs(ts + chord_h)), np.argmin(np.abs(ts - chord_h))
        ax.plot(
            ts[[i_lo, i_hi]],
            curve[[i_lo, i_hi]],
            "o--",
            color="C2",
            lw=1.2,
            ms=5,
            label=f"chord over t = +-{chord_h}",
        )
        ax.plot([0], [loss0], "ko", ms=5)
        ax.axvline(0.0, color="0.8", lw=0.8, zorder=0)
        lo, hi = float(np.min(curve)), float(np.max(curve))
        pad = 0.15 * (hi - lo + 1e-12)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(labels[k], fontsize=11)
        ax.set_xlabel(r"$t$ (only this parameter moves)")
        text = (
            f"pb.partial = {float(partials[k]):+.6f}\n"
            f"pb.nudge   = {float(nudges[k]):+.6f}  (h = {nudge_h:.0e})\n"
            f"jax.grad   = {float(grad[k]):+.6f}"
        )
        ax.text(
            0.03,
            0.97,
            text,
            transform=ax.transAxes,
            va="top",
            ha="left",
            family="monospace",
            fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"},
        )
    axes[0].set_ylabel(r"loss $L = \frac{1}{2}\|r\|^2$")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=9, bbox_to_anchor=(0.5, -0.06))
    fig.suptitle(
        "Ceteris paribus: the loss along one parameter at a time; dL/dθ_k is the slope at t = 0",
        fontsize=12,
    )
    fig.tight_layout()
    return fig


def plot_jacobian(matrix, labels):
    """Heat map of J (N x P): rows observations, columns grouped by layer."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    n, p = matrix.shape
    fig, ax = plt.subplots(figsize=(min(3.0 + 0.22 * p, 16), min(2.5 + 0.14 * n, 9)))
    bound = float(np.max(np.abs(matrix))) or 1.0
    im = ax.imshow(
        matrix,
        aspect="auto",
        cmap="RdBu_r",
        norm=TwoSlopeNorm(0.0, -bound, bound),
        interpolation="nearest",
    )
    groups: list[tuple[str, int, int]] = []
    for k, label in enumerate(labels):
        name = leaf_of(label)
        if groups and groups[-1][0] == name:
            groups[-1] = (name, groups[-1][1], k + 1)
        else:
            groups.append((name, k, k + 1))
    for name, start, stop in groups:
        if start:
            ax.axvline(start - 0.5, color="k", lw=1.2)
        ax.text(
            (start + stop - 1) / 2,
            -0.9,
            name,
            ha="center",
            va="bottom",
            fontsize=9,
            clip_on=False,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("parameter θ_k (columns in ravel order, grouped by layer)")
    ax.set_ylabel("observation i (x from -1 to 1)")
    ax.set_title(f"Jacobian of the outputs J = ∂f(x_i)/∂θ_k, shape (N, P) = ({n}, {p})", pad=22)
    fig.colorbar(im, ax=ax, label="∂f(x_i) / ∂θ_k", fraction=0.04, pad=0.02)
    fig.tight_layout()
    return fig


def plot_gradient_check(jt_r, grad, partials):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    lim = 1.1 * float(np.max(np.abs(grad)))
    ax.plot([-lim, lim], [-lim, lim], color="0.6", lw=1, label="y = x")
    ax.plot(grad, jt_r, "o", ms=6, mfc="none", color="C0", label="J^T r")
    ax.plot(grad, partials, "x", ms=5, color="C3", label="pb.partial, one per θ_k")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("jax.grad(L), entry k")
    ax.set_ylabel("the same entry, another way")
    ax.set_title("Gradient = J^T r = every partial derivative", fontsize=11)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def run(cfg: dict, args, out: h.Output) -> str:
    hidden, n = cfg["hidden"], cfg["n"]
    t_start = time.perf_counter()

    with jax.enable_x64(True):
        init, apply, residual_fn, batch = make_problem(hidden, n)
        params = init(jax.random.key(0))

        def loss_of(p):
            return pb.loss(residual_fn, p, batch)

        jac = pb.jacobian(apply, params, batch[0])
        labels = jac.labels
        partials, nudges, grad = (np.asarray(a) for a in derivative_table(loss_of, params))
        loss0, g_tree, r = pb.loss_and_grad(residual_fn, params, batch)
        jt_r = np.asarray(jac.matrix).T @ np.asarray(r).reshape(-1)
        err_jtr = float(np.max(np.abs(jt_r - grad)) / np.max(np.abs(grad)))
        seeds = agreement_over_seeds(init, loss_of, args.seeds)
        ks = pick_parameters(labels, grad)
        ts, curves = slices(loss_of, params, ks)
        loss0 = float(loss0)

        timings = cost_sweep(
            cfg["cost_widths"], n, repeats=cfg["repeats"], disable=args.no_progress
        )

    # float32: the same nudges with the dtype-aware step of single precision.
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    _, _, residual32, batch32 = make_problem(hidden, n, jnp.float32)
    nudges32 = np.asarray(
        jax.vmap(lambda k: pb.nudge(lambda p: pb.loss(residual32, p, batch32), params32, k))(
            jnp.arange(grad.size)
        )
    )
    scale = float(np.max(np.abs(grad)))
    err_partial = float(np.max(np.abs(partials - grad)) / scale)
    err_nudge = float(np.max(np.abs(nudges - grad)) / scale)
    err_nudge32 = float(np.max(np.abs(nudges32 - grad)) / scale)
    del g_tree

    rows = [
        {
            "k": k,
            "label": label,
            "pb_partial": float(partials[k]),
            "pb_nudge": float(nudges[k]),
            "jax_grad": float(grad[k]),
            "J_T_r": float(jt_r[k]),
            "partial_minus_grad": float(partials[k] - grad[k]),
            "nudge_minus_grad": float(nudges[k] - grad[k]),
            "pb_nudge_float32": float(nudges32[k]),
        }
        for k, label in enumerate(labels)
    ]
    out.csv("partials.csv", rows)
    out.csv("seeds.csv", seeds)
    out.csv("timings.csv", timings)
    out.figure("slices.png", plot_slices(ts, curves, ks, labels, loss0, partials, nudges, grad))
    out.figure("jacobian.png", plot_jacobian(np.asarray(jac.matrix), labels))
    out.figure("gradient_check.png", plot_gradient_check(jt_r, grad, partials))
    out.figure("cost.png", plot_cost(timings))

    worst_seed_partial = max(s["partial_vs_grad"] for s in seeds)
    worst_seed_nudge = max(s["nudge_vs_grad"] for s in seeds)
    biggest = [t for t in timings if t["P"] == max(r["P"] for r in timings)]
    smallest = [t for t in timings if t["P"] == min(r["P"] for r in timings)]
    finding = (
        f"- `pb.partial` equals the gradient entry to {err_partial:.1e} (relative to max |g|) and "
        f"`pb.nudge` to {err_nudge:.1e} in float64, {err_nudge32:.1e} in float32; over "
        f"{args.seeds} initialisations the worst are {worst_seed_partial:.1e} and "
        f"{worst_seed_nudge:.1e}.\n"
        f"- J^T r equals the gradient of 1/2 ||r||^2 to {err_jtr:.1e}.\n"
        f"- Each partial derivative is the slope of its one-parameter cut at t = 0 only: the cuts "
        f"curve away from their tangents (slices.png), which is why a step along the gradient "
        f"needs a small learning rate.\n"
        f"- Cost (cost.png): at P = {smallest[0]['P']} all P partials one JVP each take "
        f"{smallest[0]['x_grad']:.2g}x the time of one reverse-mode gradient and the nudges "
        f"{smallest[1]['x_grad']:.2g}x; at P = {biggest[0]['P']} they take "
        f"{biggest[0]['x_grad']:.3g}x and {biggest[1]['x_grad']:.3g}x: one partial derivative "
        "costs about a forward pass, so all of them one at a time cost P forward passes, while "
        "reverse mode gives the whole gradient for a small multiple of one."
    )
    table_cols = ["label", "pb_partial", "pb_nudge", "jax_grad", "J_T_r", "pb_nudge_float32"]
    body = [
        f"1-{hidden}-1 tanh MLP at initialisation, N = {n} points of y = sin(3x), "
        f"L = 1/2 ||r||^2 = {loss0:.6g}, P = {grad.size} parameters, float64.",
        "",
        "## The loss along one parameter at a time",
        "",
        "![slices](slices.png)",
        "",
        "## Every partial derivative, three ways (and J^T r)",
        "",
        h.table(rows, table_cols),
        "",
        "![gradient check](gradient_check.png)",
        "",
        "## Agreement over initialisations (max relative error against jax.grad)",
        "",
        h.table(seeds),
        "",
        "## The Jacobian of the outputs",
        "",
        f"J has shape (N, P) = {jac.shape}: row i is the gradient of f(x_i), column k says how "
        "every output moves when theta_k alone moves.",
        "",
        "![jacobian](jacobian.png)",
        "",
        f"## Cost of all P partial derivatives (N = {n}, compile time apart, median run)",
        "",
        h.table(timings),
        "",
        "![cost](cost.png)",
    ]
    return h.report(
        "Partial derivatives, ceteris paribus",
        __doc__,
        name=NAME,
        args=args,
        seconds=time.perf_counter() - t_start,
        finding=finding,
        body=body,
    )


FULL = {"hidden": 16, "n": 40, "cost_widths": (4, 16, 64, 256, 1024), "repeats": 20}
QUICK = {"hidden": 6, "n": 12, "cost_widths": (4, 32, 256), "repeats": 5}


if __name__ == "__main__":
    h.exit(h.main(NAME, __doc__, run, full=FULL, quick=QUICK, seeds=5))
