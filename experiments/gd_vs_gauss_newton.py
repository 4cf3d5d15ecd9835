"""Gradient descent against Gauss-Newton and Levenberg-Marquardt on one regression network.

Question: on a small regression network, how many iterations and how much wall-clock time do
plain gradient descent, GD with momentum and Adam need to reach a target loss, against
Gauss-Newton and Levenberg-Marquardt (LM) steps built from the Jacobian of the residuals?

Setup: a 1-16-16-1 tanh MLP (P = 321 parameters, LeCun-normal initialisation) fits
y = sin(2 pi x) + x / 2 at N = 200 evenly spaced points of [-1, 1] (no noise, so the minimum
loss is about zero), float32, residual r_i = f(x_i) - y_i, loss L = 1/2 ||r||^2. The target is
an RMS residual of 3e-3, i.e. L <= 1/2 N (3e-3)^2 = 9e-4. Every method runs ``pb.fit`` from the
same initial parameters (one per seed) with the same ``pb.regression_residuals`` function:
GD, GD with momentum 0.9 and Adam, each over a small learning-rate grid (the grid point with the
highest success rate, then fewest median iterations, is reported as "best"), for at most 20,000
steps; ``pb.gauss_newton()`` and ``pb.levenberg_marquardt()`` (Nielsen damping; every trial,
accepted or not, counts as an iteration) for at most 300. The seeds and learning rates of a
method run as one ``jax.vmap`` of ``pb.fit``. Wall-clock: the median time per iteration of an
un-batched, already-compiled ``pb.fit`` run of seed 0 (compile time measured apart), times the
iterations; time to target = iterations to target x time per iteration.

Finding: see the report (``results/gd_vs_gauss_newton/report.md``); the measured numbers of the
default run are quoted in the README.

    python experiments/gd_vs_gauss_newton.py            # about a minute on 2 CPU cores
    python experiments/gd_vs_gauss_newton.py --quick    # seconds (CI)
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

# XLA's CPU eigh and Cholesky (Gauss-Newton's pseudo-inverse, LM's solve) call LAPACK through
# OpenBLAS, whose worker threads spin when the cores are shared: on a busy 2-core machine a
# 200 x 200 eigh took 0.6 s. One thread each; set before jax loads, an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import paribus as pb  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

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
    rms_target: float  # target RMS residual
    first_order_steps: int  # max steps of GD, momentum, Adam
    solver_steps: int  # max steps (trials) of Gauss-Newton and LM
    grids: dict  # learning-rate grid per first-order method
    timing_steps: int  # steps of the un-batched run that measures time per iteration


# Learning rates are per example: the loss is a sum over N examples, so GD's stable step is
# O(1/N); the grid is written as eta * N and divided by N when the optimiser is built. Adam is
# invariant to the scale of the loss, so its rates are absolute.
FULL = Config(
    n=200,
    sizes=(1, 16, 16, 1),
    rms_target=3e-3,
    first_order_steps=20_000,
    solver_steps=150,
    grids={
        "GD": (0.3, 0.1, 0.03),
        "GD+momentum": (0.3, 0.1, 0.03),
        "Adam": (1e-2, 3e-3, 1e-3),
    },
    timing_steps=2_000,
)
QUICK = Config(
    n=64,
    sizes=(1, 8, 8, 1),
    rms_target=3e-2,
    first_order_steps=300,
    solver_steps=40,
    grids={"GD": (0.3,), "GD+momentum": (0.1,), "Adam": (1e-2,)},
    timing_steps=50,
)


def make_problem(cfg: Config):
    """Data, network and the one residual function every method uses."""
    x = jnp.linspace(-1.0, 1.0, cfg.n)[:, None]
    y = jnp.sin(2 * jnp.pi * x) + 0.5 * x
    init, apply = pb.nets.mlp(list(cfg.sizes), activation="tanh")
    residual_fn = pb.regression_residuals(apply)
    target = 0.5 * cfg.n * cfg.rms_target**2
    return init, residual_fn, (x, y), target


def first_order_opt(method: str, lr, n: int) -> optax.GradientTransformation:
    """The optax optimiser of a first-order method; ``lr`` may be traced (vmapped)."""
    if method == "GD":
        return optax.sgd(lr / n)
    if method == "GD+momentum":
        return optax.sgd(lr / n, momentum=0.9)
    if method == "Adam":
        return optax.adam(lr)
    raise ValueError(f"unknown first-order method {method!r}")


def solver_opt(method: str) -> optax.GradientTransformationExtraArgs:
    if method == "Gauss-Newton":
        return pb.gauss_newton()
    if method == "LM":
        return pb.levenberg_marquardt()
    raise ValueError(f"unknown solver {method!r}")


def batched_fit(make_opt, init, residual_fn, batch, keys, lrs, *, max_steps, target,
                step_tol=None):  # fmt: skip
    """``pb.fit`` for every (learning rate, seed) pair as one vmapped, jitted call.

    Returns numpy arrays: losses (L, S, max_steps + 1), NaN past each run's stop; accepted
    (L, S, max_steps + 1); steps (L, S); stop codes (L, S)."""

    def one(lr, key):
        r = pb.fit(residual_fn, init(key), make_opt(lr), batch, max_steps=max_steps,
                   target_loss=target, step_tol=step_tol)  # fmt: skip
        return r.history.loss, r.history.accepted, r.steps, r.stop_reason

    run = jax.jit(jax.vmap(jax.vmap(one, (None, 0)), (0, None)))
    out = jax.block_until_ready(run(jnp.asarray(lrs), keys))
    losses, accepted, steps, codes = (np.asarray(o) for o in out)
    return losses.astype(np.float64), accepted, steps, codes


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn().params)
    return time.perf_counter() - t0


def timed_fit(opt, init, residual_fn, batch, keys, *, max_steps, target, seed_runs: bool,
              step_tol=None):  # fmt: skip
    """Un-batched ``pb.fit`` runs of one compiled fit (``max_steps`` is static, the target is
    not): one compiling call, then each seed to the target when ``seed_runs``, then the time
    per iteration of seed 0 (see :func:`per_iteration`).

    Returns (losses (S, T+1) or None, accepted or None, steps, codes, seconds per iteration,
    compile seconds)."""
    from paribus import STOP_REASONS

    def go(key, tgt):
        return lambda: pb.fit(residual_fn, init(key), opt, batch, max_steps=max_steps,
                              target_loss=tgt, step_tol=step_tol)  # fmt: skip

    first = _seconds(go(keys[0], target))
    losses = accepted = steps = codes = None
    if seed_runs:
        losses = np.full((len(keys), max_steps + 1), np.nan)
        accepted = np.zeros((len(keys), max_steps + 1), bool)
        steps, codes = np.zeros(len(keys), int), np.zeros(len(keys), int)
        for s, key in enumerate(keys):
            r = go(key, target)()
            losses[s, : r.steps + 1] = r.history.loss
            accepted[s, : r.steps + 1] = r.history.accepted
            steps[s], codes[s] = r.steps, STOP_REASONS.index(r.stop_reason)
    per_step, run_s = per_iteration(go(keys[0], None), go(keys[0], math.inf))
    return losses, accepted, steps, codes, per_step, max(first - run_s, 0.0)


def per_iteration(full, zero, repeats: int = 3) -> tuple[float, float]:
    """(seconds per iteration, seconds of the full run): the median time of ``full()`` (a run
    without target) minus that of ``zero()`` (the same compiled fit stopped before its first
    step by an infinite target), over the iterations ``full`` made. The subtraction removes the
    fixed cost of a call (argument checks, dispatch, copying the history to the host), which
    would otherwise swamp a method that stops after a few dozen iterations."""
    t_full = float(np.median([_seconds(full) for _ in range(repeats)]))
    t_zero = float(np.median([_seconds(zero) for _ in range(repeats)]))
    n = max(full().steps, 1)
    # Timer noise larger than the work itself (a handful of tiny steps): fall back to the
    # whole call, an upper bound.
    work = t_full - t_zero if t_full - t_zero > 0.1 * t_full else t_full
    return work / n, t_full


def run_method(make_opt, lrs, init, residual_fn, batch, keys, *, max_steps, target,
               timing_steps, step_tol=None):  # fmt: skip
    """Every seed x learning rate of one method, and its time per iteration.

    One learning rate (or none): un-batched runs of one compiled fit. A grid: one vmapped
    sweep, then the time per iteration of the best rate from an un-batched fit of
    ``timing_steps`` iterations. Returns a dict of numpy arrays over (lr, seed)."""
    if len(lrs) == 1:
        losses, accepted, steps, codes, per_step, compile_s = timed_fit(
            make_opt(lrs[0]), init, residual_fn, batch, keys, max_steps=max_steps,
            target=target, seed_runs=True, step_tol=step_tol,
        )  # fmt: skip
        losses, accepted, steps, codes = (a[None] for a in (losses, accepted, steps, codes))
        best = 0
    else:
        losses, accepted, steps, codes = batched_fit(
            make_opt, init, residual_fn, batch, keys, lrs, max_steps=max_steps, target=target,
            step_tol=step_tol,
        )  # fmt: skip
        best = pick_best(iterations_to_target(losses, target), _final_loss(losses))
        *_, per_step, compile_s = timed_fit(
            make_opt(lrs[best]), init, residual_fn, batch, keys[:1],
            max_steps=min(timing_steps, max_steps), target=target, seed_runs=False,
            step_tol=step_tol,
        )  # fmt: skip
    its = iterations_to_target(losses, target)
    return dict(lrs=lrs, best=best, losses=losses, accepted=accepted, steps=steps, codes=codes,
                its=its, final=_final_loss(losses), per_step=per_step,
                compile_s=compile_s)  # fmt: skip


def iterations_to_target(losses: np.ndarray, target: float) -> np.ndarray:
    """First k with loss[k] <= target (-1 when never), along the last axis."""
    hit = losses <= target
    return np.where(hit.any(-1), hit.argmax(-1), -1)


def pick_best(its: np.ndarray, final: np.ndarray) -> int:
    """Index of the learning rate with the highest success rate, then the fewest median
    iterations to target, then the lowest median final loss. its, final: (L, S)."""

    def key(i):
        ok = its[i] >= 0
        med_its = np.median(np.where(ok, its[i], np.inf)) if ok.any() else np.inf
        return (-ok.mean(), med_its, np.nanmedian(final[i]))

    return min(range(its.shape[0]), key=key)


def _final_loss(losses: np.ndarray) -> np.ndarray:
    """Last finite entry along the last axis (the loss at the stop), inf when none."""
    finite = np.isfinite(losses)
    last = np.where(finite.any(-1), losses.shape[-1] - 1 - finite[..., ::-1].argmax(-1), 0)
    out = np.take_along_axis(losses, last[..., None], -1)[..., 0]
    return np.where(finite.any(-1), out, np.inf)


def run_all(cfg: Config, seeds: int, progress: bool):
    init, residual_fn, batch, target = make_problem(cfg)
    keys = jax.random.split(jax.random.key(0), seeds)
    methods = list(cfg.grids) + ["Gauss-Newton", "LM"]
    rows, best = [], {}
    for method in _common.progress(methods, desc=NAME, disable=not progress):
        if method in cfg.grids:
            lrs, max_steps = cfg.grids[method], cfg.first_order_steps
            make = lambda lr, m=method: first_order_opt(m, lr, cfg.n)  # noqa: E731
        else:
            lrs, max_steps = (math.nan,), cfg.solver_steps
            make = lambda lr, m=method: solver_opt(m)  # noqa: E731
        res = run_method(make, lrs, init, residual_fn, batch, keys, max_steps=max_steps,
                         target=target, timing_steps=cfg.timing_steps)  # fmt: skip
        b = res["best"]
        best[method] = dict(lr=lrs[b], losses=res["losses"][b], its=res["its"][b],
                            final=res["final"][b], per_step=res["per_step"],
                            compile_s=res["compile_s"])  # fmt: skip
        rows += csv_rows(method, res, seeds)
    return rows, best, target


def csv_rows(method: str, res: dict, seeds: int, loss_name: str = "loss") -> list[dict]:
    """One CSV row per (learning rate, seed) of :func:`run_method`'s result."""
    rows = []
    for i, lr in enumerate(res["lrs"]):
        for s in range(seeds):
            its = int(res["its"][i, s])
            ok = its >= 0
            best = i == res["best"]
            rows.append({
                "method": method, "lr": lr, "best_lr": best, "seed": s, "reached_target": ok,
                "iterations_to_target": its if ok else "",
                "accepted_steps_to_target": int(res["accepted"][i, s, 1 : its + 1].sum())
                if ok else "",
                "time_to_target_s": its * res["per_step"] if ok and best else "",
                "steps_run": int(res["steps"][i, s]),
                "stop_reason": _stop_name(res["codes"][i, s]),
                f"initial_{loss_name}": float(res["losses"][i, s, 0]),
                f"final_{loss_name}": float(res["final"][i, s]),
                "seconds_per_iteration": res["per_step"] if best else "",
            })  # fmt: skip
    return rows


