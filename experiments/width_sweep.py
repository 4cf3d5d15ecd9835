"""Width sweep: where primal Levenberg-Marquardt's P^3 loses and the dual form keeps winning.

Question: as a network widens from a handful of hidden units to thousands, how do the time per
step and the time to a target loss of primal LM (Cholesky of the P x P matrix J^T J + lam I),
dual LM (Cholesky of the N x N kernel J J^T + lam I), matrix-free LM (conjugate gradients on
J^T J + lam I with J v and J^T u products) and Adam change with the number of parameters P?

Setup: N = 256 points of y = 1/2 sin(3 pi x) on a grid of [-1, 1]; a 1-H-1 tanh MLP (P = 3 H + 1)
for H from 5 to 4,000 (P from 16 to 12,001); float32 (``--x64``: float64); the same data,
initialisation (LeCun normal, one per seed) and ``pb.regression_residuals`` function for every
method, each trained by ``pb.fit``. Target: mean squared error 1e-4 (L = 1/2 ||r||^2 <= 0.0128).
LM methods get at most 300 trials (Nielsen damping), Adam 4,000 steps at the best of a small
learning-rate grid (per width, by median time to target). Timings: the harness's compiled
``pb.fit`` (compile excluded). Primal LM runs to the target only up to P = 1,600; above that its
time per step is measured on a few steps, and above P = 6,500 it is skipped (one Cholesky is
P^3 / 3 flops).

Finding (``experiments/run_all.py`` of 2026-12-02, 3 seeds, float32, one CPU core;
results/REPORT.md): primal LM's P^3 takes over past P ~ N: primal is faster per step at
P = 91, within 1.3x at 301, 11x slower than dual at 901 and 320x at P = 6,001 (fitted slopes
of time per step against P: primal 3.0, dual 1.2); dual and matrix-free CG LM reach the target
on 3/3 seeds at every width from P = 301 to 12,001 (10.9 s and 13.7 s at P = 12,001), Adam in
4,000 steps only at P = 91-301 (below P = 91 every method stalls above the target on most
seeds).

    python experiments/width_sweep.py            # a few minutes on 2 CPU cores
    python experiments/width_sweep.py --quick    # seconds (CI)
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import _harness as h  # first: it sets OpenBLAS's threads before jax loads
import jax
import jax.numpy as jnp
import numpy as np
import optax

import paribus as pb

NAME = "width_sweep"
SOLVE = {"primal LM": "primal", "dual LM": "dual", "CG LM": "cg"}
METHODS = (*SOLVE, "Adam")
COLORS = {"primal LM": "C3", "dual LM": "C0", "CG LM": "C2", "Adam": "C1"}
MSE_TARGET = 1e-4


class Config(NamedTuple):
    n: int
    widths: tuple[int, ...]
    lm_steps: int
    adam_steps: int
    adam_rates: tuple[float, ...]
    primal_to_target_max_p: int  # above: primal LM's time per step only, on a few steps
    primal_max_p: int  # above: primal LM skipped


FULL = Config(
    256, (5, 10, 30, 100, 300, 1000, 2000, 4000), 300, 4000, (3e-3, 1e-2, 3e-2), 1600, 6500
)
QUICK = Config(64, (5, 50), 60, 300, (1e-2,), 1600, 6500)


def one_run(method, width, seed, params, lr, problem, cfg: Config) -> dict:
    residual_fn, batch, target = problem
    p = 3 * width + 1
    to_target = not (method == "primal LM" and p > cfg.primal_to_target_max_p)
    kw = {"target_loss": target if to_target else None}
    if method == "Adam":
        opt, state_at = h.with_rate(optax.adam)
        kw["state"], steps = state_at(params, lr), cfg.adam_steps
    else:
        opt, steps = pb.levenberg_marquardt(solve=SOLVE[method]), cfg.lm_steps if to_target else 4
    t = h.time_fit(residual_fn, params, opt, batch, max_steps=steps, **kw)
    final = float(t.result.history.loss[-1])
    reached = to_target and final <= target
    return {
        "method": method,
        "H": width,
        "P": p,
        "seed": seed,
        "lr": lr,
        "status": "to target" if to_target else "time per step only",
        "steps": int(t.result.steps),
        "step_ms": 1e3 * t.per_step,
        "compile_s": t.compile_s,
        "final_loss": final,
        "reached": reached,
        "time_to_target_s": t.per_step * int(t.result.steps) if reached else math.nan,
        "stop_reason": t.result.stop_reason.name,
        "curve": np.asarray(t.result.history.loss),
    }


def run_width(width: int, cfg: Config, seeds: int) -> list[dict]:
    xs = jnp.linspace(-1.0, 1.0, cfg.n)[:, None]
    init, apply = pb.nets.mlp([1, width, 1], "tanh")
    problem = (
        pb.regression_residuals(apply),
        (xs, 0.5 * jnp.sin(3 * jnp.pi * xs)),
        0.5 * cfg.n * MSE_TARGET,
    )
    inits = [init(k) for k in h.keys(seeds)]
    rows = []
    for method in METHODS:
        if method == "primal LM" and 3 * width + 1 > cfg.primal_max_p:
            continue
        for lr in cfg.adam_rates if method == "Adam" else (None,):
            for seed, params in enumerate(inits):
                if method == "primal LM" and 3 * width + 1 > cfg.primal_to_target_max_p and seed:
                    continue  # time per step only: one seed is enough
                rows.append(one_run(method, width, seed, params, lr, problem, cfg))
    return rows


def best_adam(rows: list[dict]) -> list[dict]:
    """Per width, Adam's rows at the rate with the best median time to target (then loss)."""
    keep = [r for r in rows if r["method"] != "Adam"]
    for width in sorted({r["H"] for r in rows}):
        adam = [r for r in rows if (r["method"], r["H"]) == ("Adam", width)]

        def score(lr, adam=adam):
            g = [r for r in adam if r["lr"] == lr]
            t = [r["time_to_target_s"] if r["reached"] else math.inf for r in g]
            return float(np.median(t)), h.median([r["final_loss"] for r in g])

        best = min({r["lr"] for r in adam}, key=score)
        keep += [r for r in adam if r["lr"] == best]
    return keep


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for method in METHODS:
        for width in sorted({r["H"] for r in rows}):
            g = [r for r in rows if (r["method"], r["H"]) == (method, width)]
            if not g:
                continue
            reached = [r for r in g if r["reached"]]
            out.append(
                {
                    "method": method,
                    "H": width,
                    "P": g[0]["P"],
                    "status": g[0]["status"],
                    "lr": g[0]["lr"] or "",
                    "ms / step": h.median([r["step_ms"] for r in g]),
                    "reached": f"{len(reached)}/{len(g)}",
                    "steps to target": h.median([r["steps"] for r in reached]),
                    "s to target": h.median([r["time_to_target_s"] for r in reached]),
                    "final loss": h.median([r["final_loss"] for r in g]),
                    "compile s": g[0]["compile_s"],
                }
            )
    return out


