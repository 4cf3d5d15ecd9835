"""Convergence rates of Gauss-Newton and Levenberg-Marquardt: the textbook claims, measured.

Question: near a minimiser x* the Gauss-Newton (GN) iteration satisfies (Nocedal & Wright,
*Numerical Optimization*, 2nd ed., section 10.3)

    x_(k+1) - x* = -(J^T J)^-1 H (x_k - x*) + O(|x_k - x*|^2),    H = sum_i r_i(x*) r_i''(x*),

so GN converges quadratically when the residuals vanish at x* (H = 0), linearly with rate
rho = |(J^T J)^-1 H| when they are small, and not at all when rho > 1, while
Levenberg-Marquardt (LM), which only accepts steps that lower the loss, still converges. Do
``pb.gauss_newton`` and ``pb.levenberg_marquardt`` show exactly that?

Setup: Dennis & Schnabel's example 10.2.5 (*Numerical Methods for Unconstrained Optimization*):
r_i(x) = exp(t_i x) - y_i, t = (1, 2, 3), y = (2, 4, y3) with y3 = 8 (zero residual,
x* = ln 2), 3 (small), -1 (medium) and -4 (large), float64. x* comes from Newton's method on the
loss; the predicted rate rho = |H / J^T J| at x* and, at zero residual, the quadratic constant
C = |G''(x*)| / 2 of the GN map G(x) = x - J^T r / J^T J, by automatic differentiation. Each
seed starts at x0 = x* + delta, |delta| uniform in [0.05, 0.2] with a random sign (a local start,
where the theory applies). Both methods run through ``pb.fit`` (all cases and seeds of a method
as one ``jax.vmap``), at most 40 iterations. The error measured is |g_k| = |J^T r| from the
history: g = L''(x*) (x - x*) + O((x - x*)^2) converges with |x_k - x*|'s rate.

Finding (``experiments/run_all.py`` of 2026-12-02, 5 seeds; results/REPORT.md): the textbook
rates, measured to three digits. At zero residual GN converges quadratically in a median 4
iterations (g_(k+1)/g_k^2 = 0.00224, predicted 0.00224); with a residual it converges linearly
at exactly the predicted rate (0.0596 and 0.473 measured and predicted); where that rate
exceeds 1 (2.2) GN fails on 5/5 seeds and LM still converges on 5/5 (median 16 iterations,
rate 0.263).

    python experiments/convergence_rates.py            # seconds
    python experiments/convergence_rates.py --quick    # seconds (CI)
"""

from __future__ import annotations

import math
import time

import _harness as h  # first: it sets OpenBLAS's threads before jax loads
import jax
import jax.numpy as jnp
import numpy as np

import paribus as pb

NAME = "convergence_rates"
T = (1.0, 2.0, 3.0)
CASES = {
    "zero residual": 8.0,
    "small residual": 3.0,
    "medium residual": -1.0,
    "large residual": -4.0,
}
FULL, QUICK = 40, 20  # iterations at most
# |g| counted as converged. Not lower: at a nonzero residual the loss stops changing in float64
# once |g| ~ sqrt(eps L* L''), 1e-10 to 3e-8 here, so LM (which needs a decrease to accept a
# step) stalls there while GN (no test) goes on to round-off, about 1e-14.
TOL = 1e-6


# --- the problem and its theory ---------------------------------------------------------------


def residual_fn(params, batch):
    """r_i = exp(t_i x) - y_i; params {"x": ()}, batch (t (3,), y (3,))."""
    t, y = batch
    return jnp.exp(t * params["x"]) - y