def _stop_name(code) -> str:
    """Name of a ``pb.fit`` stop code (vmapped fits return codes into ``STOP_REASONS``)."""
    from paribus import STOP_REASONS

    return STOP_REASONS[int(code)]


def summary_rows(best: dict, seeds: int) -> list[dict]:
    out = []
    for method, b in best.items():
        ok = b["its"] >= 0
        med_its = float(np.median(b["its"][ok])) if ok.any() else math.nan
        out.append(
            {
                "method": method,
                "learning rate": "-" if math.isnan(b["lr"]) else f"{b['lr']:g}",
                "success": f"{int(ok.sum())}/{seeds}",
                "median iterations to target": med_its,
                "median time to target (ms)": med_its * b["per_step"] * 1e3,
                "time per iteration (us)": b["per_step"] * 1e6,
                "median final loss": float(np.median(b["final"])),
                "compile (s)": b["compile_s"],
            }
        )
    return out


def plot_curves(best: dict, target: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for method, b in best.items():
        losses = b["losses"]  # (S, T)
        k = np.arange(losses.shape[1])
        med = _common.seed_median(losses)
        lr = "" if math.isnan(b["lr"]) else f" (lr {b['lr']:g})"
        for ax, xs in ((axes[0], k + 1), (axes[1], (k + 1) * b["per_step"])):
            for row in losses:
                ax.plot(xs, row, color=COLORS[method], alpha=0.15, lw=0.8)
            ax.plot(xs, med, color=COLORS[method], lw=2.2, label=f"{method}{lr}")
    for ax in axes:
        ax.axhline(target, color="k", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
    axes[1].text(axes[1].get_xlim()[1], target * 0.6, "target ", fontsize=9, ha="right")
    axes[0].set_xlabel("iteration + 1 (LM: every trial counts)")
    axes[1].set_xlabel("wall-clock seconds (iterations x measured time per iteration)")
    axes[0].set_ylabel("loss 1/2 ||r||^2")
    axes[0].set_title("loss against iterations (thin: seeds, thick: median)")
    axes[1].set_title("loss against wall-clock")
    axes[0].legend(loc="lower left", fontsize=9)
    fig.suptitle("GD, momentum, Adam (best learning rate) vs Gauss-Newton and LM", y=1.02)
    _common.save_figure(fig, path)


def plot_grid(rows: list[dict], cfg: Config, seeds: int, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cfg.grids), figsize=(4.2 * len(cfg.grids), 3.6))
    for ax, method in zip(np.atleast_1d(axes), cfg.grids, strict=True):
        lrs = list(cfg.grids[method])
        finals = [[r["final_loss"] for r in rows if r["method"] == method and r["lr"] == lr]
                  for lr in lrs]  # fmt: skip
        succ = [np.mean([r["reached_target"] for r in rows
                         if r["method"] == method and r["lr"] == lr]) for lr in lrs]  # fmt: skip
        for lr, f in zip(lrs, finals, strict=True):
            ax.scatter([lr] * len(f), np.minimum(f, 1e6), color=COLORS[method], alpha=0.6, s=14)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for lr, s, f in zip(lrs, succ, finals, strict=True):
            ax.annotate(f"{s:.0%}", (lr, np.nanmax(np.minimum(f, 1e6))), fontsize=8,
                        textcoords="offset points", xytext=(0, 6), ha="center")  # fmt: skip
        ax.set_title(f"{method}: final loss per seed (label: success)", fontsize=9)
        unit = "eta x N" if method != "Adam" else "eta"
        ax.set_xlabel(f"learning rate ({unit})")
        ax.grid(True, alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("loss at stop (1e6 = diverged)")
    _common.save_figure(fig, path)


def write_report(rows, best, target, cfg: Config, seeds: int, args, wall: float) -> None:
    out = args.out
    table = summary_rows(best, seeds)
    fo = [m for m in cfg.grids if (best[m]["its"] >= 0).any()]
    lm = table[list(best).index("LM")]
    lines = [
        "# Gradient descent against Gauss-Newton and Levenberg-Marquardt",
        "",
        f"Written by `python experiments/{NAME}.py"
        + (" --quick" if args.quick else "")
        + f" --seeds {seeds}` in {wall:.0f} s ({describe_device()}).",
        "",
        f"MLP {list(cfg.sizes)} (tanh, P = {_num_params(cfg)}), N = {cfg.n} points of "
        f"y = sin(2 pi x) + x/2, float32; target loss {target:.3g} (RMS residual "
        f"{cfg.rms_target:g}). First-order methods: at most {cfg.first_order_steps} steps, "
        f"learning-rate grids {dict(cfg.grids)} (GD and momentum rates are eta x N); "
        f"Gauss-Newton and LM: at most {cfg.solver_steps} iterations.",
        "",
        "## Best learning rate per method",
        "",
        _common.markdown_table(table),
        "",
    ]
    lines += ["## Finding", "", _finding(best, fo, lm, seeds), ""]
    lines += [
        "![loss curves](loss_curves.png)",
        "",
        "![learning-rate grid](lr_grid.png)",
        "",
        "Time per iteration is the median over 3 already-compiled, un-batched runs of "
        f"{cfg.timing_steps} iterations (seed 0, best learning rate); times to target are "
        "iterations x that time. Every run: `runs.csv`.",
        "",
    ]
    _common.write_text(out / "report.md", "\n".join(lines))


def _finding(best, fo, lm, seeds) -> str:
    lm_b = best["LM"]
    lm_ok = lm_b["its"] >= 0
    if not lm_ok.any():
        return f"LM did not reach the target on any of {seeds} seeds in this run."
    lm_its = float(np.median(lm_b["its"][lm_ok]))
    lm_t = lm_its * lm_b["per_step"]
    parts = [
        f"LM reached the target on {int(lm_ok.sum())}/{seeds} seeds, in a median "
        f"{lm_its:.0f} iterations ({lm_t * 1e3:.1f} ms; {lm_b['per_step'] * 1e6:.0f} us per "
        "iteration)."
    ]
    for m in best:
        if m == "LM":
            continue
        b = best[m]
        ok = b["its"] >= 0
        if not ok.any():
            parts.append(
                f"{m} never reached it (best median loss at stop {np.median(b['final']):.3g})."
            )
            continue
        its = float(np.median(b["its"][ok]))
        t = its * b["per_step"]
        parts.append(
            f"{m} reached it on {int(ok.sum())}/{seeds} seeds in a median {its:.0f} iterations, "
            f"{its / lm_its:.3g}x LM's iterations and {t / lm_t:.3g}x LM's time "
            f"({b['per_step'] / lm_b['per_step']:.3g}x LM's time per iteration)."
        )
    del fo
    return " ".join(parts)


def _num_params(cfg: Config) -> int:
    return sum((a + 1) * b for a, b in zip(cfg.sizes[:-1], cfg.sizes[1:], strict=True))


def describe_device() -> str:
    d = jax.devices()[0]
    import os

    return f"{d.platform}, {os.cpu_count()} cores" if d.platform == "cpu" else d.device_kind


def main(argv: list[str] | None = None) -> None:
    args = _common.parser(NAME, __doc__, seeds=10).parse_args(argv)
    _common.use_agg()
    cfg = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    rows, best, target = run_all(cfg, args.seeds, not args.no_progress)
    wall = time.perf_counter() - t0
    _common.write_csv(args.out / "runs.csv", rows)
    plot_curves(best, target, args.out / "loss_curves.png")
    plot_grid(rows, cfg, args.seeds, args.out / "lr_grid.png")
    write_report(rows, best, target, cfg, args.seeds, args, wall)
    print(f"{NAME}: wrote {args.out}/report.md, runs.csv, loss_curves.png, lr_grid.png "
          f"({wall:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
