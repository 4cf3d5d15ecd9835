"""Gradient descent against Gauss-Newton and Levenberg-Marquardt on one regression network.

Question: on a small regression network, how many iterations and how much wall-clock time do
gradient descent, GD with momentum and Adam need to reach a target loss, against Gauss-Newton
and Levenberg-Marquardt (LM) steps built from the Jacobian of the residuals?

Setup: a 1-16-16-1 tanh MLP (P = 321 parameters, LeCun-normal initialisation) fits
y = sin(2 pi x) + x / 2 at N = 200 evenly spaced points of [-1, 1], float32. Residuals
r_i = f(x_i) - y_i, loss L = 1/2 ||r||^2; the target is an RMS residual of 3e-3, i.e.
L <= N (3e-3)^2 / 2 = 9e-4. Every method runs ``pb.fit`` from the same initial parameters (one
per seed) on the same ``pb.regression_residuals`` function: GD, GD with momentum 0.9 and Adam
over a learning-rate grid (the grid point with most seeds at the target, then fewest median
iterations, is reported), at most 20,000 steps; ``pb.gauss_newton()`` and
``pb.levenberg_marquardt()`` (Nielsen damping; every trial, accepted or not, counts), at most 150.
The seeds and rates of a method run as one ``jax.vmap`` of ``pb.fit``; the time per iteration
comes from a compiled, un-batched run of seed 0 at the best rate; time to target = iterations to
target x time per iteration.

Finding (``experiments/run_all.py`` of 2026-12-02, 10 seeds, one CPU core; results/REPORT.md):
LM reaches the target on 10/10 seeds in a median 39 iterations (17.5 ms); Adam needs 46x as
many (1,796) and GD with momentum 252x (9,832, 7/10 seeds); plain GD and undamped Gauss-Newton
never reach it. Each LM iteration costs about 12x an Adam step, so LM wins 4.0x in time to
target (17.4x against GD with momentum).

    python experiments/gd_vs_gauss_newton.py            # about a minute on 2 CPU cores
    python experiments/gd_vs_gauss_newton.py --quick    # seconds (CI)
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import _harness as h  # first: it sets OpenBLAS's threads before jax loads
import jax.numpy as jnp
import numpy as np
import optax

import paribus as pb

NAME = "gd_vs_gauss_newton"
COLORS = {
    "GD": "tab:gray",
    "GD+momentum": "tab:olive",
    "Adam": "tab:orange",
    "Gauss-Newton": "tab:purple",
    "LM": "tab:blue",
}


class Config(NamedTuple):
    n: int  # data points
    sizes: tuple[int, ...]  # MLP widths
    rms_target: float
    first_order_steps: int  # GD, momentum, Adam
    solver_steps: int  # Gauss-Newton and LM (trials)
    grids: dict  # learning rates per first-order method


# The loss is a sum over N examples, so GD's stable step is O(1/N): the GD and momentum rates
# are written as eta x N and divided by N in the optimiser. Adam does not see the loss's scale.
FULL = Config(
    200,
    (1, 16, 16, 1),
    3e-3,
    20_000,
    150,
    {"GD": (0.3, 0.1, 0.03), "GD+momentum": (0.3, 0.1, 0.03), "Adam": (1e-2, 3e-3, 1e-3)},
)
QUICK = Config(
    64, (1, 8, 8, 1), 3e-2, 300, 40, {"GD": (0.3,), "GD+momentum": (0.1,), "Adam": (1e-2,)}
)


# --- the problem: one residual function for every method ------------------------------------


def problem(cfg: Config):
    x = jnp.linspace(-1.0, 1.0, cfg.n)[:, None]
    y = jnp.sin(2 * jnp.pi * x) + 0.5 * x
    init, apply = pb.nets.mlp(list(cfg.sizes), activation="tanh")
    target = 0.5 * cfg.n * cfg.rms_target**2
    return init, pb.regression_residuals(apply), (x, y), target


def optimiser(method: str, lr, n: int):
    """The optax transformation of ``method``; ``lr`` may be traced (a vmapped grid)."""
    return {
        "GD": lambda: optax.sgd(lr / n),
        "GD+momentum": lambda: optax.sgd(lr / n, momentum=0.9),
        "Adam": lambda: optax.adam(lr),
        "Gauss-Newton": pb.gauss_newton,
        "LM": pb.levenberg_marquardt,
    }[method]()


# --- the runs ---------------------------------------------------------------------------------


def run_method(method: str, cfg: Config, seeds: int) -> dict:
    """Every rate x seed of one method as one vmapped fit; the best rate timed on seed 0."""
    init, residual_fn, batch, target = problem(cfg)
    grid = cfg.grids.get(method, (math.nan,))
    steps = cfg.first_order_steps if method in cfg.grids else cfg.solver_steps
    keys = h.keys(seeds)
    runs = h.sweep(
        residual_fn,
        init,
        lambda lr: optimiser(method, lr, cfg.n),
        grid,
        keys,
        batch,
        max_steps=steps,
        target_loss=target,
    )
    its = h.first_at_or_below(runs.losses, target)
    best = h.best_index(its, h.last_finite(runs.losses))
    timing = h.time_fit(
        residual_fn,
        init(keys[0]),
        optimiser(method, grid[best], cfg.n),
        batch,
        max_steps=min(steps, 2_000),
        target_loss=target,
    )
    return dict(method=method, grid=grid, best=best, runs=runs, its=its, timing=timing)


def rows_of(res: dict) -> list[dict]:
    """One CSV row per (learning rate, seed)."""
    runs, out = res["runs"], []
    for i, lr in enumerate(res["grid"]):
        for s in range(runs.steps.shape[1]):
            k = int(res["its"][i, s])
            best = i == res["best"]
            out.append(
                {
                    "method": res["method"],
                    "lr": lr,
                    "best_lr": best,
                    "seed": s,
                    "iterations_to_target": k if k >= 0 else "",
                    "accepted_to_target": int(runs.accepted[i, s, 1 : k + 1].sum())
                    if k >= 0
                    else "",
                    "time_to_target_s": k * res["timing"].per_step if k >= 0 and best else "",
                    "steps_run": int(runs.steps[i, s]),
                    "stop_reason": runs.stops[i, s],
                    "initial_loss": float(runs.losses[i, s, 0]),
                    "final_loss": float(h.last_finite(runs.losses[i, s])),
                }
            )
    return out


def summary(res: dict, seeds: int) -> dict:
    b, t = res["best"], res["timing"]
    its = res["its"][b]
    ok = its >= 0
    k = float(np.median(its[ok])) if ok.any() else math.nan
    lr = res["grid"][b]
    return {
        "method": res["method"],
        "learning rate": "–" if math.isnan(lr) else f"{lr:g}",
        "reached target": f"{int(ok.sum())}/{seeds}",
        "median iterations": k,
        "median time to target (ms)": k * t.per_step * 1e3,
        "time per iteration (us)": t.per_step * 1e6,
        "median final loss": h.median(h.last_finite(res["runs"].losses[b])),
        "compile (s)": t.compile_s,
    }


def finding(table: list[dict]) -> str:
    by = {r["method"]: r for r in table}
    lm = by["LM"]
    if math.isnan(lm["median iterations"]):
        return "LM did not reach the target on any seed in this run."
    parts = [
        f"LM reached the target on {lm['reached target']} seeds in a median "
        f"{lm['median iterations']:.0f} iterations ({lm['median time to target (ms)']:.3g} "
        f"ms, {lm['time per iteration (us)']:.0f} us per iteration)."
    ]
    for r in table:
        if r["method"] == "LM":
            continue
        if math.isnan(r["median iterations"]):
            parts.append(
                f"{r['method']} never reached it (median final loss {r['median final loss']:.2g})."
            )
            continue
        parts.append(
            f"{r['method']} reached it on {r['reached target']} seeds in a median "
            f"{r['median iterations']:.0f} iterations: "
            f"{r['median iterations'] / lm['median iterations']:.3g}x LM's iterations, "
            f"{r['median time to target (ms)'] / lm['median time to target (ms)']:.3g}x its time "
            f"({r['time per iteration (us)'] / lm['time per iteration (us)']:.3g}x per iteration)."
        )
    return " ".join(parts)


# --- figures and report -----------------------------------------------------------------------


def grid_figure(results: list[dict], cfg: Config):
    import matplotlib.pyplot as plt

    graded = [r for r in results if r["method"] in cfg.grids]
    fig, axes = plt.subplots(1, len(graded), figsize=(4.2 * len(graded), 3.6), squeeze=False)
    for ax, res in zip(axes[0], graded, strict=True):
        final = np.minimum(h.last_finite(res["runs"].losses), 1e6)
        for lr, f, its in zip(res["grid"], final, res["its"], strict=True):
            ax.scatter([lr] * len(f), f, color=COLORS[res["method"]], alpha=0.6, s=14)
            ax.annotate(
                f"{(its >= 0).mean():.0%}",
                (lr, f.max()),
                fontsize=8,
                ha="center",
                textcoords="offset points",
                xytext=(0, 6),
            )
        unit = " (eta x N)" if res["method"] != "Adam" else ""
        ax.set(
            xscale="log",
            yscale="log",
            title=f"{res['method']}: final loss per seed",
            xlabel=f"learning rate{unit}",
        )
        ax.grid(True, alpha=0.3)
    axes[0, 0].set_ylabel("loss at stop (label: seeds at the target)")
    return fig


def run(cfg: Config, args, out: h.Output) -> str:
    t0 = time.perf_counter()
    methods = [*cfg.grids, "Gauss-Newton", "LM"]
    results = [
        run_method(m, cfg, args.seeds)
        for m in h.progress(methods, desc=NAME, disable=args.no_progress)
    ]
    target = problem(cfg)[3]
    out.csv("runs.csv", [row for res in results for row in rows_of(res)])
    series = [
        dict(
            label=r["method"]
            + ("" if math.isnan(r["grid"][r["best"]]) else f" (lr {r['grid'][r['best']]:g})"),
            color=COLORS[r["method"]],
            steps=np.arange(r["runs"].losses.shape[-1]),
            values=r["runs"].losses[r["best"]],
            per_step=r["timing"].per_step,
        )
        for r in results
    ]
    out.figure(
        "loss_curves.png",
        h.curves_figure(
            series,
            ylabel="loss 1/2 ||r||^2 (dashed: target)",
            target=target,
            title="GD, momentum, Adam (best learning rate) against Gauss-Newton and LM",
            xlabel_steps="iteration + 1 (LM: every trial counts)",
        ),
    )
    out.figure("lr_grid.png", grid_figure(results, cfg))
    table = [summary(r, args.seeds) for r in results]
    setup = (
        f"MLP {list(cfg.sizes)} (tanh), N = {cfg.n}, float32; target loss {target:.3g} "
        f"(RMS {cfg.rms_target:g}); first-order methods at most {cfg.first_order_steps} "
        f"steps, grids {dict(cfg.grids)}; Gauss-Newton and LM at most "
        f"{cfg.solver_steps}."
    )
    return h.report(
        "Gradient descent against Gauss-Newton and Levenberg-Marquardt",
        __doc__,
        name=NAME,
        args=args,
        seconds=time.perf_counter() - t0,
        finding=finding(table),
        body=[
            setup,
            "",
            h.table(table),
            "",
            "![loss curves](loss_curves.png)",
            "",
            "![learning-rate grid](lr_grid.png)",
            "",
            "Time per iteration: the harness's compiled, hook-free `pb.fit` of seed 0 at the "
            "best rate (fixed cost of a call removed); every run in `runs.csv`.",
        ],
    )


if __name__ == "__main__":
    h.exit(h.main(NAME, __doc__, run, full=FULL, quick=QUICK, seeds=10))
