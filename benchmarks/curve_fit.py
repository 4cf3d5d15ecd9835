"""Benchmark: classic least-squares problems, wall clock, paribus against scipy and optimistix.

Question (issue 11 item 2, the classic half): on the curve fits MINPACK was written for, how
long does a whole fit take with ``pb.levenberg_marquardt(damping="minpack")`` and with the
default damping, against ``scipy.optimize.least_squares(method="lm")`` (MINPACK itself) and
optimistix's ``LevenbergMarquardt``, each with its library's defaults, and does each reach the
known minimum?

Setup: the 20 Moré-Garbow-Hillstrom problems of ``tests/zoo.py`` from their standard starts,
float64 (2 to 6 parameters, 2 to 33 residuals).

- paribus: ``pb.fit(residual_fn, x0, opt, max_steps=500)`` with its default stopping tests;
  the first call compiles (reported apart), the median of later calls is the run time. Also
  the same call inside one ``jax.jit`` ("jit(pb ...)"), which leaves out ``pb.fit``'s Python
  work per call (its checks, the loop's chunks, the history's transfer to the host).
- scipy: ``least_squares(fun, x0, jac, method="lm")`` with its default tolerances, fun and jac
  jitted JAX functions (warmed up first); the median call.
- optimistix: ``optx.least_squares(fn, optx.LevenbergMarquardt(rtol=1e-8, atol=1e-8), x0,
  max_steps=500, throw=False)`` (scipy's default tolerances), jitted; compile apart.

Solved: f = ||r||^2 within 1e-6 of a known minimum (or <= 1e-14 where f* = 0), as in
``lm_defaults.py``. Evaluations: paribus's trials (``result.steps``), scipy's ``nfev``,
optimistix's steps.

Run: ``python benchmarks/curve_fit.py`` (a few minutes; ``--quick``: 6 problems, 3 repeats).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.optimize import least_squares  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))

import _common  # noqa: E402
from lm_defaults import solved  # noqa: E402
from zoo import PROBLEMS  # noqa: E402

import paribus as pb  # noqa: E402

MAX_STEPS = 500
QUICK = ("rosenbrock", "beale", "bard", "box_3d", "osborne1", "biggs_exp6")


def median_time(call, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def timed_jit(solve, problem, repeats):
    """Time a jitted ``solve(x0) -> (x, evaluations)`` from the problem's start."""
    x0 = jnp.asarray(problem.x0, jnp.float64)
    start = time.perf_counter()
    jax.block_until_ready(solve(x0))
    first = time.perf_counter() - start
    run = median_time(lambda: jax.block_until_ready(solve(x0)), repeats)
    x, evals = solve(x0)
    r = np.asarray(problem.residuals(x))
    return {"run_s": run, "compile_s": max(first - run, 0.0), "f": float(r @ r),
            "evals": int(evals)}  # fmt: skip


def run_paribus(problem, opt, repeats):
    def residual_fn(x, batch):
        return problem.residuals(x)

    x0 = jnp.asarray(problem.x0, jnp.float64)

    def call():
        result = pb.fit(residual_fn, x0, opt, max_steps=MAX_STEPS)
        jax.block_until_ready(result.params)
        return result

    start = time.perf_counter()
    result = call()
    first = time.perf_counter() - start
    run = median_time(call, repeats)
    f = 2 * float(result.history.loss[-1])
    return {"run_s": run, "compile_s": max(first - run, 0.0), "f": f, "evals": result.steps}


def run_paribus_jit(problem, opt, repeats):
    """The same fit inside one ``jax.jit``: no per-call Python work (chunks, checks, history)."""

    def residual_fn(x, batch):
        return problem.residuals(x)

    @jax.jit
    def fit(x0):
        result = pb.fit(residual_fn, x0, opt, max_steps=MAX_STEPS)
        return result.params, result.steps

    return timed_jit(fit, problem, repeats)


def run_scipy(problem, repeats):
    fun = jax.jit(problem.residuals)
    jac = jax.jit(jax.jacfwd(problem.residuals))
    x0 = np.asarray(problem.x0, float)

    def call():
        return least_squares(
            lambda x: np.asarray(fun(x)), x0, lambda x: np.asarray(jac(x)), method="lm"
        )

    call()  # compile fun and jac
    run = median_time(call, repeats)
    ref = call()
    return {"run_s": run, "compile_s": None, "f": 2 * float(ref.cost), "evals": int(ref.nfev)}


def run_optimistix(problem, repeats):
    import optimistix as optx

    solver = optx.LevenbergMarquardt(rtol=1e-8, atol=1e-8)

    @jax.jit
    def solve(x0):
        sol = optx.least_squares(lambda x, args: problem.residuals(x), solver, x0, None,
                                 max_steps=MAX_STEPS, throw=False)  # fmt: skip
        return sol.value, sol.stats["num_steps"]

    return timed_jit(solve, problem, repeats)


def main() -> None:
    p = _common.parser("curve_fit", __doc__.splitlines()[0])
    args = p.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    problems = [q for q in PROBLEMS if not args.quick or q.name in QUICK]
    methods = {
        "pb minpack": lambda q: run_paribus(q, pb.levenberg_marquardt(damping="minpack"), repeats),
        "pb default": lambda q: run_paribus(q, pb.levenberg_marquardt(), repeats),
        "jit(pb minpack)": lambda q: run_paribus_jit(
            q, pb.levenberg_marquardt(damping="minpack"), repeats
        ),
        "jit(pb default)": lambda q: run_paribus_jit(q, pb.levenberg_marquardt(), repeats),
        "scipy lm": lambda q: run_scipy(q, repeats),
        "optimistix LM": lambda q: run_optimistix(q, repeats),
    }
    rows = []
    for problem in problems:
        row = {"problem": problem.name}
        for name, run in methods.items():
            got = run(problem)
            row[f"{name} run"] = _common.fmt_ms(got["run_s"])
            row[f"{name} compile"] = _common.fmt_ms(got["compile_s"])
            row[f"{name} evals"] = got["evals"]
            row[f"{name} solved"] = solved(got["f"], problem.minima, rtol=1e-6, zero=1e-14)
            row[f"_{name}"] = got["run_s"]
        rows.append(row)
        print({k: v for k, v in row.items() if not k.startswith("_")}, flush=True)
        jax.clear_caches()
    summary = []
    for name in methods:
        ratio = [r[f"_{name}"] / r["_scipy lm"] for r in rows]
        both = [r for r in rows if r[f"{name} solved"] and r["scipy lm solved"]]
        summary.append({
            "method": name,
            "solved": f"{sum(r[f'{name} solved'] for r in rows)}/{len(rows)}",
            "run time / scipy lm (geo mean)": round(float(np.exp(np.mean(np.log(ratio)))), 3),
            "median run": _common.fmt_ms(float(np.median([r[f"_{name}"] for r in rows]))),
            "evals / scipy's (median, both solved)": float(np.median(
                [r[f"{name} evals"] / r["scipy lm evals"] for r in both])) if both else None,
        })  # fmt: skip
    detail = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    _common.write_results(args.out / "detail", detail, title="Classic problems: every run")
    print(_common.write_results(
        args.out, summary, title=f"Classic least squares (MGH), float64, {_common.device_name()}",
        notes="Run time: one whole fit, compile apart (paribus, optimistix); scipy's fun and jac "
        "are jitted JAX functions. Per-problem rows: detail/.",
    ))  # fmt: skip


if __name__ == "__main__":
    main()
