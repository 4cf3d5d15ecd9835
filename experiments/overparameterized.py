"""Over-parameterised teacher-student: fast training with dual Gauss-Newton / LM, and its caveat.

Question: when the student network has far more parameters than there are training points
(P >> N), the dual (kernel) form makes every Gauss-Newton / Levenberg-Marquardt step an N x N
solve. How fast does it drive the training loss down against gradient descent and Adam, in
wall-clock time, and does the faster fit also generalise as well (Arbel, Menegaux & Wolinski,
"Rethinking Gauss-Newton for learning over-parameterized models", NeurIPS 2023)?

Setup: teacher: a 10-5-1 tanh MLP with LeCun-normal weights (fixed key); inputs x ~ N(0, I_10);
500 training and 10,000 test points; targets y = teacher(x), no noise. Students: 10-H-1 tanh
MLPs, H in {50, 200, 1000, 3000} (P = 12 H + 1 = 601 to 36,001, all > N), LeCun-normal
initialisation (one per seed, shared by every method), float32, one ``pb.regression_residuals``
function, every method through ``pb.fit``: LM in the dual form
(``pb.levenberg_marquardt(solve="dual")``), at most 100 trials; undamped minimum-norm GN in the
dual form, 30 steps; GD with step c / lambda_max(NTK at init), c in {1, 1.9} (stable below 2),
2,000 steps; Adam, learning rate in {1e-3, 1e-2}, 2,000 steps. Rates are chosen on seed 0 by
final training loss. Every run stops at a relative training error ||r||^2 / ||y - mean y||^2 of
1e-5. Test error: MSE / Var(y_test) at the end. Timings: the harness's compiled ``pb.fit``.

Finding (``experiments/run_all.py`` of 2026-12-02, 3 seeds, one CPU core; results/REPORT.md):
dual LM fits the 500 points in a median 2-7 trials at every width up to P = 36,001
(0.03-0.16 s), while GD and Adam mostly do not reach the target in 2,000 steps; but the fastest
fit is not the best model: at H = 1,000 LM's test error (0.0157) is 1.6x Adam's (0.0096), at
H = 50 it is the best (2e-6 against Adam's 6e-4).

    python experiments/overparameterized.py            # about a minute on 2 CPU cores
    python experiments/overparameterized.py --quick    # seconds (CI)
"""

from __future__ import annotations

import time
from typing import NamedTuple

import _harness as h  # first: it sets OpenBLAS's threads before jax loads
import jax
import jax.numpy as jnp
import numpy as np
import optax

import paribus as pb

NAME = "overparameterized"
METHODS = ("LM (dual)", "GN (dual, min-norm)", "GD", "Adam")
COLORS = {"LM (dual)": "C0", "GN (dual, min-norm)": "C4", "GD": "C2", "Adam": "C1"}
TARGET = 1e-5  # relative training error


class Config(NamedTuple):
    n_train: int
    n_test: int
    widths: tuple[int, ...]
    steps: dict  # per method
    grids: dict  # GD: c in c / lambda_max; Adam: learning rates


FULL = Config(
    500,
    10_000,
    (50, 200, 1000, 3000),
    {"LM (dual)": 100, "GN (dual, min-norm)": 30, "GD": 2000, "Adam": 2000},
    {"GD": (1.0, 1.9), "Adam": (1e-3, 1e-2)},
)
QUICK = Config(
    100,
    1000,
    (50,),
    {"LM (dual)": 20, "GN (dual, min-norm)": 10, "GD": 200, "Adam": 200},
    {"GD": (1.9,), "Adam": (1e-2,)},
)


def teacher_data(n_train: int, n_test: int):
    """Noiseless targets of a 10-5-1 tanh teacher on Gaussian inputs."""
    init, apply = pb.nets.mlp([10, 5, 1], "tanh")
    teacher = init(jax.random.key(1234))
    k_train, k_test = jax.random.split(jax.random.key(99))
    xs = [jax.random.normal(k, (n, 10)) for k, n in ((k_train, n_train), (k_test, n_test))]
    return [(x, jax.vmap(apply, (None, 0))(teacher, x)) for x in xs]


def optimiser(method: str):
    """(opt, state_at): GD and Adam take their rate through the state (one compile per grid)."""
    if method == "LM (dual)":
        return pb.levenberg_marquardt(solve="dual"), None
    if method == "GN (dual, min-norm)":
        return pb.gauss_newton(solve="dual"), None
    return h.with_rate(optax.sgd if method == "GD" else optax.adam)


