"""Convergence rates of Gauss-Newton and Levenberg-Marquardt: the textbook claims, measured.

Question: Nocedal & Wright (*Numerical Optimization*, 2nd ed., ch. 10.3) show that near a
minimiser x* the Gauss-Newton (GN) iteration satisfies

    x_{k+1} - x* = -(J^T J)^{-1} H (x_k - x*) + O(|x_k - x*|^2),    H = sum_i r_i(x*) r_i''(x*),

so GN converges quadratically when the residuals vanish at x* (H = 0), linearly with rate
rho = |(J^T J)^{-1} H| when they are small, and not at all when rho > 1 (large residuals),
while Levenberg-Marquardt (LM), which only accepts steps that lower the loss, still converges.
Do ``pb.gauss_newton`` and ``pb.levenberg_marquardt`` show exactly that?

Setup: the classic one-parameter example of Dennis & Schnabel (*Numerical Methods for
Unconstrained Optimization*, example 10.2.5): r_i(x) = exp(t_i x) - y_i, t = (1, 2, 3),
y = (2, 4, y3) with y3 = 8 (zero residual, x* = ln 2), 3 (small), -1 (medium) and -4 (large).
float64 (``jax_enable_x64``). x* is found by Newton's method on the loss; the predicted rate
rho = |H / J^T J| at x* and, for the zero-residual case, the quadratic constant
C = |G''(x*)| / 2 of the GN map G(x) = x - J^T r / J^T J come from automatic differentiation.
Each seed starts at x0 = x* + delta, |delta| uniform in [0.05, 0.2] with a random sign (a
local start, where the theory applies). Both methods run through ``pb.fit`` (all cases and
seeds of a method as one ``jax.vmap``) with the same residual function, for at most 40
iterations. The error shown is the gradient norm |g_k| = |J^T r| from ``pb.fit``'s history:
g = L''(x*) (x - x*) + O((x - x*)^2), so it converges with the same rate as |x_k - x*|
(with the quadratic constant C / L''(x*)).

Finding: see ``results/convergence_rates/report.md`` (numbers from the run that wrote it).

    python experiments/convergence_rates.py            # seconds
    python experiments/convergence_rates.py --quick    # seconds (CI)
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

# XLA's CPU eigh and Cholesky (Gauss-Newton's pseudo-inverse, LM's solve) call LAPACK through
# OpenBLAS, whose worker threads spin when the cores are shared: on a busy 2-core machine a
# 200 x 200 eigh took 0.6 s. One thread each; set before jax loads, an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import paribus as pb  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

NAME = "convergence_rates"
T = (1.0, 2.0, 3.0)
CASES = {"zero residual": 8.0, "small residual": 3.0, "medium residual": -1.0,
         "large residual": -4.0}  # fmt: skip
# |g| counted as converged. Not lower: at a nonzero residual L* the loss stops changing in
# float64 once |g| ~ sqrt(eps L* L''), 1e-10 to 3e-8 here, so LM (which needs a decrease to accept
# a step) stalls there, while GN (no test) goes on to round-off, about 1e-14.
TOL = 1e-6


def residual_fn(params, batch):
    """r_i = exp(t_i x) - y_i; params {"x": ()}, batch (t (3,), y (3,))."""
    t, y = batch
    return jnp.exp(t * params["x"]) - y


def loss(x, y):
    return 0.5 * jnp.sum(residual_fn({"x": x}, (jnp.asarray(T), y)) ** 2)


def theory(y3: float) -> dict:
    """x*, L*, L''(x*), the predicted linear rate rho = |H / J^T J| and the quadratic constant
    C = |G''(x*)| / 2 of the Gauss-Newton map, all by automatic differentiation."""
    y = jnp.array([2.0, 4.0, y3])
    t = jnp.asarray(T)
    d1, d2 = jax.grad(loss), jax.grad(jax.grad(loss))
    x = jnp.asarray(0.5)
    for _ in range(100):  # Newton on L'(x) = 0; converges from 0.5 in every case here
        x = x - d1(x, y) / d2(x, y)
    jac = lambda x: jnp.exp(t * x) * t  # noqa: E731
    jtj = jnp.sum(jac(x) ** 2)
    hess = d2(x, y)
    gn_map = lambda x: x - jnp.sum(jac(x) * (jnp.exp(t * x) - y)) / jnp.sum(jac(x) ** 2)  # noqa: E731
    return {
        "x_star": float(x),
        "loss_star": float(loss(x, y)),
        "curvature": float(hess),
        "rate": float(abs((hess - jtj) / jtj)),
        "quad_const": float(abs(jax.grad(jax.grad(gn_map))(x)) / 2),
    }


def run(opt, x0: np.ndarray, ys: np.ndarray, max_steps: int):
    """Gradient norms (C, S, max_steps + 1), NaN past each stop; all cases x seeds vmapped."""

    def one(x0, y):
        r = pb.fit(residual_fn, {"x": x0}, opt, (jnp.asarray(T), y), max_steps=max_steps)
        return r.history.grad_norm, r.history.loss, r.steps

    f = jax.jit(jax.vmap(jax.vmap(one, (0, None)), (0, 0)))
    g, loss_hist, steps = jax.block_until_ready(f(jnp.asarray(x0), jnp.asarray(ys)))
    return np.asarray(g), np.asarray(loss_hist), np.asarray(steps)


def measured_rate(g: np.ndarray) -> float:
    """Median of |g_{k+1}| / |g_k| over the steps with 1e-6 < |g_k| < 1e-2 (the asymptotic,
    linear phase above round-off and LM's floor, see TOL), over every seed; NaN when none."""
    ratios = []
    for row in g:
        row = row[np.isfinite(row)]
        for a, b in zip(row[:-1], row[1:], strict=True):
            if 1e-6 < a < 1e-2 and b > 0:
                ratios.append(b / a)
    return float(np.median(ratios)) if ratios else math.nan


def measured_quadratic(g: np.ndarray) -> float:
    """Median of |g_{k+1}| / |g_k|^2 over steps with 1e-7 < |g_k| < 1e-1 (zero residual)."""
    ratios = []
    for row in g:
        row = row[np.isfinite(row)]
        for a, b in zip(row[:-1], row[1:], strict=True):
            if 1e-7 < a < 1e-1 and b > 1e-15:
                ratios.append(b / a**2)
    return float(np.median(ratios)) if ratios else math.nan


def iterations_to(g: np.ndarray, tol: float) -> np.ndarray:
    hit = g <= tol
    return np.where(hit.any(-1), hit.argmax(-1), -1)


def plot(cases, th, g_gn, g_lm, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cases), figsize=(4.1 * len(cases), 4.0), sharey=True)
    for c, (ax, name) in enumerate(zip(axes, cases, strict=True)):
        k = np.arange(g_gn.shape[-1])
        for s in range(g_gn.shape[1]):
            ax.plot(k, g_gn[c, s], color="tab:purple", lw=1, alpha=0.6,
                    label="Gauss-Newton" if s == 0 else None)  # fmt: skip
            ax.plot(k, g_lm[c, s], color="tab:blue", lw=1, alpha=0.6, ls="--",
                    label="LM" if s == 0 else None)  # fmt: skip
        t = th[name]
        # Predicted slope, anchored at the median |g_1| of GN over the seeds.
        g1 = float(np.nanmedian(g_gn[c, :, 1]))
        steps = np.arange(1, 12)
        if t["rate"] < 1e-8:
            pred = [g1]
            for _ in steps[1:]:
                pred.append(t["quad_const"] / t["curvature"] * pred[-1] ** 2)
            label = f"predicted quadratic, C/L'' = {t['quad_const'] / t['curvature']:.3g}"
        else:
            pred = g1 * t["rate"] ** (steps - 1)
            label = f"predicted linear, rate {t['rate']:.3g}"
        pred = np.asarray(pred)
        keep = (pred > 1e-17) & (pred < 1e6)
        ax.plot(steps[keep], pred[keep], "k:", lw=2, label=label)
        ax.set_yscale("log")
        ax.set_ylim(1e-17, 1e6)
        ax.set_xlim(0, g_gn.shape[-1] - 1)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{name}: y3 = {CASES[name]:g}\nx* = {t['x_star']:.4f}, "
                     f"L* = {t['loss_star']:.3g}", fontsize=10)  # fmt: skip
        ax.set_xlabel("iteration k")
        ax.legend(fontsize=7.5, loc="upper right")
    axes[0].set_ylabel("|g_k| = |J^T r| (error measure)")
    fig.suptitle("r_i = exp(t_i x) - y_i, t = (1, 2, 3), y = (2, 4, y3): Gauss-Newton vs LM",
                 y=1.03)  # fmt: skip
    _common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = _common.parser(NAME, __doc__, seeds=5).parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    _common.use_agg()
    t0 = time.perf_counter()
    max_steps = 20 if args.quick else 40
    cases = list(CASES)
    th = {name: theory(y3) for name, y3 in CASES.items()}
    rng = np.random.default_rng(0)
    offsets = rng.uniform(0.05, 0.2, args.seeds) * rng.choice([-1.0, 1.0], args.seeds)
    x0 = np.array([[th[n]["x_star"] + d for d in offsets] for n in cases])
    ys = np.array([[2.0, 4.0, CASES[n]] for n in cases])
    out = {}
    methods = {"Gauss-Newton": pb.gauss_newton(), "LM": pb.levenberg_marquardt()}
    for method in _common.progress(list(methods), desc=NAME, disable=args.no_progress):
        out[method] = run(methods[method], x0, ys, max_steps)
    wall = time.perf_counter() - t0

    rows, table = [], []
    for c, name in enumerate(cases):
        for method, (g, lh, steps) in out.items():
            for s in range(args.seeds):
                for k in range(int(steps[c, s]) + 1):
                    rows.append({"case": name, "y3": CASES[name], "method": method, "seed": s,
                                 "x0": x0[c, s], "iteration": k, "grad_norm": g[c, s, k],
                                 "loss": lh[c, s, k]})  # fmt: skip
        t = th[name]
        g_gn, g_lm = out["Gauss-Newton"][0][c], out["LM"][0][c]
        its_gn, its_lm = iterations_to(g_gn, TOL), iterations_to(g_lm, TOL)
        quad = t["rate"] < 1e-8
        table.append({
            "case": f"{name} (y3 = {CASES[name]:g})",
            "x*": t["x_star"], "L*": t["loss_star"],
            "predicted GN rate abs(H)/JTJ": t["rate"],
            "measured GN rate": "quadratic" if quad
            else (measured_rate(g_gn) if t["rate"] < 1 else "no convergence"),
            "predicted C/L''": t["quad_const"] / t["curvature"] if quad else "",
            "measured g_(k+1)/g_k^2": measured_quadratic(g_gn) if quad else "",
            "GN converged": f"{int((its_gn >= 0).sum())}/{args.seeds}",
            "GN median its": float(np.median(its_gn[its_gn >= 0])) if (its_gn >= 0).any()
            else "-",
            "measured LM rate": measured_rate(g_lm),
            "LM converged": f"{int((its_lm >= 0).sum())}/{args.seeds}",
            "LM median its": float(np.median(its_lm[its_lm >= 0])) if (its_lm >= 0).any()
            else "-",
        })  # fmt: skip

    _common.write_csv(args.out / "iterations.csv", rows)
    plot(cases, th, out["Gauss-Newton"][0], out["LM"][0], args.out / "rates.png")
    lines = [
        "# Convergence rates of Gauss-Newton and Levenberg-Marquardt",
        "",
        f"Written by `python experiments/{NAME}.py"
        + (" --quick" if args.quick else "")
        + f" --seeds {args.seeds}` in {wall:.1f} s; float64; at most {max_steps} iterations; "
        f"converged means |g| <= {TOL:g}.",
        "",
        _common.markdown_table(table),
        "",
        "## Finding",
        "",
        finding(table, th, cases),
        "",
        "![rates](rates.png)",
        "",
        "Every iteration of every run: `iterations.csv`.",
        "",
    ]
    _common.write_text(args.out / "report.md", "\n".join(lines))
    print(f"{NAME}: wrote {args.out}/report.md, iterations.csv, rates.png ({wall:.1f} s)")


