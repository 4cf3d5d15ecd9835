"""Width sweep: where primal Levenberg-Marquardt's P^3 loses and the dual form keeps winning.

Question
    As a network widens from a handful of hidden units to thousands, how do the per-step time and
    the time to a target loss of primal LM (Cholesky of the P x P matrix J^T J + lam I), dual LM
    (Cholesky of the N x N NTK J J^T + lam I), matrix-free CG Gauss-Newton (LM-damped conjugate
    gradients on J^T J + lam I with J v and J^T u products) and Adam change with the number of
    parameters P?

Setup
    One dataset: N = 256 points of y = 1/2 sin(3 pi x) on a grid of x in [-1, 1]; a 1-H-1 tanh
    MLP (P = 3H + 1) for H from 5 to 4,000 (P from 16 to 12,001); float32 (``--x64``: float64);
    the same data, initialisation (LeCun normal, zero biases; one per seed) and
    ``pb.regression_residuals`` residual function for every method; every method trained by
    ``pb.fit``. Target: mean squared error 1e-4 (loss 1/2 ||r||^2 <= 0.0128). LM methods get at
    most 300 trials (Nielsen damping), Adam 4,000 steps at the best of a small learning-rate grid
    (per width, best by median time). Compile time is excluded (each configuration is compiled
    once with ``jit(...).lower().compile()`` and warmed up, then run once per seed). Primal LM
    is run to the target only up to P = 1,600; above that its per-step time is measured on a
    few steps, and above P = 6,500 it is skipped (one Cholesky costs P^3 / 3 flops, and it
    would not finish in a few minutes on 2 cores).

Finding
    The report (results/width_sweep/report.md) holds the numbers of the run that wrote it. A
    default run on the idle 2-core CPU (3 seeds, float32, 122 s, 2026-11-26) gave: primal LM is
    the cheapest step below P ~ 250 (about N = 256) and loses above: its step time grows with a
    fitted slope of 2.4 in P (P^3 predicted once the Cholesky dominates) and is 190x the dual
    step at P = 6,001 (1.1 s against 5.8 ms), while the dual step's slope is 0.7 (P^1 at most,
    at fixed N). Time to target tells the same story up to P = 901 (primal 6.8x slower there).
    Dual LM reaches the target on 3/3 seeds at every width, in 46-77 trials, and is the fastest
    method to the target from P = 901 up (0.84 s at P = 12,001, against 3.4 s for matrix-free
    CG Gauss-Newton, which also gets there everywhere). Adam, 20x cheaper per step, reaches it
    only at P = 31..91 within 4,000 steps.

    Before the dual step was refined (``dual_refine_steps``), float32 dual LM stalled above
    P ~ 3,000 at 2x..4x the target, every trial rejected: the float32 NTK's rounding, about
    eps ||K|| ~ 7e-3 here, is larger than 243 of its 256 eigenvalues, so the bare Cholesky step
    of K + lam I is noise at the small lam the last digits of the fit need (float64 reached the
    target, in 109 trials at P = 3,001). Now, when lam < 10 eps ||K||_F, that Cholesky only
    preconditions CG on the backward-stable products J (J^T alpha).

Run
    python experiments/width_sweep.py [--quick] [--seeds S] [--out DIR] [--no-progress]
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

# XLA's CPU Cholesky and eigh call LAPACK through OpenBLAS, whose worker threads spin when the
# cores are shared: on a busy 2-core machine a 500 x 500 Cholesky took 450 ms with the default
# threads and 2.3 ms with one. Set before jax (and its LAPACK) loads; an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import paribus as pb  # noqa: E402

# pb.fit documents that under jit its stop_reason is an index into pb.STOP_REASONS.
STOP_REASONS = pb.STOP_REASONS
NAME = "width_sweep"
METHODS = ("primal LM", "dual LM", "CG Gauss-Newton", "Adam")
COLORS = {"primal LM": "C3", "dual LM": "C0", "CG Gauss-Newton": "C2", "Adam": "C1"}
SOLVE = {"primal LM": "primal", "dual LM": "dual", "CG Gauss-Newton": "cg"}


def make_data(n: int) -> tuple[jax.Array, jax.Array]:
    xs = jnp.linspace(-1.0, 1.0, n)[:, None]
    return xs, 0.5 * jnp.sin(3 * jnp.pi * xs)


def _compiled(residual_fn, params, batch, make_opt, *, max_steps: int, target: float, lr=None):
    """A compiled ``pb.fit`` taking (params, lr, target_loss), warmed up, and its compile time.

    The first execution of a fresh executable carries a one-off cost (0.06 to 0.3 s measured
    here, more than a whole LM run on a small net); a warm-up call with target_loss = +inf
    stops before the first step and pays it outside the timings.
    """

    def run(p, lr, target_loss):
        return pb.fit(
            residual_fn, p, make_opt(lr), batch, max_steps=max_steps, target_loss=target_loss
        )

    lr = jnp.asarray(0.0 if lr is None else lr)
    t0 = time.perf_counter()
    exe = jax.jit(run).lower(params, lr, jnp.asarray(target)).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(exe(params, lr, jnp.asarray(jnp.inf)))
    target = jnp.asarray(target)
    return (lambda p, lr: exe(p, lr, target)), compile_s


def _time_run(exe, params, lr) -> tuple[object, float]:
    t0 = time.perf_counter()
    result = jax.block_until_ready(exe(params, jnp.asarray(lr)))
    return result, time.perf_counter() - t0


def run_width(width: int, cfg: dict, seeds: int) -> list[dict]:
    """Every method at one width, one row per (method, seed[, learning rate])."""
    batch = make_data(cfg["n"])
    init, apply = pb.nets.mlp([1, width, 1], "tanh")
    residual_fn = pb.regression_residuals(apply)
    inits = [init(jax.random.key(s)) for s in range(seeds)]
    p = 3 * width + 1
    rows = []
    for method in METHODS:
        base = {"method": method, "H": width, "P": p, "N": cfg["n"]}
        if method == "Adam":
            exe, compile_s = _compiled(
                residual_fn, inits[0], batch, optax.adam,
                max_steps=cfg["adam_steps"], target=cfg["target"], lr=0.01,
            )  # fmt: skip
            lrs = cfg["adam_lrs"]
        else:
            if method == "primal LM" and p > cfg["primal_max_p"]:
                flops = p**3 / 3
                note = f"skipped: one Cholesky is P^3/3 = {flops:.1e} flops"
                rows.append({**base, "seed": -1, "status": note})
                continue
            ttt = not (method == "primal LM" and p > cfg["primal_ttt_max_p"])
            solve = SOLVE[method]
            exe, compile_s = _compiled(
                residual_fn, inits[0], batch,
                lambda lr, solve=solve: pb.levenberg_marquardt(solve=solve),
                max_steps=cfg["lm_steps"] if ttt else cfg["short_steps"],
                target=cfg["target"] if ttt else -1.0,
            )  # fmt: skip
            lrs = [float("nan")]
        for lr in lrs:
            for seed, params in enumerate(inits):
                if method == "primal LM" and not ttt and seed > 0:
                    continue  # per-step time only: one seed is enough
                result, run_s = _time_run(exe, params, 0.0 if math.isnan(lr) else lr)
                steps = int(result.steps)
                loss = np.asarray(result.history.loss)
                final = float(loss[steps])
                reached = bool(final <= cfg["target"])
                is_ttt = method != "primal LM" or ttt
                rows.append(
                    {
                        **base,
                        "seed": seed,
                        "lr": lr,
                        "status": "ok" if is_ttt else "per-step only",
                        "compile_s": compile_s,
                        "run_s": run_s,
                        "steps": steps,
                        "step_s": run_s / max(steps, 1),
                        "final_loss": final,
                        "reached": reached and is_ttt,
                        "time_to_target_s": run_s if reached and is_ttt else float("nan"),
                        "stop_reason": STOP_REASONS[int(result.stop_reason)],
                        "curve": loss[: steps + 1],
                    }
                )
    return rows


def best_adam(rows: list[dict]) -> list[dict]:
    """Per width, keep the Adam rows of the learning rate with the best median time to target
    (ties, including never reaching it, broken by the median final loss)."""
    keep = [r for r in rows if r["method"] != "Adam"]
    for width in sorted({r["H"] for r in rows}):
        adam = [r for r in rows if r["method"] == "Adam" and r["H"] == width]
        by_lr = {}
        for r in adam:
            by_lr.setdefault(r["lr"], []).append(r)

        def score(group):
            t = [r["time_to_target_s"] for r in group]
            t = [x if not math.isnan(x) else math.inf for x in t]
            return (float(np.median(t)), float(np.median([r["final_loss"] for r in group])))

        if by_lr:
            keep += by_lr[min(by_lr, key=lambda lr: score(by_lr[lr]))]
    return keep


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (method, width): medians over seeds."""
    out = []
    for method in METHODS:
        for width in sorted({r["H"] for r in rows}):
            group = [r for r in rows if r["method"] == method and r["H"] == width]
            if not group:
                continue
            ok = [r for r in group if "step_s" in r]
            if not ok:
                out.append({"method": method, "H": width, "P": group[0]["P"],
                            "status": group[0]["status"]})  # fmt: skip
                continue
            reached = [r for r in ok if r["reached"]]
            ttt = [r["time_to_target_s"] for r in reached]
            out.append(
                {
                    "method": method,
                    "H": width,
                    "P": ok[0]["P"],
                    "status": ok[0]["status"],
                    "lr": ok[0]["lr"] if method == "Adam" else "",
                    "step_ms (median)": 1e3 * float(np.median([r["step_s"] for r in ok])),
                    "reached": f"{len(reached)}/{len(ok)}" if ok[0]["status"] == "ok" else "",
                    "steps to target (median)": (
                        float(np.median([r["steps"] for r in reached])) if reached else ""
                    ),
                    "time to target s (median)": float(np.median(ttt)) if ttt else "",
                    "final loss (median)": float(np.median([r["final_loss"] for r in ok])),
                    "compile_s": ok[0]["compile_s"],
                }
            )
    return out