def run_width(width: int, cfg: Config, train, test, seeds: int) -> list[dict]:
    """Every method at one width: the grid on seed 0, its best point on the other seeds."""
    init, apply = pb.nets.mlp([10, width, 1], "tanh")
    residual_fn = pb.regression_residuals(apply)
    inits = [init(k) for k in h.keys(seeds)]
    y_var = float(jnp.sum(jnp.square(train[1] - jnp.mean(train[1]))))
    test_mse = jax.jit(lambda p: jnp.mean(jnp.square(residual_fn(p, test))) / jnp.var(test[1]))
    lam_max = [float(jnp.linalg.eigvalsh(pb.ntk(apply, p, train[0]))[-1]) for p in inits]
    rows = []
    for method in METHODS:
        opt, state_at = optimiser(method)

        def one(seed, g, method=method, opt=opt, state_at=state_at):
            kw = {}
            if state_at is not None:
                lr = g / lam_max[seed] if method == "GD" else g
                kw["state"] = state_at(inits[seed], lr)
            t = h.time_fit(
                residual_fn,
                inits[seed],
                opt,
                train,
                max_steps=cfg.steps[method],
                target_loss=0.5 * TARGET * y_var,
                **kw,
            )
            loss = np.asarray(t.result.history.loss)
            return {
                "method": method,
                "H": width,
                "P": 12 * width + 1,
                "seed": seed,
                "grid_value": g,
                "steps": int(t.result.steps),
                "stop_reason": t.result.stop_reason.name,
                "compile_s": t.compile_s,
                "seconds": t.per_step * int(t.result.steps),
                "per_step": t.per_step,
                "train_rel_err": 2 * float(loss[-1]) / y_var,
                "reached": 2 * float(loss[-1]) / y_var <= TARGET,
                "test_rel_mse": float(test_mse(t.result.params)),
                "curve": 2 * loss / y_var,
            }

        first = [one(0, g) for g in cfg.grids.get(method, (None,))]
        best = min(first, key=lambda r: r["train_rel_err"])
        for r in first:
            r["chosen"] = r is best
        rows += first + [{**one(s, best["grid_value"]), "chosen": True} for s in range(1, seeds)]
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for width in sorted({r["H"] for r in rows}):
        for method in METHODS:
            g = [r for r in rows if (r["method"], r["H"]) == (method, width) and r["chosen"]]
            reached = [r for r in g if r["reached"]]
            gv = g[0]["grid_value"]
            setting = {"GD": f"{gv}/lambda_max", "Adam": f"lr {gv}"}.get(method, "")
            out.append(
                {
                    "H": width,
                    "P": g[0]["P"],
                    "method": method,
                    "setting": setting,
                    "reached": f"{len(reached)}/{len(g)}",
                    "median steps": h.median([r["steps"] for r in g]),
                    "median seconds": h.median([r["seconds"] for r in g]),
                    "train rel. err": h.median([r["train_rel_err"] for r in g]),
                    "test rel. MSE": h.median([r["test_rel_mse"] for r in g]),
                    "compile s": g[0]["compile_s"],
                }
            )
    return out


def curves_figure(rows: list[dict], cfg: Config):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(cfg.widths), figsize=(5.2 * len(cfg.widths), 4.4), squeeze=False
    )
    for ax, width in zip(axes[0], cfg.widths, strict=True):
        for method in METHODS:
            g = [r for r in rows if (r["method"], r["H"]) == (method, width) and r["chosen"]]
            values = h.stack_padded([r["curve"] for r in g])
            steps = np.arange(values.shape[1]) + 1
            h.plot_seeds(
                ax,
                steps * h.median([r["per_step"] for r in g]),
                values,
                color=COLORS[method],
                label=method,
            )
        ax.axhline(TARGET, color="k", ls=":", lw=0.8)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="wall-clock s (compile excluded)",
            ylabel="training ||r||^2 / ||y - mean y||^2",
            title=f"student 10-{width}-1, P = {12 * width + 1:,}, N = {cfg.n_train}",
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def test_figure(table: list[dict]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    widths = sorted({r["H"] for r in table})
    x, w = np.arange(len(widths)), 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        med = [
            next(r["test rel. MSE"] for r in table if (r["method"], r["H"]) == (method, hh))
            for hh in widths
        ]
        ax.bar(x + (i - 1.5) * w, med, w, color=COLORS[method], label=method)
    ax.set_xticks(x, [f"H={hh}\nP={12 * hh + 1:,}" for hh in widths])
    ax.set(yscale="log", title="test error MSE / Var(y) at the end (median over seeds)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def finding(table: list[dict]) -> str:
    lines = []
    for width in sorted({r["H"] for r in table}):
        s = {r["method"]: r for r in table if r["H"] == width}
        lm, gd, adam = s["LM (dual)"], s["GD"], s["Adam"]
        lines.append(
            f"H = {width} (P = {lm['P']:,}): LM reached the target on {lm['reached']} seeds in a "
            f"median {lm['median steps']:.0f} trials, {lm['median seconds']:.3g} s; GD ended at "
            f"{gd['train rel. err']:.2g} after {gd['median seconds']:.3g} s, Adam at "
            f"{adam['train rel. err']:.2g} after {adam['median seconds']:.3g} s. Test MSE / Var: "
            + ", ".join(f"{m} {s[m]['test rel. MSE']:.3g}" for m in METHODS)
            + "."
        )
    return "\n".join(f"- {line}" for line in lines)


def run(cfg: Config, args, out: h.Output) -> str:
    t0 = time.perf_counter()
    train, test = teacher_data(cfg.n_train, cfg.n_test)
    rows = [
        r
        for width in h.progress(cfg.widths, desc=NAME, disable=args.no_progress)
        for r in run_width(width, cfg, train, test, args.seeds)
    ]
    table = summary(rows)
    out.csv("runs.csv", [{k: v for k, v in r.items() if k != "curve"} for r in rows])
    out.figure("training_curves.png", curves_figure(rows, cfg))
    out.figure("test_error.png", test_figure(table))
    body = [
        h.table(table),
        "",
        "![training curves](training_curves.png)",
        "",
        "![test error](test_error.png)",
        "",
        "`runs.csv` holds every run, the grids included (`chosen`: the runs summarised).",
    ]
    return h.report(
        "Over-parameterised teacher-student",
        __doc__,
        name=NAME,
        args=args,
        seconds=time.perf_counter() - t0,
        finding=finding(table),
        body=body,
    )


if __name__ == "__main__":
    h.exit(h.main(NAME, __doc__, run, full=FULL, quick=QUICK, seeds=3))