def theory(y3: float) -> dict:
    """x*, L*, L''(x*), the predicted linear rate |H / J^T J| and the quadratic constant
    C = |G''(x*)| / 2 of the Gauss-Newton map G, all by automatic differentiation."""
    t, y = jnp.asarray(T), jnp.array([2.0, 4.0, y3])
    loss = lambda x: 0.5 * jnp.sum((jnp.exp(t * x) - y) ** 2)  # noqa: E731
    d1, d2 = jax.grad(loss), jax.grad(jax.grad(loss))
    x = jnp.asarray(0.5)
    for _ in range(100):  # Newton on L'(x) = 0; converges from 0.5 in every case here
        x = x - d1(x) / d2(x)
    jac = lambda x: jnp.exp(t * x) * t  # noqa: E731
    jtj = jnp.sum(jac(x) ** 2)
    gn_map = lambda x: x - jnp.sum(jac(x) * (jnp.exp(t * x) - y)) / jnp.sum(jac(x) ** 2)  # noqa: E731
    return {
        "x_star": float(x),
        "loss_star": float(loss(x)),
        "curvature": float(d2(x)),
        "rate": float(abs((d2(x) - jtj) / jtj)),
        "quad_const": float(abs(jax.grad(jax.grad(gn_map))(x)) / 2),
    }


def gradient_norms(opt, x0: np.ndarray, ys: np.ndarray, max_steps: int) -> np.ndarray:
    """|g_k| (cases, seeds, max_steps + 1), NaN past each stop: one vmapped ``pb.fit``."""

    def one(x, y):
        r = pb.fit(residual_fn, {"x": x}, opt, (jnp.asarray(T), y), max_steps=max_steps)
        return r.history.grad_norm

    g = jax.jit(jax.vmap(jax.vmap(one, (0, None)), (0, 0)))(jnp.asarray(x0), jnp.asarray(ys))
    return np.asarray(g)


def ratios(g: np.ndarray, power: int, lo: float, hi: float) -> float:
    """Median of |g_(k+1)| / |g_k|^power over the steps with lo < |g_k| < hi (the asymptotic
    phase, above round-off and LM's floor), over every seed; NaN when none."""
    out = [
        b / a**power
        for row in g
        for a, b in zip(row[:-1], row[1:], strict=True)
        if lo < a < hi and b > 1e-15
    ]
    return float(np.median(out)) if out else math.nan


# --- measurement against prediction -----------------------------------------------------------


def case_row(name: str, t: dict, g_gn: np.ndarray, g_lm: np.ndarray, seeds: int) -> dict:
    its_gn, its_lm = h.first_at_or_below(g_gn, TOL), h.first_at_or_below(g_lm, TOL)
    quadratic = t["rate"] < 1e-8
    if quadratic:
        gn_rate = "quadratic"
    else:
        gn_rate = ratios(g_gn, 1, 1e-6, 1e-2) if t["rate"] < 1 else "no convergence"
    return {
        "case": f"{name} (y3 = {CASES[name]:g})",
        "L*": t["loss_star"],
        "predicted GN rate": t["rate"],
        "measured GN rate": gn_rate,
        "predicted C/L''": t["quad_const"] / t["curvature"] if quadratic else "",
        "measured g_(k+1)/g_k^2": ratios(g_gn, 2, 1e-7, 1e-1) if quadratic else "",
        "GN converged": f"{int((its_gn >= 0).sum())}/{seeds}",
        "GN median its": h.median(its_gn[its_gn >= 0]),
        "measured LM rate": ratios(g_lm, 1, 1e-6, 1e-2),
        "LM converged": f"{int((its_lm >= 0).sum())}/{seeds}",
        "LM median its": h.median(its_lm[its_lm >= 0]),
    }


def finding(rows: list[dict], th: dict) -> str:
    parts = []
    for row, name in zip(rows, CASES, strict=True):
        t = th[name]
        if t["rate"] < 1e-8:
            predicted = row["predicted C/L''"]
            parts.append(
                f"Zero residual: GN converged on {row['GN converged']} seeds in a median "
                f"{row['GN median its']:.0f} iterations, quadratically: g_(k+1)/g_k^2 = "
                f"{row['measured g_(k+1)/g_k^2']:.3g} measured, {predicted:.3g} predicted."
            )
        elif t["rate"] < 1:
            m = row["measured GN rate"]
            agree = "agrees with" if abs(m - t["rate"]) <= 0.25 * t["rate"] else "differs from"
            parts.append(
                f"{name.capitalize()}: GN converged linearly on {row['GN converged']} "
                f"seeds at a measured rate {m:.3g}, which {agree} the predicted "
                f"{t['rate']:.3g}."
            )
        else:
            parts.append(
                f"{name.capitalize()}: the predicted rate {t['rate']:.3g} exceeds 1 and GN "
                f"converged on {row['GN converged']} seeds, LM on {row['LM converged']} (median "
                f"{row['LM median its']:.0f} iterations, rate {row['measured LM rate']:.3g})."
            )
    return " ".join(parts)