def crossover(
    summary: list[dict], a: str, b: str, key: str, *, tie: float = 1.3
) -> tuple[float | None, str]:
    """The P where method a's ``key`` crosses method b's (log-log interpolation).

    Ratios within a factor ``tie`` of 1 count as ties (single timings on a shared machine
    wander by that much), so a crossing between two tied points is not reported.
    """
    ta = {r["P"]: r[key] for r in summary if r["method"] == a and isinstance(r.get(key), float)}
    tb = {r["P"]: r[key] for r in summary if r["method"] == b and isinstance(r.get(key), float)}
    ps = sorted(set(ta) & set(tb))
    if len(ps) < 2:
        return None, f"{a} vs {b} ({key}): fewer than two common widths"
    lr = [math.log(ta[p] / tb[p]) for p in ps]
    clear = [(p, r) for p, r in zip(ps, lr, strict=True) if abs(r) > math.log(tie)]
    for (p0, r0), (p1, r1) in zip(clear, clear[1:], strict=False):
        if (r0 < 0) != (r1 < 0):
            pc = math.exp(math.log(p0) + r0 / (r0 - r1) * (math.log(p1) - math.log(p0)))
            first, second = (a, b) if r0 < 0 else (b, a)
            return pc, (
                f"{first} is faster than {second} ({key}) up to P ~ {pc:,.0f}, slower above "
                f"({a}/{b} = {math.exp(r0):.2g} at P={p0:,}, {math.exp(r1):.2g} at P={p1:,}; "
                f"{math.exp(lr[-1]):.2g} at P={ps[-1]:,})"
            )
    span = f"P = {ps[0]:,}..{ps[-1]:,}"
    rng = f"ratio {a}/{b} {math.exp(min(lr)):.2g}..{math.exp(max(lr)):.2g}"
    if not clear:
        return None, f"{a} and {b} ({key}) tie within {tie}x over {span} ({rng})"
    faster = a if clear[-1][1] < 0 else b
    return None, (
        f"{faster} is faster ({key}) wherever {a} and {b} differ by more than {tie}x "
        f"over {span} ({rng})"
    )


