"""Hagan & Menhaj (1994), reproduced: Levenberg-Marquardt against first-order training.

Question: Hagan and Menhaj ("Training feedforward networks with the Marquardt algorithm", IEEE
Trans. Neural Networks 5(6), 1994) found Levenberg-Marquardt one to two orders of magnitude
cheaper than steepest descent, variable-learning-rate backpropagation and conjugate gradients
for networks of at most a few hundred weights. Does that hold on their sine problem, with
``pb.levenberg_marquardt`` against today's JAX first-order optimisers?

Setup: their function-approximation problem: a 1-15-1 network (logistic hidden layer, linear
output, P = 46, weights and biases uniform on [-1, 1], float64) fits y = 1/2 + 1/4 sin(3 pi p)
at 40 evenly spaced points p of [-1, 1]; the goal is a sum of squared errors SSE <= 0.02 (loss
1/2 SSE <= 0.01). Methods, all through ``pb.fit`` on the same residual function from the same
initial parameters per seed: LM with MATLAB trainlm's constants
(``pb.levenberg_marquardt(damping="marquardt", watchdog=None)``: lam0 = 1e-3, x0.1 after a
success, x10 after a failure; monotone, as the paper's); steepest descent (SDBP, ``optax.sgd``
over a learning-rate grid); variable-learning-rate backpropagation with momentum 0.9 (VLBP; Vogl
et al. 1988: a step that raises the SSE by more than 4% is discarded, the rate x0.7 and momentum
suspended; a step that lowers it, rate x1.05); Polak-Ribiere+ conjugate gradients along
``optax.scale_by_zoom_linesearch`` (CGBP, restart every P steps); Adam over a grid and L-BFGS
(``optax.lbfgs``), neither in the paper. A grid's best point (most seeds at the goal, then
fewest median iterations) is reported; time per iteration from the harness's compiled run of
seed 0; time to goal = iterations x that. Every LM trial counts as an iteration (trainlm counts
accepted steps as epochs; both are reported).

Finding (``experiments/run_all.py`` of 2026-12-02, 20 seeds, one CPU core; results/REPORT.md):
LM with trainlm's constants reaches SSE 0.02 on 20/20 seeds in a median 121 trials (60 accepted),
10.6 ms; L-BFGS takes 1.8x that time, nonlinear CG 4.1x and Adam 5.0x; steepest descent and
variable-rate backprop reach it on none of the 20 seeds in 40,000 steps (stuck near SSE 1.05).
The paper's 10-100x counted 1994 MATLAB flops; compiled, the gap in iterations is what remains.

    python experiments/hagan_menhaj.py            # a few minutes on 2 CPU cores
    python experiments/hagan_menhaj.py --quick    # seconds (CI)
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import _harness as h  # first: it sets OpenBLAS's threads before jax loads
import jax
import jax.numpy as jnp
import numpy as np
import optax

import paribus as pb

NAME = "hagan_menhaj"
GOAL_SSE = 0.02
LM = "LM (trainlm)"
COLORS = {
    LM: "tab:blue",
    "SDBP": "tab:gray",
    "VLBP": "tab:olive",
    "CGBP": "tab:green",
    "Adam": "tab:orange",
    "L-BFGS": "tab:purple",
}
PAPER = ("SDBP", "VLBP", "CGBP")  # the methods the paper compared LM with

# (step cap, learning-rate grid) per method; one entry of NaN: no grid.
FULL = {
    LM: (1_000, (math.nan,)),
    "SDBP": (40_000, (0.3, 0.1, 0.03, 0.01)),
    "VLBP": (40_000, (0.1, 0.01)),
    "CGBP": (4_000, (math.nan,)),
    "Adam": (40_000, (3e-2, 1e-2, 3e-3)),
    "L-BFGS": (4_000, (math.nan,)),
}
QUICK = {
    LM: (100, (math.nan,)),
    "SDBP": (300, (0.1,)),
    "VLBP": (300, (0.1,)),
    "CGBP": (100, (math.nan,)),
    "Adam": (300, (1e-2,)),
    "L-BFGS": (100, (math.nan,)),
}


# --- two classic first-order methods, as optax transformations --------------------------------


class VariableLearningRateState(NamedTuple):
    learning_rate: jax.Array
    momentum: jax.Array  # the coefficient in force: 0 right after a discarded step
    velocity: Any  # the last step taken


def variable_learning_rate(
    learning_rate, *, momentum=0.9, increase=1.05, decrease=0.7, max_increase=1.04
) -> optax.GradientTransformationExtraArgs:
    """VLBP (Vogl et al. 1988; Hagan, Demuth & Beale, *Neural Network Design*, ch. 12): trial
    dx = gamma dx_prev - (1 - gamma) alpha g; discarded (alpha x ``decrease``, gamma = 0 next)
    when L(theta + dx) > ``max_increase`` L(theta), else taken (gamma restored, alpha x
    ``increase`` if L went down). Uses the extras ``value`` and ``value_fn`` of ``pb.fit``."""

    def init(params):
        dtype = jax.tree.leaves(params)[0].dtype
        return VariableLearningRateState(
            jnp.asarray(learning_rate, dtype),
            jnp.asarray(momentum, dtype),
            jax.tree.map(jnp.zeros_like, params),
        )

    def update(updates, state, params, *, value, value_fn, **extra):
        del extra
        grad = updates  # what pb.fit hands a first-order method: the gradient
        lr, gamma = state.learning_rate, state.momentum
        step = jax.tree.map(lambda v, g: gamma * v - (1 - gamma) * lr * g, state.velocity, grad)
        trial = value_fn(optax.apply_updates(params, step))
        keep = trial <= max_increase * value  # NaN compares False: discarded
        lr = jnp.where(keep, jnp.where(trial < value, lr * increase, lr), lr * decrease)
        step = jax.tree.map(lambda s: jnp.where(keep, s, 0), step)
        gamma = jnp.where(keep, momentum, 0).astype(gamma.dtype)
        return step, VariableLearningRateState(lr.astype(gamma.dtype), gamma, step)

    return optax.GradientTransformationExtraArgs(init, update)


class PolakRibiereState(NamedTuple):
    count: jax.Array
    grad: Any
    direction: Any


def polak_ribiere(*, restart_every: int) -> optax.GradientTransformationExtraArgs:
    """Nonlinear CG directions, Polak-Ribiere+ (Nocedal & Wright eq. 5.45): d_k = -g_k +
    beta_k d_(k-1), beta_k = max(0, g_k.(g_k - g_(k-1)) / |g_(k-1)|^2); d_k = -g_k at the
    first step, every ``restart_every`` steps and whenever d_k is not a descent direction.
    Chain it with a strong-Wolfe line search, which scales d_k."""

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return PolakRibiereState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(updates, state, params=None, **extra):
        del params, extra
        grad = updates
        prev = optax.tree.vdot(state.grad, state.grad)
        beta = jnp.maximum(0.0, optax.tree.vdot(grad, optax.tree.sub(grad, state.grad)) / prev)
        beta = jnp.where((state.count % restart_every == 0) | ~(prev > 0), 0.0, beta)
        d = jax.tree.map(lambda g, dp: -g + beta * dp, grad, state.direction)
        descent = optax.tree.vdot(d, grad) < 0
        d = jax.tree.map(lambda di, g: jnp.where(descent, di, -g), d, grad)
        return d, PolakRibiereState(state.count + 1, grad, d)

    return optax.GradientTransformationExtraArgs(init, update)


# --- the problem and the methods --------------------------------------------------------------


def problem():
    p = jnp.linspace(-1.0, 1.0, 40)[:, None]
    t = 0.5 + 0.25 * jnp.sin(3 * jnp.pi * p)
    # Small random weights and biases, uniform on [-1, 1], as the backpropagation papers of the
    # time (MATLAB's rands). With LeCun-normal weights and zero biases every hidden unit is
    # centred at p = 0 and LM, CG and L-BFGS stall at SSE ~1.05 from most seeds.
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -1.0, 1.0)  # noqa: E731
    init, apply = pb.nets.mlp([1, 15, 1], "sigmoid", w_init=uniform, b_init=uniform)
    return init, pb.regression_residuals(apply), (p, t)


def optimiser(method: str, lr):
    return {
        # Monotone, as Hagan & Menhaj's (the default's watchdog would be on: float64, R < P).
        LM: lambda: pb.levenberg_marquardt(
            damping="marquardt", damping_bounds=(1e-20, 1e10), watchdog=None
        ),
        "SDBP": lambda: optax.sgd(lr),
        "VLBP": lambda: variable_learning_rate(lr),
        "CGBP": lambda: optax.chain(
            polak_ribiere(restart_every=46),
            optax.scale_by_zoom_linesearch(max_linesearch_steps=20, curv_rtol=0.1),
        ),
        "Adam": lambda: optax.adam(lr),
        "L-BFGS": optax.lbfgs,
    }[method]()


def run_method(method: str, steps: int, grid, seeds: int) -> dict:
    init, residual_fn, batch = problem()
    keys = h.keys(seeds, base=1994)
    target = 0.5 * GOAL_SSE
    runs = h.sweep(
        residual_fn,
        init,
        lambda lr: optimiser(method, lr),
        grid,
        keys,
        batch,
        max_steps=steps,
        target_loss=target,
    )
    its = h.first_at_or_below(runs.losses, target)
    b = h.best_index(its, h.last_finite(runs.losses))
    timing = h.time_fit(
        residual_fn,
        init(keys[0]),
        optimiser(method, grid[b]),
        batch,
        max_steps=steps,
        target_loss=target,
    )
    sse = 2 * runs.losses[b]
    accepted = [
        int(runs.accepted[b, s, 1 : k + 1].sum()) if k >= 0 else -1 for s, k in enumerate(its[b])
    ]
    return dict(
        method=method,
        lr=grid[b],
        steps=steps,
        its=its[b],
        sse=sse,
        accepted=np.asarray(accepted),
        per_step=timing.per_step,
        grid=grid,
        all_its=its,
        stops=runs.stops[b],
    )


def summary(r: dict, seeds: int) -> dict:
    ok = r["its"] >= 0
    k = h.median(r["its"][ok])
    iterations = f"{k:.0f}" if ok.any() else "–"
    if r["method"] == LM and ok.any():
        iterations += f" ({h.median(r['accepted'][ok]):.0f} accepted)"
    return {
        "method": r["method"],
        "learning rate": "–" if math.isnan(r["lr"]) else f"{r['lr']:g}",
        "reached goal": f"{int(ok.sum())}/{seeds}",
        "median iterations": iterations,
        "median time to goal (ms)": k * r["per_step"] * 1e3,
        "time per iteration (us)": r["per_step"] * 1e6,
        "median final SSE": h.median(h.last_finite(r["sse"])),
    }


def against_paper(results: list[dict], seeds: int) -> tuple[str, list[dict]]:
    lm = results[0]
    lm_ok = lm["its"] >= 0
    if not lm_ok.any():
        return f"LM did not reach the goal on any of {seeds} seeds in this run.", []
    lm_t = h.median(lm["its"][lm_ok]) * lm["per_step"]
    rows, parts = [], []
    for r in results[1:]:
        ok = r["its"] >= 0
        if ok.any():
            ratio, bound = h.median(r["its"][ok]) * r["per_step"] / lm_t, ""
        else:  # never reached: at least the step cap's time
            ratio, bound = r["steps"] * r["per_step"] / lm_t, "> "
        rows.append(
            {
                "method": r["method"],
                "reached goal": f"{int(ok.sum())}/{seeds}",
                "time to goal / LM's": f"{bound}{ratio:.3g}",
            }
        )
        if r["method"] in PAPER and bound:
            parts.append(
                f"{r['method']} never reached it (its step cap's time is {ratio:.3g}x LM's)"
            )
        elif r["method"] in PAPER:
            where = "inside" if 10 <= ratio <= 100 else ("above" if ratio > 100 else "below")
            parts.append(f"{r['method']} {ratio:.3g}x ({where} the paper's 10-100x)")
    text = (
        f"LM (trainlm's constants) reached SSE {GOAL_SSE} on {int(lm_ok.sum())}/{seeds} seeds "
        f"in a median {h.median(lm['its'][lm_ok]):.0f} iterations, {lm_t * 1e3:.3g} ms. "
        "Median time to the goal against LM's: " + "; ".join(parts) + ". The paper counted "
        "flops of 1994 MATLAB code; here every loop is compiled, so what carries over is the "
        "gap in iterations, not the cost per iteration."
    )
    return text, rows


def times_figure(results: list[dict], seeds: int):
    """Time to goal per seed (hollow: not reached, drawn at the step cap)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    for i, r in enumerate(results):
        ok = r["its"] >= 0
        t = np.where(ok, r["its"], r["steps"]) * r["per_step"]
        x = i + np.linspace(-0.2, 0.2, len(t))
        ax.scatter(x[ok], t[ok], color=COLORS[r["method"]], s=18)
        ax.scatter(x[~ok], t[~ok], facecolors="none", edgecolors=COLORS[r["method"]], s=18)
        ax.annotate(f"{int(ok.sum())}/{seeds}", (i, t.max() * 1.6), ha="center", fontsize=8)
    ax.set(
        yscale="log",
        ylabel=f"wall-clock to SSE {GOAL_SSE}, seconds",
        title="time to goal per seed (hollow: not reached, at the step cap)",
    )
    ax.set_ylim(top=ax.get_ylim()[1] * 4)
    ax.set_xticks(range(len(results)), [r["method"] for r in results], fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def run(cfg: dict, args, out: h.Output) -> str:
    # Double precision, as MATLAB ran trainlm: in float32 LM's steps fall below the step
    # tolerance at SSE ~1.05 from a few seeds where float64 goes on.
    jax.config.update("jax_enable_x64", True)
    t0 = time.perf_counter()
    results = [
        run_method(m, *cfg[m], args.seeds)
        for m in h.progress(list(cfg), desc=NAME, disable=args.no_progress)
    ]
    out.csv(
        "runs.csv",
        [
            {
                "method": r["method"],
                "lr": r["lr"],
                "seed": s,
                "iterations_to_goal": int(k),
                "accepted_to_goal": int(a),
                "stop_reason": stop,
                "final_sse": float(h.last_finite(r["sse"][s])),
            }
            for r in results
            for s, (k, a, stop) in enumerate(zip(r["its"], r["accepted"], r["stops"], strict=True))
        ],
    )
    series = [
        dict(
            label=r["method"] + ("" if math.isnan(r["lr"]) else f" (lr {r['lr']:g})"),
            color=COLORS[r["method"]],
            steps=np.arange(r["sse"].shape[-1]),
            values=np.minimum(r["sse"], 1e4),
            per_step=r["per_step"],
        )
        for r in results
    ]
    out.figure(
        "sse_curves.png",
        h.curves_figure(
            series,
            ylabel=f"sum of squared errors (goal {GOAL_SSE}, dashed)",
            target=GOAL_SSE,
            title="Hagan & Menhaj (1994): 1-15-1 logistic network, 40 points of a sine",
            xlabel_steps="iteration + 1 (LM: every trial counts)",
        ),
    )
    out.figure("time_to_goal.png", times_figure(results, args.seeds))
    text, ratios = against_paper(results, args.seeds)
    caps = {m: c for m, (c, _) in cfg.items()}
    grids = {m: g for m, (_, g) in cfg.items() if not math.isnan(g[0])}
    return h.report(
        "Hagan & Menhaj (1994), reproduced",
        __doc__,
        name=NAME,
        args=args,
        seconds=time.perf_counter() - t0,
        finding=text,
        body=[
            f"Step caps {caps}; learning-rate grids {grids}.",
            "",
            h.table([summary(r, args.seeds) for r in results]),
            "",
            h.table(ratios),
            "",
            "Ratios are of medians over the seeds that reached the goal (a method that failed "
            "on some is flattered by them); '>' rows never reached it: the bound is the step "
            "cap's time.",
            "",
            "![SSE curves](sse_curves.png)",
            "",
            "![time to goal](time_to_goal.png)",
        ],
    )


if __name__ == "__main__":
    h.exit(h.main(NAME, __doc__, run, full=FULL, quick=QUICK, seeds=20))