def figure(th: dict, g: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CASES), figsize=(4.1 * len(CASES), 4.0), sharey=True)
    for c, (ax, name) in enumerate(zip(axes, CASES, strict=True)):
        t = th[name]
        for s in range(g["GN"].shape[1]):
            ax.plot(
                g["GN"][c, s],
                color="tab:purple",
                lw=1,
                alpha=0.6,
                label="Gauss-Newton" if s == 0 else None,
            )
            ax.plot(
                g["LM"][c, s],
                color="tab:blue",
                lw=1,
                ls="--",
                alpha=0.6,
                label="LM" if s == 0 else None,
            )
        # The prediction, anchored at the median |g_1| of GN.
        pred = [float(np.nanmedian(g["GN"][c, :, 1]))]
        for _ in range(10):
            quad = t["quad_const"] / t["curvature"] * pred[-1] ** 2
            pred.append(quad if t["rate"] < 1e-8 else t["rate"] * pred[-1])
        pred = np.asarray(pred)
        keep = (pred > 1e-17) & (pred < 1e6)
        label = "predicted quadratic" if t["rate"] < 1e-8 else f"predicted rate {t['rate']:.3g}"
        ax.plot(np.arange(1, 12)[keep], pred[keep], "k:", lw=2, label=label)
        ax.set(
            yscale="log",
            ylim=(1e-17, 1e6),
            xlabel="iteration k",
            title=f"{name}: y3 = {CASES[name]:g}\nx* = {t['x_star']:.4f}, "
            f"L* = {t['loss_star']:.3g}",
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper right")
    axes[0].set_ylabel("|g_k| = |J^T r|")
    fig.suptitle("r_i = exp(t_i x) - y_i, t = (1, 2, 3), y = (2, 4, y3)", y=1.03)
    return fig


def run(max_steps: int, args, out: h.Output) -> str:
    jax.config.update("jax_enable_x64", True)
    t0 = time.perf_counter()
    th = {name: theory(y3) for name, y3 in CASES.items()}
    rng = np.random.default_rng(0)
    offsets = rng.uniform(0.05, 0.2, args.seeds) * rng.choice([-1.0, 1.0], args.seeds)
    x0 = np.array([[th[n]["x_star"] + d for d in offsets] for n in CASES])
    ys = np.array([[2.0, 4.0, y3] for y3 in CASES.values()])
    g = {
        "GN": gradient_norms(pb.gauss_newton(), x0, ys, max_steps),
        "LM": gradient_norms(pb.levenberg_marquardt(), x0, ys, max_steps),
    }
    rows = [case_row(n, th[n], g["GN"][c], g["LM"][c], args.seeds) for c, n in enumerate(CASES)]
    out.csv(
        "iterations.csv",
        [
            {"case": n, "method": m, "seed": s, "x0": x0[c, s], "iteration": k, "grad_norm": v}
            for m in g
            for c, n in enumerate(CASES)
            for s in range(args.seeds)
            for k, v in enumerate(g[m][c, s])
            if np.isfinite(v)
        ],
    )
    out.figure("rates.png", figure(th, g))
    return h.report(
        "Convergence rates of Gauss-Newton and Levenberg-Marquardt",
        __doc__,
        name=NAME,
        args=args,
        seconds=time.perf_counter() - t0,
        finding=finding(rows, th),
        body=[
            f"float64, at most {max_steps} iterations; converged: |g| <= {TOL:g}.",
            "",
            h.table(rows),
            "",
            "![rates](rates.png)",
            "",
            "Every iteration of every run: `iterations.csv`.",
        ],
    )


if __name__ == "__main__":
    h.exit(h.main(NAME, __doc__, run, full=FULL, quick=QUICK, seeds=5))
