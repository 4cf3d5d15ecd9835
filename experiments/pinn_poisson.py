"""A physics-informed network for the Poisson equation: Gauss-Newton against Adam.

Question: a physics-informed neural network (PINN) is a least-squares problem whose residuals
contain second derivatives of the network with respect to its input. How accurate a solution do
Gauss-Newton-type updates (Levenberg-Marquardt; Gauss-Newton with a line search, which is
Mueller & Zeinhofer's "energy natural gradient descent", ENGD, for this linear PDE) reach,
against Adam, in the same wall-clock time? Mueller & Zeinhofer (ICML 2023) report relative L2
errors of 1e-6 to 1e-8 for ENGD against 1e-3 to 1e-4 for first-order methods.

Setup: -Laplace(u) = f on the unit square, u = 0 on its boundary, with f = 2 pi^2 sin(pi x)
sin(pi y) and exact solution u* = sin(pi x) sin(pi y). The network u_theta is a 2-H-1 tanh MLP
(``pb.nets.mlp``, LeCun-normal initialisation, float64). Residuals: at n x n interior
collocation points (cell midpoints of a uniform grid), r_i = (-Laplace u_theta(x_i) - f(x_i)) /
sqrt(N_int), with the Laplacian the trace of the input Hessian by ``jax.jvp`` of ``jax.jvp``;
at 4 n evenly spaced boundary points, r_b = u_theta(x_b) / sqrt(N_bnd); loss L = 1/2 ||r||^2
(the mean-square PDE residual plus the mean-square boundary residual, halved). One
``pb.per_example`` residual function (an example is a point, a 0/1 boundary flag and its
weight) so that the Jacobian rows come from per-example reverse mode. Every method runs
``pb.fit`` from the same initial parameters (one per seed) on the same residuals:

- "LM": ``pb.levenberg_marquardt()`` (Nielsen damping, primal Cholesky solve);
- "GN + line search (ENGD)": ``pb.gauss_newton()`` (the minimum-norm step -J^+ r) followed by
  a grid line search over eta in {1, 1/2, ..., 2^-19} on the loss (the step is dropped when no
  eta decreases the loss), written here as an optax transformation around the public solver;
- "Adam": ``optax.adam`` over a small learning-rate grid on seed 0; the rate with the lowest
  final error then runs on the other seeds (all runs are in the CSV).

Each method runs to its step cap (or until ``pb.fit`` stops it); "equal wall-clock" compares
every method's error at the time ENGD needed to finish. The relative L2 error
||u_theta - u*|| / ||u*|| on a 101 x 101 grid over the closed square is recorded along the way
by a probe inside the optimiser (timestamps from the host as the jitted loop runs: compile time
is not in them; the probe's own cost, measured apart, is subtracted).

Finding (default run, 3 seeds, H = 32, n = 30: P = 129 parameters, 1,020 residuals): see the
report (``results/pinn_poisson/report.md``), which quotes the measured numbers; they are also in
the README.

    python experiments/pinn_poisson.py            # a few minutes on 2 CPU cores
    python experiments/pinn_poisson.py --quick    # seconds (CI)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

# XLA's CPU Cholesky and eigh call LAPACK through OpenBLAS, whose worker threads spin when the
# cores are shared: on a busy 2-core machine a 129 x 129 Cholesky took 300 ms with the default
# threads (0.1 ms when idle). One thread; set before jax loads, an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax

jax.config.update("jax_enable_x64", True)  # PINN accuracy below 1e-6 needs float64

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import paribus as pb  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

NAME = "pinn_poisson"
COLORS = {"LM": "tab:blue", "GN + line search (ENGD)": "tab:purple", "Adam": "tab:orange"}


class Config(NamedTuple):
    width: int  # hidden width H
    n: int  # interior points per axis; 4 n boundary points
    lm_steps: int  # step cap of LM
    engd_steps: int  # step cap of GN + line search
    solver_probe_every: int
    adam_steps: int  # step cap of Adam (the time budget usually ends it first)
    adam_probe_every: int
    adam_rates: tuple[float, ...]
    n_test: int  # test grid points per axis


FULL = Config(32, 30, 200, 100, 2, 20_000, 200, (1e-3, 3e-3, 1e-2), 101)
QUICK = Config(8, 8, 10, 10, 2, 100, 50, (1e-2,), 21)


# ------------------------------------------------------------------------------- the problem


def exact(x: jax.Array) -> jax.Array:
    """u*(x) = sin(pi x_0) sin(pi x_1); x (..., 2)."""
    return jnp.sin(jnp.pi * x[..., 0]) * jnp.sin(jnp.pi * x[..., 1])


def source(x: jax.Array) -> jax.Array:
    """f = -Laplace u* = 2 pi^2 u*."""
    return 2 * jnp.pi**2 * exact(x)


def laplacian(u, x: jax.Array) -> jax.Array:
    """sum_k d^2 u / dx_k^2 at one point x (d,): one forward-over-forward product per axis."""

    def second(e):
        first = lambda y: jax.jvp(u, (y,), (e,))[1]  # noqa: E731
        return jax.jvp(first, (x,), (e,))[1]

    return sum(second(e) for e in jnp.eye(x.shape[0], dtype=x.dtype))


def make_residual_fn(apply):
    """The PINN residual of one example (x (2,), boundary flag (), weight ()) -> (1,)."""

    def example_fn(params, example):
        x, on_boundary, weight = example
        u = lambda y: apply(params, y)[0]  # noqa: E731
        pde = -laplacian(u, x) - source(x)
        return (weight * jnp.where(on_boundary, u(x), pde))[None]

    return pb.per_example(example_fn)


def collocation(n: int):
    """Interior cell midpoints (n^2) and 4 n boundary points, with flags and weights."""
    g = (jnp.arange(n) + 0.5) / n
    gx, gy = jnp.meshgrid(g, g)
    interior = jnp.stack([gx.ravel(), gy.ravel()], axis=1)
    t = jnp.arange(n) / n
    zero, one = jnp.zeros(n), jnp.ones(n)
    boundary = jnp.concatenate(
        [
            jnp.stack([t, zero], 1),
            jnp.stack([one, t], 1),
            jnp.stack([1 - t, one], 1),
            jnp.stack([zero, 1 - t], 1),
        ]
    )
    xs = jnp.concatenate([interior, boundary])
    flags = jnp.concatenate([jnp.zeros(n * n, bool), jnp.ones(4 * n, bool)])
    weights = jnp.concatenate(
        [jnp.full(n * n, 1 / np.sqrt(n * n)), jnp.full(4 * n, 1 / np.sqrt(4 * n))]
    )
    return xs, flags, weights


def relative_error_fn(apply, n_test: int):
    """params -> ||u_theta - u*|| / ||u*|| on an n_test x n_test grid over [0, 1]^2."""
    g = jnp.linspace(0.0, 1.0, n_test)
    gx, gy = jnp.meshgrid(g, g)
    xt = jnp.stack([gx.ravel(), gy.ravel()], axis=1)
    u_star = exact(xt)
    norm = jnp.linalg.norm(u_star)

    def rel_err(params):
        u = jax.vmap(apply, (None, 0))(params, xt)[:, 0]
        return jnp.linalg.norm(u - u_star) / norm

    return rel_err


# ------------------------------------------------------------------- optimisers and the probe


class LineSearchState(NamedTuple):
    inner: Any
    eta: jax.Array  # the step size taken last (0: dropped)


def with_grid_line_search(opt, *, n_grid: int = 20) -> optax.GradientTransformationExtraArgs:
    """Scale the direction d of ``opt`` by the eta in {1, 1/2, ..., 2^-(n_grid-1)} with the
    lowest loss 1/2 ||r(theta + eta d)||^2 (ENGD's line search); no step when none decreases it.

    All trial losses are one batched evaluation (``vmap`` over eta): one pass over the
    collocation points instead of n_grid sequential ones.
    """
    etas = 0.5 ** np.arange(n_grid)

    def init(params):
        return LineSearchState(opt.init(params), jnp.zeros((), ravel_dtype(params)))

    def update(updates, state, params=None, *, residual_fn=None, batch=None, **extra):
        direction, inner = opt.update(
            updates, state.inner, params, residual_fn=residual_fn, batch=batch, **extra
        )
        value = pb.loss(residual_fn, params, batch)

        def trial(eta):
            return pb.loss(residual_fn, optax.apply_updates(params, _scaled(direction, eta)), batch)

        trials = jax.vmap(trial)(jnp.asarray(etas, value.dtype))
        trials = jnp.where(jnp.isfinite(trials), trials, jnp.inf)
        best = jnp.argmin(trials)
        eta = jnp.where(trials[best] < value, jnp.asarray(etas, value.dtype)[best], 0)
        return _scaled(direction, eta), LineSearchState(inner, eta)

    return optax.GradientTransformationExtraArgs(init, update)


def _scaled(tree, s):
    return jax.tree.map(lambda a: a * s.astype(a.dtype), tree)


def ravel_dtype(params) -> Any:
    return jnp.result_type(*jax.tree.leaves(params))


# ---------------------------------------------------------------------------------- the runs


def run_one(opt, residual_fn, params0, batch, rel_err, *, max_steps, every, probe_cost_s,
            recorder):  # fmt: skip
    """One ``pb.fit`` run; returns the curve [(seconds, step, relative error)], the final loss,
    the stop reason and the steps run. Seconds count from the first probe, i.e. after
    compilation, minus the probes' own cost."""
    recorder.rows.clear()
    # one step more than counted, so that the probe before it records the final point
    result = pb.fit(residual_fn, params0, opt, batch, max_steps=max_steps + 1)
    rows = [row for row in recorder.rows if row[1] <= max_steps]
    t0 = rows[0][0]
    curve = [(t - t0 - i * probe_cost_s, k, e) for i, (t, k, e) in enumerate(rows)]
    last_t, last_k, _ = curve[-1]
    if max_steps > result.steps > last_k > 0:
        # the final parameters were never probed: place them at the average step time
        per_step = last_t / max(last_k, 1)
        final = float(rel_err(result.params))
        curve.append((last_t + (result.steps - last_k) * per_step, result.steps, final))
    loss = float(result.history.loss[min(result.steps, max_steps)])
    return curve, loss, result.stop_reason, int(curve[-1][1]), result.params


def error_at(curve, t: float) -> float:
    """The relative error of the last probe at or before time t."""
    before = [e for s, _, e in curve if s <= t]
    return before[-1] if before else curve[0][2]


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(NAME, __doc__.split("\n\n")[0], seeds=3)
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    _common.use_agg()
    t_start = time.perf_counter()

    init, apply = pb.nets.mlp([2, cfg.width, 1], "tanh", dtype=jnp.float64)
    residual_fn = make_residual_fn(apply)
    batch = collocation(cfg.n)
    rel_err = jax.jit(relative_error_fn(apply, cfg.n_test))
    params0 = [init(jax.random.key(seed)) for seed in range(args.seeds)]
    n_params = sum(a.size for a in jax.tree.leaves(params0[0]))
    _, _, probe_cost_s = _common.timed(rel_err, params0[0], repeats=20)
    recorder = _common.Recorder()

    # (method, learning rate or None, optimiser, max steps, probe every); one probed optimiser
    # object per method, reused across seeds, so pb.fit compiles once per method.
    lm = pb.levenberg_marquardt()
    engd = with_grid_line_search(pb.gauss_newton())
    methods = [
        ("LM", None, lm, cfg.lm_steps, cfg.solver_probe_every),
        ("GN + line search (ENGD)", None, engd, cfg.engd_steps, cfg.solver_probe_every),
    ] + [
        ("Adam", lr, optax.adam(lr), cfg.adam_steps, cfg.adam_probe_every) for lr in cfg.adam_rates
    ]
    probed = [_common.with_probe(opt, rel_err, every, recorder) for _, _, opt, _, every in methods]

    runs, curves, finals = [], [], {}

    def adam_best() -> float:
        seed0 = [r for r in runs if r["method"] == "Adam" and r["seed"] == 0]
        return min(seed0, key=lambda r: r["final_rel_l2"])["lr"]

    def jobs():
        # Adam's learning-rate grid runs on seed 0; its best rate then on the other seeds
        for i, (name, *_) in enumerate(methods):
            for seed in range(args.seeds if name != "Adam" else 1):
                yield i, seed
        best = adam_best()
        i = next(i for i, m in enumerate(methods) if m[0] == "Adam" and m[1] == best)
        yield from ((i, seed) for seed in range(1, args.seeds))

    n_jobs = 2 * args.seeds + len(cfg.adam_rates) + args.seeds - 1
    for i, seed in _common.progress(jobs(), desc=NAME, disable=args.no_progress, total=n_jobs):
        name, lr, _, max_steps, every = methods[i]
        curve, loss, reason, steps, params = run_one(
            probed[i], residual_fn, params0[seed], batch, rel_err,
            max_steps=max_steps, every=every, probe_cost_s=probe_cost_s, recorder=recorder,
        )  # fmt: skip
        runs.append(
            dict(method=name, lr="" if lr is None else lr, seed=seed, steps=steps,
                 stop_reason=reason, seconds=curve[-1][0], final_loss=loss,
                 final_rel_l2=curve[-1][2], best_rel_l2=min(e for _, _, e in curve))
        )  # fmt: skip
        if seed == 0:
            finals[(name, lr)] = params
        curves += [
            dict(method=name, lr="" if lr is None else lr, seed=seed, step=k, seconds=t,
                 rel_l2=e)
            for t, k, e in curve
        ]  # fmt: skip

    # Adam: the learning rate with the lowest median final error
    adam = [r for r in runs if r["method"] == "Adam"]
    by_lr = {
        lr: _common.median([r["final_rel_l2"] for r in adam if r["lr"] == lr])
        for lr in cfg.adam_rates
    }
    best_lr = min(by_lr, key=by_lr.get)
    shown = [r for r in runs if r["method"] != "Adam" or r["lr"] == best_lr]
    summary = summarise(shown, curves, best_lr)

    out = args.out
    _common.write_csv(out / "runs.csv", runs)
    _common.write_csv(out / "curves.csv", curves)
    plot(out / "pinn_poisson.png", curves, summary, best_lr, apply, finals, cfg)
    elapsed = time.perf_counter() - t_start
    report = make_report(summary, by_lr, best_lr, cfg, args, n_params, len(batch[0]), elapsed)
    _common.write_text(out / "report.md", report)
    print(report)
    return 0


def time_to(curve_rows, threshold: float) -> float:
    """Seconds until the relative error first reaches ``threshold`` (inf if never)."""
    hits = [c["seconds"] for c in curve_rows if c["rel_l2"] <= threshold]
    return min(hits) if hits else float("inf")


def summarise(shown, curves, best_lr) -> list[dict]:
    """One row per method (Adam at its best rate): medians over seeds."""
    names = list(dict.fromkeys(r["method"] for r in shown))
    seeds = sorted({r["seed"] for r in shown})

    def curve_of(name, seed):
        lr = best_lr if name == "Adam" else ""
        return [c for c in curves if c["method"] == name and c["lr"] == lr and c["seed"] == seed]

    # equal wall-clock: the end of the shortest run (median over seeds per method)
    names_ = dict.fromkeys(r["method"] for r in shown)
    t_eq = min(_common.median([r["seconds"] for r in shown if r["method"] == n]) for n in names_)
    rows = []
    for name in names:
        rs = [r for r in shown if r["method"] == name]
        finals = [r["final_rel_l2"] for r in rs]
        at_eq = [error_at([(c["seconds"], c["step"], c["rel_l2"]) for c in curve_of(name, s)],
                          t_eq) for s in seeds]  # fmt: skip
        rows.append(
            {
                "method": name if name != "Adam" else f"Adam (lr {best_lr:g})",
                "median final rel. L2": _common.median(finals),
                "min": min(finals),
                "max": max(finals),
                f"rel. L2 at t = {t_eq:.2g} s": _common.median(at_eq),
                "median steps": _common.median([r["steps"] for r in rs]),
                "median seconds": _common.median([r["seconds"] for r in rs]),
                "s / step": _common.median([r["seconds"] / max(r["steps"], 1) for r in rs]),
                "s to 1e-3": _common.median([time_to(curve_of(name, s), 1e-3) for s in seeds]),
                "s to 1e-5": _common.median([time_to(curve_of(name, s), 1e-5) for s in seeds]),
                "final loss": _common.median([r["final_loss"] for r in rs]),
            }
        )
    return rows


def plot(path, curves, summary, best_lr, apply, finals, cfg) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(2, 2, figsize=(12, 9.5))
    for ax, xkey, xlabel in (
        (axes[0, 0], "seconds", "wall-clock seconds (compile excluded)"),
        (axes[0, 1], "step", "step"),
    ):
        ax.axhspan(1e-8, 1e-6, color="tab:purple", alpha=0.08, label="ENGD, published")
        ax.axhspan(1e-4, 1e-3, color="tab:orange", alpha=0.08, label="first order, published")
        for name, color in COLORS.items():
            lr = best_lr if name == "Adam" else ""
            rows = [c for c in curves if c["method"] == name and c["lr"] == lr]
            for seed in sorted({c["seed"] for c in rows}):
                pts = [c for c in rows if c["seed"] == seed]
                xs = np.maximum([c[xkey] for c in pts], 1e-3 if xkey == "seconds" else 1)
                label = (
                    (name if name != "Adam" else f"Adam (lr {best_lr:g})") if seed == 0 else None
                )
                ax.plot(xs, [c["rel_l2"] for c in pts], color=color, lw=1.4, alpha=0.8,
                        label=label)  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("relative L2 error of u")
        ax.grid(True, which="major", alpha=0.3)
    axes[0, 0].set_title("error against wall-clock (one line per seed)")
    axes[0, 1].set_title("error against steps")
    axes[0, 1].legend(loc="lower left", fontsize=8)

    g = np.linspace(0, 1, 101)
    gx, gy = np.meshgrid(g, g)
    xt = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], axis=1))
    u_star = np.asarray(exact(xt)).reshape(gx.shape)
    panels = [("GN + line search (ENGD)", None), ("Adam", best_lr)]
    errs = {}
    for name, lr in panels:
        u = np.asarray(jax.vmap(apply, (None, 0))(finals[(name, lr)], xt)[:, 0]).reshape(gx.shape)
        errs[name] = np.maximum(np.abs(u - u_star), 1e-16)
    lo = min(e.min() for e in errs.values())
    hi = max(e.max() for e in errs.values())
    for ax, (name, lr) in zip(axes[1], panels, strict=True):
        im = ax.pcolormesh(gx, gy, errs[name], norm=LogNorm(max(lo, hi * 1e-8), hi),
                           cmap="viridis", shading="auto")  # fmt: skip
        title = name if lr is None else f"{name} (lr {lr:g})"
        ax.set_title(f"|u - u*| after training, seed 0: {title}")
        ax.set_aspect("equal")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        fig.colorbar(im, ax=ax, shrink=0.85)
    fig.suptitle(
        f"PINN for -Laplace u = f on the unit square: 2-{cfg.width}-1 tanh network, "
        f"{cfg.n * cfg.n} interior + {4 * cfg.n} boundary points, float64"
    )
    fig.tight_layout()
    _common.save_figure(fig, path)