def slope(table: list[dict], method: str, p_min: float) -> float:
    """The fitted log-log slope of time per step against P, for P >= p_min."""
    pts = [(r["P"], r["ms / step"]) for r in table if r["method"] == method and r["P"] >= p_min]
    if len(pts) < 2:
        return math.nan
    return float(np.polyfit(*np.log(np.asarray(pts).T), 1)[0])


def crossover(table: list[dict], a: str, b: str, key: str) -> str:
    """Where method a's ``key`` stops being below method b's (ratios within 1.3x: ties)."""
    ta = {r["P"]: r[key] for r in table if r["method"] == a and np.isfinite(r[key])}
    tb = {r["P"]: r[key] for r in table if r["method"] == b and np.isfinite(r[key])}
    ps = sorted(set(ta) & set(tb))
    if len(ps) < 2:
        return f"{a} vs {b} ({key}): fewer than two common widths"
    ratios = {p: ta[p] / tb[p] for p in ps}
    clear = [(p, q) for p, q in ratios.items() if abs(math.log(q)) > math.log(1.3)]
    for (p0, q0), (p1, q1) in zip(clear, clear[1:], strict=False):
        if (q0 < 1) != (q1 < 1):
            faster, slower = (a, b) if q0 < 1 else (b, a)
            return (
                f"{faster} is faster than {slower} ({key}) up to P between {p0:,} and "
                f"{p1:,} ({a}/{b} = {q0:.2g} there, {q1:.2g} after; {ratios[ps[-1]]:.2g} at "
                f"P = {ps[-1]:,})"
            )
    span = f"{min(ratios.values()):.2g}..{max(ratios.values()):.2g}"
    return f"no crossover of {a} and {b} ({key}) over P = {ps[0]:,}..{ps[-1]:,} (ratio {span})"