def _slope(summary: list[dict], method: str, key: str, p_min: float) -> float | None:
    pts = [
        (r["P"], r[key])
        for r in summary
        if r["method"] == method and isinstance(r.get(key), float) and r["P"] >= p_min
    ]
    if len(pts) < 2:
        return None
    x, y = np.log([p for p, _ in pts]), np.log([t for _, t in pts])
    return float(np.polyfit(x, y, 1)[0])


def plot(summary: list[dict], rows: list[dict], cfg: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.4))
    for ax in axes:  # log scales first, so the limits read below are the final ones
        ax.set_xscale("log")
        ax.set_yscale("log")
    ps = sorted({r["P"] for r in summary})
    for method in METHODS:
        s = [r for r in summary if r["method"] == method and "step_ms (median)" in r]
        if s:
            axes[0].plot([r["P"] for r in s], [r["step_ms (median)"] for r in s], "o-",
                         color=COLORS[method], label=method)  # fmt: skip
        for ax, key in ((axes[1], "time_to_target_s"), (axes[2], "steps")):
            by_p = {}
            for r in rows:
                if r["method"] == method and r.get("reached"):
                    by_p.setdefault(r["P"], []).append(r[key])
            if by_p:
                xp = sorted(by_p)
                med = np.array([np.median(by_p[p]) for p in xp])
                lo = med - np.array([min(by_p[p]) for p in xp])
                hi = np.array([max(by_p[p]) for p in xp]) - med
                ax.errorbar(xp, med, yerr=[lo, hi], fmt="o-", color=COLORS[method],
                            capsize=3, label=method)  # fmt: skip
    # Second pass, once the data have set the axes: mark the widths where no seed of a method
    # reached the target with an x on the top edge.
    for ax in axes[1:]:
        top = ax.get_ylim()[1]
        for method in METHODS:
            tried = {r["P"] for r in rows if r["method"] == method and r.get("status") == "ok"}
            hit = {r["P"] for r in rows if r["method"] == method and r.get("reached")}
            missed = sorted(tried - hit)
            if missed:
                ax.plot(missed, [top] * len(missed), "x", color=COLORS[method], ms=10, mew=2,
                        clip_on=False, label=f"{method}: not reached")  # fmt: skip
        ax.set_ylim(top=top)
    # Reference slopes through the middle primal and dual points.
    for method, power, style in (("primal LM", 3, ":"), ("dual LM", 1, "--")):
        s = [r for r in summary if r["method"] == method and "step_ms (median)" in r]
        if len(s) >= 2:
            p0, t0 = s[len(s) // 2]["P"], s[len(s) // 2]["step_ms (median)"]
            xs = np.array([ps[0], ps[-1]], float)
            axes[0].plot(xs, t0 * (xs / p0) ** power, style, color="gray", lw=1,
                         label=f"slope P^{power}")  # fmt: skip
    for ax in axes:
        ax.axvline(cfg["n"], color="k", lw=0.8, ls="-.", label=f"P = N = {cfg['n']}")
    titles = ("time per step (median over seeds)", "time to target (median, bars: min..max)",
              "steps to target (LM: trials, rejected ones included)")  # fmt: skip
    ylabels = ("ms per step (compile excluded)", "seconds (compile excluded)", "steps")
    for ax, title, ylabel in zip(axes, titles, ylabels, strict=True):
        ax.set_xticks(ps, [f"{p:,}" for p in ps], fontsize=8, rotation=40)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("P (parameters), 1-H-1 tanh MLP")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Width sweep: N = {cfg['n']} points, target MSE {cfg['target_mse']:g}, {cfg['dtype']}, "
        f"{jax.devices()[0].platform}"
    )
    fig.tight_layout()
    _common.save_figure(fig, path)