def finding(table: list[dict], th: dict, cases: list[str]) -> str:
    parts = []
    for row, name in zip(table, cases, strict=True):
        t = th[name]
        if t["rate"] < 1e-8:
            parts.append(
                f"Zero residual: GN converged on {row['GN converged']} seeds in a median "
                f"{row['GN median its']} iterations, quadratically: measured "
                f"g_(k+1)/g_k^2 = {row['measured g_(k+1)/g_k^2']:.3g} against the predicted "
                f"{row['predicted C/L' + chr(39) + chr(39)]:.3g}."
            )
        elif t["rate"] < 1:
            m = row["measured GN rate"]
            agree = "agrees with" if abs(m - t["rate"]) <= 0.25 * t["rate"] else "differs from"
            parts.append(
                f"{name.capitalize()} (y3 = {CASES[name]:g}): GN converged linearly on "
                f"{row['GN converged']} seeds, measured rate {m:.3g}, which {agree} the "
                f"predicted {t['rate']:.3g}."
            )
        else:
            parts.append(
                f"{name.capitalize()} (y3 = {CASES[name]:g}): the predicted rate "
                f"{t['rate']:.3g} > 1, and GN converged on {row['GN converged']} seeds, while "
                f"LM converged on {row['LM converged']} (median {row['LM median its']} "
                f"iterations, measured rate {row['measured LM rate']:.3g})."
            )
    return " ".join(parts)


if __name__ == "__main__":
    main()