def figure(table: list[dict], cfg: Config):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    for method in METHODS:
        g = [r for r in table if r["method"] == method]
        for ax, key in zip(axes, ("ms / step", "s to target", "steps to target"), strict=True):
            pts = [(r["P"], r[key]) for r in g if np.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=COLORS[method], label=method)
    for ax, title in zip(
        axes,
        (
            "time per step (median over seeds)",
            "time to target (median)",
            "steps to target (LM: every trial)",
        ),
        strict=True,
    ):
        ax.axvline(cfg.n, color="k", lw=0.8, ls="-.", label=f"P = N = {cfg.n}")
        ax.set(xscale="log", yscale="log", xlabel="P (1-H-1 tanh MLP)", title=title)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("ms (compile excluded)")
    axes[1].set_ylabel("seconds")
    fig.suptitle(f"Width sweep: N = {cfg.n}, target MSE {MSE_TARGET:g}, {jnp.zeros(()).dtype}")
    fig.tight_layout()
    return fig


def finding(table: list[dict], cfg: Config) -> str:
    big = max(r["P"] for r in table)
    at_big = [r for r in table if r["P"] == big]
    lines = [
        crossover(table, "primal LM", "dual LM", "ms / step"),
        crossover(table, "primal LM", "dual LM", "s to target"),
        crossover(table, "dual LM", "CG LM", "s to target"),
        crossover(table, "dual LM", "Adam", "s to target"),
        f"fitted slope of time per step against P for P >= N: primal "
        f"{slope(table, 'primal LM', cfg.n):.2g}, dual {slope(table, 'dual LM', cfg.n):.2g} "
        "(P^3 and at most P^1 predicted once the Cholesky, resp. the J-sized products, dominate)",
        f"at P = {big:,}: "
        + "; ".join(
            f"{r['method']} {r['ms / step']:.3g} ms per step, reached {r['reached']}, "
            f"{h.fmt(r['s to target'])} s to target"
            for r in at_big
        ),
    ]
    return "\n".join(f"- {line}" for line in lines)


def run(cfg: Config, args, out: h.Output) -> str:
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    t0 = time.perf_counter()
    rows = [
        r
        for width in h.progress(cfg.widths, desc=NAME, disable=args.no_progress)
        for r in run_width(width, cfg, args.seeds)
    ]
    shown = best_adam(rows)
    table = summary(shown)
    out.csv("runs.csv", [{k: v for k, v in r.items() if k != "curve"} for r in rows])
    out.figure("width_sweep.png", figure(table, cfg))
    body = [
        h.table(table),
        "",
        "![width sweep](width_sweep.png)",
        "",
        "`runs.csv` holds every run (every seed and every Adam rate).",
    ]
    return h.report(
        "Width sweep",
        __doc__,
        name=NAME,
        args=args,
        seconds=time.perf_counter() - t0,
        finding=finding(table, cfg),
        body=body,
    )


def flags(p) -> None:
    p.add_argument("--x64", action="store_true", help="run in float64 (default float32)")


if __name__ == "__main__":
    h.exit(h.main(NAME, __doc__, run, full=FULL, quick=QUICK, seeds=3, extra=flags))