def plot_curves(rows: list[dict], path: Path) -> None:
    """Loss against wall-clock for seed 0 at a few widths."""
    import matplotlib.pyplot as plt

    widths = sorted({r["H"] for r in rows})
    show = sorted({widths[0], widths[len(widths) // 2], widths[-1]})
    fig, axes = plt.subplots(1, len(show), figsize=(6 * len(show), 4.5), squeeze=False)
    for ax, width in zip(axes[0], show, strict=True):
        for method in METHODS:
            r = [x for x in rows if x["method"] == method and x["H"] == width
                 and x.get("seed") == 0 and "curve" in x]  # fmt: skip
            if not r:
                continue
            curve = r[0]["curve"]
            # Steps spread evenly over the measured run; the initial loss at the first step's time.
            t = np.linspace(0, r[0]["run_s"], len(curve))
            t[0] = t[1] if len(t) > 1 else r[0]["run_s"]
            ax.plot(t, curve, color=COLORS[method], label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("wall-clock s (steps spread evenly over the run)")
        ax.set_ylabel("loss 1/2 ||r||^2")
        ax.set_title(f"H = {width} (P = {3 * width + 1:,}), seed 0")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = _common.parser(NAME, __doc__, seeds=3)
    parser.add_argument("--x64", action="store_true", help="run in float64 (default float32)")
    args = parser.parse_args(argv)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    dtype = "float64" if args.x64 else "float32"
    _common.use_agg()
    t_start = time.perf_counter()
    if args.quick:
        cfg = {"n": 64, "widths": (5, 50), "lm_steps": 60, "adam_steps": 300,
               "adam_lrs": (1e-2,), "short_steps": 3, "primal_ttt_max_p": 1600,
               "primal_max_p": 6500}  # fmt: skip
    else:
        cfg = {"n": 256, "widths": (5, 10, 30, 100, 300, 1000, 2000, 4000), "lm_steps": 300,
               "adam_steps": 4000, "adam_lrs": (3e-3, 1e-2, 3e-2), "short_steps": 4,
               "primal_ttt_max_p": 1600, "primal_max_p": 6500}  # fmt: skip
    cfg["target_mse"] = 1e-4
    cfg["dtype"] = dtype
    cfg["target"] = 0.5 * cfg["n"] * cfg["target_mse"]

    rows = []
    for width in _common.progress(cfg["widths"], desc="widths", disable=args.no_progress):
        rows += run_width(width, cfg, args.seeds)
    all_rows = rows
    rows = best_adam(rows)
    summary = summarise(rows)

    out: Path = args.out
    plot(summary, rows, cfg, out / "width_sweep.png")
    plot_curves(rows, out / "curves.png")
    csv_rows = [{k: v for k, v in r.items() if k != "curve"} for r in all_rows]
    _common.write_csv(out / f"{NAME}.csv", csv_rows)

    key = "step_ms (median)"
    cross_step = crossover(summary, "primal LM", "dual LM", key)[1]
    cross_ttt = crossover(summary, "primal LM", "dual LM", "time to target s (median)")[1]
    cross_cg = crossover(summary, "dual LM", "CG Gauss-Newton", key)[1]
    cross_adam = crossover(summary, "dual LM", "Adam", "time to target s (median)")[1]
    slope_primal = _slope(summary, "primal LM", key, cfg["n"])
    slope_dual = _slope(summary, "dual LM", key, cfg["n"])
    elapsed = time.perf_counter() - t_start

    def fmt_slope(s):
        return "n/a" if s is None else f"{s:.2f}"

    big = max(r["P"] for r in summary)
    at_big = {r["method"]: r for r in summary if r["P"] == big}
    lines = [
        f"per-step time: {cross_step}",
        f"time to target: {cross_ttt}",
        f"dual LM vs CG Gauss-Newton per step: {cross_cg}",
        f"dual LM vs Adam, time to target: {cross_adam}",
        f"fitted log-log slope of per-step time against P for P >= N: primal "
        f"{fmt_slope(slope_primal)}, dual {fmt_slope(slope_dual)} (P^3 and P^1 predicted "
        f"once the Cholesky, resp. the J-sized products, dominate)",
    ]
    for m in METHODS:
        r = at_big.get(m, {})
        if "step_ms (median)" in r:
            ttt = r["time to target s (median)"]
            lines.append(
                f"at the largest width (P = {big:,}): {m} {r['step_ms (median)']:.3g} ms/step, "
                f"reached {r['reached'] or 'n/a'}, time to target "
                + (f"{ttt:.3g} s" if isinstance(ttt, float) else "n/a")
            )
        elif r:
            lines.append(f"at the largest width (P = {big:,}): {m} {r['status']}")
    finding = "".join(f"- {x}\n" for x in lines)
    cols = ["method", "H", "P", "status", "lr", "step_ms (median)", "reached",
            "steps to target (median)", "time to target s (median)", "final loss (median)",
            "compile_s"]  # fmt: skip
    report = f"""# Width sweep

{__doc__.split("Finding")[0].strip()}

## FINDING (computed by this run)

{finding}
Run time: {elapsed:.0f} s ({"--quick" if args.quick else "default settings"}, {args.seeds}
seeds, {dtype}, device {jax.devices()[0].platform}, {len(cfg["widths"])} widths). Timings on a
shared machine are noisy: compare ratios within this run.

## Summary (medians over seeds; Adam at its best learning rate per width)

{_common.markdown_table(summary, cols)}

![width sweep](width_sweep.png)

Loss against wall-clock, seed 0 (the steps of each run are spread evenly over its measured
time):

![curves](curves.png)

The CSV `{NAME}.csv` holds every run (every seed and every Adam learning rate).
"""
    _common.write_text(out / "report.md", report)
    print(f"{NAME}: wrote {out}/report.md in {elapsed:.0f} s")
    print(finding)


if __name__ == "__main__":
    main()
