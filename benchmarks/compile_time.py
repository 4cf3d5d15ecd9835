"""Benchmark: the first call of ``pb.fit`` (trace + lower + compile + run) against optimistix.

Question (issue 13, item 4): is the first call of ``pb.fit`` no slower than optimistix's
``least_squares`` on a small curve fit, and in a NIST-style loop of many small problems, where
every problem is a new residual function and so a new compilation? Where does the time go?

Setup: two workloads, each run by every method in its own fresh Python process (so no method
inherits another's compile caches), the processes of all methods interleaved repeat by repeat
(so the machine's load hits all of them alike); the medians over repeats are reported.

- "exp": y = a exp(-b x) + c, 50 points, P = 3, from (1, 1, 0); ``max_steps=100``. The time
  of the first call, of a second call (the run alone), and the first call's split by
  ``jax.monitoring``: tracing to a jaxpr (Python), lowering to MLIR, XLA's backend compile.
- "mgh": the 20 Moré-Garbow-Hillstrom problems of ``tests/zoo.py`` (P = 2..6) one after
  another in one process (the forms "auto" picks, adam and the peers), each a new residual
  function; total and median per problem of the first calls, and the same split.

One tiny jitted function runs first in every process, so JAX's own start-up is in neither.

Methods: ``pb.fit`` with ``pb.levenberg_marquardt(solve=...)`` for each form (auto, primal, qr,
dual, cg), ``pb.gauss_newton()`` and ``optax.adam(1e-2)``; ``optx.least_squares`` with
``optx.LevenbergMarquardt`` and ``optx.GaussNewton`` (rtol = atol = 1e-8, ``throw=False``).
``pb.fit`` compiles a small run with XLA's quick settings by default (``compile_mode="auto"``;
see ``paribus._fit._compile``): "pb LM auto (full XLA)" is the same LM with XLA's defaults,
and "optx LM (quick XLA)" optimistix's LM compiled with the same quick settings.

Run: ``python benchmarks/compile_time.py`` (``--quick``: 2 repeats, fewer methods;
``--repeats N``; ``--x64`` for float64; ``--only exp`` or ``--only mgh``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = ("pb LM auto", "pb LM primal", "pb LM qr", "pb LM dual", "pb LM cg", "pb GN auto",
           "pb adam", "pb LM auto (full XLA)", "optx LM", "optx GN",
           "optx LM (quick XLA)")  # fmt: skip
# The MGH loop takes ~20 s a method on two loaded cores: the forms "auto" chooses, and the peers.
LOOP_METHODS = ("pb LM auto", "pb GN auto", "pb adam", "pb LM auto (full XLA)", "optx LM",
                "optx GN", "optx LM (quick XLA)")  # fmt: skip
QUICK_METHODS = ("pb LM auto", "pb GN auto", "optx LM", "optx GN")
# "(full XLA)": pb.fit(..., compile_mode="full"), XLA's default settings, which pb.fit's
# "auto" replaces by its quick ones for a small run; "(quick XLA)": optimistix compiled with
# those same quick settings (XLA_FLAGS in its process), for a like-for-like comparison.
QUICK_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"
MAX_STEPS = 100
_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "xla_s",
}


# ---------------------------------------------------------------------------------------------
# The child: one method, one workload, in a fresh process; prints one JSON line.


def _listen(totals: dict) -> None:
    import jax

    def on_duration(event: str, duration: float, **kwargs) -> None:
        del kwargs
        if event in _EVENTS:
            totals[_EVENTS[event]] += duration

    jax.monitoring.register_event_duration_secs_listener(on_duration)


def _solve_fn(method: str):
    """``solve(residual_fn(params), x0) -> final params`` as host arrays, one blocking call."""
    import jax
    import optax

    import paribus as pb

    if method.startswith("optx"):
        import optimistix as optx

        cls = optx.LevenbergMarquardt if method.startswith("optx LM") else optx.GaussNewton
        solver = cls(rtol=1e-8, atol=1e-8)

        wrapped = {}  # one wrapper per problem: optimistix's filter_jit keys on its identity

        def solve_optx(fn, x0):
            f = wrapped.setdefault(fn, lambda y, args: fn(y))
            sol = optx.least_squares(f, solver, x0, None, max_steps=MAX_STEPS, throw=False)
            return jax.block_until_ready(sol.value)

        return solve_optx
    mode = "full" if method.endswith("(full XLA)") else "auto"
    _, kind, *form = method.removesuffix(" (full XLA)").split()
    if kind == "LM":
        opt = pb.levenberg_marquardt(solve=form[0])
    elif kind == "GN":
        opt = pb.gauss_newton(solve=form[0])
    else:
        opt = optax.adam(1e-2)

    def solve_pb(fn, x0):
        result = pb.fit(lambda p, b: fn(p), x0, opt, None, max_steps=MAX_STEPS, compile_mode=mode)
        return jax.block_until_ready(result.params)

    return solve_pb


def _exp_problem(dtype):
    import jax.numpy as jnp

    xs = jnp.linspace(0.0, 4.0, 50, dtype=dtype)
    ys = 2.5 * jnp.exp(-1.3 * xs) + 0.5 + 0.01 * jnp.sin(7 * xs)

    def residuals(p):
        return p[0] * jnp.exp(-p[1] * xs) + p[2] - ys

    return residuals, jnp.asarray([1.0, 1.0, 0.0], dtype)


def child(method: str, workload: str, x64: bool) -> dict:
    import jax

    jax.config.update("jax_enable_x64", x64)
    import jax.numpy as jnp

    dtype = jnp.float64 if x64 else jnp.float32
    jax.block_until_ready(jax.jit(lambda a: a + 1)(jnp.zeros(3, dtype)))  # JAX's own start-up
    solve = _solve_fn(method)
    totals = dict.fromkeys(_EVENTS.values(), 0.0)
    if workload == "exp":
        fn, x0 = _exp_problem(dtype)
        _listen(totals)
        t0 = time.perf_counter()
        solve(fn, x0)
        first = time.perf_counter() - t0
        out = {"first_s": first, **totals}
        t0 = time.perf_counter()
        solve(fn, x0)
        return {**out, "run_s": time.perf_counter() - t0}
    sys.path.insert(0, str(ROOT / "tests"))
    from zoo import PROBLEMS

    starts = [jax.block_until_ready(jnp.asarray(prob.x0, dtype)) for prob in PROBLEMS]
    _listen(totals)
    times = []
    for prob, x0 in zip(PROBLEMS, starts, strict=True):
        # A new function object per problem, as a loop over data sets makes.
        fn = (lambda r: lambda p: r(p))(prob.residuals)
        t0 = time.perf_counter()
        solve(fn, x0)
        times.append(time.perf_counter() - t0)
    return {"total_s": sum(times), "median_s": statistics.median(times), **totals}


# ---------------------------------------------------------------------------------------------
# The driver.


def _spawn(method: str, workload: str, x64: bool, src: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--workload", workload]
    if x64:
        cmd.append("--x64")
    path = os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    if method.endswith("(quick XLA)"):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {QUICK_XLA_FLAGS}".strip()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{method} / {workload} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median_row(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    sys.path.insert(0, str(HERE))
    import _common

    p = _common.parser("compile_time", __doc__.splitlines()[0])
    p.add_argument("--only", choices=("exp", "mgh"), default=None)
    p.add_argument("--methods", nargs="*", default=None, help="a subset of the methods")
    p.add_argument(
        "--before",
        type=Path,
        default=None,
        help="also run the paribus methods from this other src/ (an older paribus), "
        "interleaved with the rest: a before/after comparison under the same load",
    )
    p.add_argument("--child", default=None, help=argparse_hidden())
    p.add_argument("--workload", default="exp", help=argparse_hidden())
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.workload, args.x64)))
        return
    repeats = args.repeats or (2 if args.quick else 5)
    workloads = [args.only] if args.only else ["exp", "mgh"]
    rows = []
    for workload in workloads:
        methods = args.methods or (
            QUICK_METHODS if args.quick else METHODS if workload == "exp" else LOOP_METHODS
        )
        variants = [(m, m, ROOT / "src") for m in methods]
        if args.before is not None:
            variants += [(f"{m} (before)", m, args.before) for m in methods if m.startswith("pb")]
        runs: dict[str, list[dict]] = {label: [] for label, *_ in variants}
        for rep in range(repeats):
            for label, method, src in variants:  # interleaved: the load hits every method
                runs[label].append(_spawn(method, workload, args.x64, src))
            print(f"{workload}: repeat {rep + 1}/{repeats} done", flush=True)
        for label, *_ in variants:
            med = _median_row(runs[label])
            row = {"workload": workload, "method": label}
            if workload == "exp":
                row |= {"first call": _common.fmt_ms(med["first_s"]),
                        "run": _common.fmt_ms(med["run_s"])}  # fmt: skip
            else:
                row |= {"total (20 problems)": _common.fmt_ms(med["total_s"]),
                        "median per problem": _common.fmt_ms(med["median_s"])}  # fmt: skip
            row |= {"trace": _common.fmt_ms(med["trace_s"]),
                    "lower": _common.fmt_ms(med["lower_s"]),
                    "XLA compile": _common.fmt_ms(med["xla_s"]), "repeats": repeats,
                    **{k + "_median": v for k, v in med.items()}}  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    dtype = "float64" if args.x64 else "float32"
    notes = (
        f"dtype {dtype}; max_steps={MAX_STEPS}; each cell the median over {repeats} fresh "
        "processes per method, interleaved. trace / lower / XLA compile: jax.monitoring "
        "durations summed over the first call(s) (trace: Python to jaxpr; lower: jaxpr to MLIR; "
        "XLA compile: the backend). mgh: the 20 MGH problems of tests/zoo.py in one process."
    )
    print(_common.write_results(args.out, rows, title="First-call (compile) time", notes=notes))


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