def make_report(summary, by_lr, best_lr, cfg, args, n_params, n_res, elapsed) -> str:
    engd = next(r for r in summary if r["method"].startswith("GN"))
    lm = next(r for r in summary if r["method"] == "LM")
    adam = next(r for r in summary if r["method"].startswith("Adam"))
    t_key = next(k for k in summary[0] if k.startswith("rel. L2 at t"))
    t_eq = float(t_key.split("= ")[1].split(" s")[0])
    lines = [
        "# A PINN for the Poisson equation: Gauss-Newton against Adam",
        "",
        f"Command: `python experiments/pinn_poisson.py{' --quick' if args.quick else ''} "
        f"--seeds {args.seeds}`; total run time {elapsed:.0f} s (compilation included).",
        "",
        f"Setup: 2-{cfg.width}-1 tanh MLP, P = {n_params} parameters; {cfg.n * cfg.n} interior "
        f"and {4 * cfg.n} boundary collocation points ({n_res} residuals); float64; "
        f"{args.seeds} seeds (initialisations); relative L2 error on a {cfg.n_test} x "
        f"{cfg.n_test} grid. Step caps: LM {cfg.lm_steps}, GN + line search {cfg.engd_steps}, Adam "
        f"{cfg.adam_steps}. Times are wall-clock seconds from the first step (compile time "
        "excluded), on a shared 2-core CPU.",
        "",
        "Medians over seeds (min / max: over seeds of the final error):",
        "",
        _common.markdown_table(summary),
        "",
        "Adam's learning-rate grid (final relative L2 error, seed 0): "
        + ", ".join(f"{lr:g}: {v:.3g}" for lr, v in by_lr.items())
        + f"; best {best_lr:g}.",
        "",
        "![error curves](pinn_poisson.png)",
        "",
        "## Finding",
        "",
        f"- GN + line search (ENGD) reaches a median relative L2 error of "
        f"{engd['median final rel. L2']:.2g} in {engd['median seconds']:.2g} s "
        f"({engd['median steps']:.0f} steps); LM reaches {lm['median final rel. L2']:.2g} in "
        f"{lm['median seconds']:.2g} s.",
        f"- At equal wall-clock (t = {t_eq:.2g} s, the end of the shortest run): ENGD "
        f"{engd[t_key]:.2g}, LM {lm[t_key]:.2g}, Adam {adam[t_key]:.2g}. Adam at its best rate "
        f"ends at {adam['median final rel. L2']:.2g} after {adam['median seconds']:.2g} s "
        f"({adam['median steps']:.0f} steps): "
        f"{adam['median final rel. L2'] / engd['median final rel. L2']:.2g} times ENGD's final "
        "error.",
        "- Published claim (Mueller & Zeinhofer 2023): ENGD 1e-6 to 1e-8, first-order methods "
        "1e-3 to 1e-4. " + claim_verdict(engd, lm, adam),
        "- Why: the PINN loss is a least-squares problem whose Gauss-Newton matrix J^T J is "
        "severely ill-conditioned (the Laplacian amplifies high-frequency directions), so a "
        "first-order method's step is limited by the largest curvature and crawls along the "
        "small ones; the Gauss-Newton step solves the linearised problem in all directions at "
        f"once. Measured here, a step costs {engd['s / step']:.2g} s (ENGD: Jacobian, "
        f"pseudo-inverse, 20 trial losses), {lm['s / step']:.2g} s (LM) and "
        f"{adam['s / step']:.2g} s (Adam); at equal time Adam's error is "
        f"{adam[t_key] / engd[t_key]:.2g} times ENGD's and {adam[t_key] / lm[t_key]:.2g} "
        "times LM's.",
    ]
    return "\n".join(lines) + "\n"


def claim_verdict(engd, lm, adam) -> str:
    e, a = engd["median final rel. L2"], adam["median final rel. L2"]
    parts = []
    if e <= 1e-6:
        parts.append(f"ENGD's {e:.2g} is inside or below the published range: agrees.")
    else:
        parts.append(
            f"ENGD's {e:.2g} is above the published 1e-6: disagrees (a smaller network or "
            "fewer collocation points than the paper limit the attainable error; see the "
            "residual loss in the table)."
        )
    if a >= 1e-4:
        parts.append(f"Adam's {a:.2g} is in or above the published 1e-3 to 1e-4 range: agrees.")
    else:
        parts.append(f"Adam's {a:.2g} is below the published range: better than claimed.")
    return " ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
