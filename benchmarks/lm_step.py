"""Benchmark: one Levenberg-Marquardt step per solve form, against a batch gradient and peers.

Question (issue 3): what does one LM step (solve, trial loss, gain ratio; jitted) cost in each
form, compared with one batch gradient, with optimistix's LevenbergMarquardt step and with one
iteration of scipy's least_squares(method="trf")? Goals: dual step <= 5x a batch gradient at
16-512-512-1 (N = 512); >= 100x faster per step than optimistix LM at 1-64-64-1 (N = 512).

Setup: tanh MLPs with regression residuals r_i = f(x_i) - y_i, y = sin(3 x_1), x ~ N(0, 1); the
forms that fit in memory are timed (primal and qr need P x P; optimistix forms J by P forward
passes, so it only runs where P is small). scipy runs on the host with J from a jitted jacobian;
its per-iteration time is the whole run divided by its iterations. Compile time is reported
apart; times are medians over repeats.

Run: ``python benchmarks/lm_step.py`` or ``--quick`` (smaller repeats, no 16-512-512-1 primal).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# One OpenBLAS thread: the LAPACK behind jax's CPU Cholesky spins on shared cores otherwise
# (a 512 x 512 factorisation measured 272 ms instead of 1.6 ms on a loaded 2-core machine).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

import paribus as pb  # noqa: E402

CASES = [  # (sizes, N): R < P twice, then R > P
    ((1, 64, 64, 1), 512),
    ((16, 512, 512, 1), 512),
    ((4, 16, 1), 2048),
]


def problem(sizes, n, dtype):
    init, apply = pb.nets.mlp(list(sizes), dtype=dtype)
    key_p, key_x = jax.random.split(jax.random.key(0))
    xs = jax.random.normal(key_x, (n, sizes[0]), dtype)
    ys = jnp.sin(3 * xs[:, :1])
    return init(key_p), pb.regression_residuals(apply), (xs, ys)


def paribus_rows(sizes, n, params, residual_fn, batch, repeats):
    p = pb.nets.num_params(params) if hasattr(pb.nets, "num_params") else None
    p = sum(a.size for a in jax.tree.leaves(params)) if p is None else p
    r_size = n * sizes[-1]
    grad = jax.jit(lambda prm: pb.loss_and_grad(residual_fn, prm, batch)[:2])
    rows = [{"method": "batch gradient", **_common.time_fn(lambda: grad(params), repeats=repeats)}]
    forms = ["dual", "cg"]
    if p <= 5000:  # P x P normal equations
        forms.append("primal")
    if p <= 1000:  # QR of the (R + P) x P stack: for small, ill-conditioned problems
        forms.append("qr")
    for form in forms:
        opt = pb.levenberg_marquardt(solve=form, cg_max_steps=20)
        state = opt.init(params)
        step = jax.jit(lambda prm, s, o=opt: o.update(None, s, prm, residual_fn=residual_fn,
                                                      batch=batch))  # fmt: skip
        timing = _common.time_fn(lambda s=step, st=state: s(params, st), repeats=repeats)
        rows.append({"method": f"paribus LM ({form})", **timing})
    for row in rows:
        row.update(mlp="-".join(map(str, sizes)), N=n, P=p, R=r_size)
    return rows


def optimistix_row(params, residual_fn, batch, repeats):
    import equinox as eqx
    import optimistix as optx

    solver = optx.LevenbergMarquardt(rtol=1e-8, atol=1e-8)
    fn = lambda prm, args: (residual_fn(prm, batch), None)  # noqa: E731
    f_struct = jax.eval_shape(lambda: residual_fn(params, batch))
    state = solver.init(fn, params, None, {}, f_struct, None, frozenset())
    # The optimistix state holds jaxprs: equinox's filter_jit passes them statically.
    step = eqx.filter_jit(lambda prm, s: solver.step(fn, prm, None, {}, s, frozenset())[:2])
    return {"method": "optimistix LM", **_common.time_fn(lambda: step(params, state),
                                                         repeats=repeats)}  # fmt: skip


def scipy_row(params, residual_fn, batch, max_nfev=6):
    from jax.flatten_util import ravel_pytree
    from scipy.optimize import least_squares

    flat, unravel = ravel_pytree(params)
    r = jax.jit(lambda th: residual_fn(unravel(th), batch).reshape(-1))
    jac = jax.jit(jax.jacrev(lambda th: residual_fn(unravel(th), batch).reshape(-1)))
    fun = lambda th: np.asarray(r(jnp.asarray(th, flat.dtype)), np.float64)  # noqa: E731
    jfun = lambda th: np.asarray(jac(jnp.asarray(th, flat.dtype)), np.float64)  # noqa: E731
    x0 = np.asarray(flat, np.float64)
    fun(x0), jfun(x0)  # compile outside the timing
    t0 = time.perf_counter()
    out = least_squares(fun, x0, jac=jfun, method="trf", max_nfev=max_nfev)
    elapsed = time.perf_counter() - t0
    return {"method": "scipy least_squares trf", "compile_s": 0.0,
            "run_s": elapsed / max(out.njev, 1), "repeats": int(out.njev)}  # fmt: skip


def main() -> None:
    args = _common.parser("lm_step", __doc__.splitlines()[0]).parse_args()
    jax.config.update("jax_enable_x64", args.x64)
    dtype = jnp.float64 if args.x64 else jnp.float32
    repeats = args.repeats or (5 if args.quick else 20)
    rows = []
    for sizes, n in CASES:
        params, residual_fn, batch = problem(sizes, n, dtype)
        case = paribus_rows(sizes, n, params, residual_fn, batch, repeats)
        meta = {k: case[0][k] for k in ("mlp", "N", "P", "R")}
        if meta["P"] <= 5000:
            case.append({**optimistix_row(params, residual_fn, batch, 2 if args.quick else 3),
                         **meta})  # fmt: skip
            case.append({**scipy_row(params, residual_fn, batch), **meta})
        base = case[0]["run_s"]
        for row in case:
            row["x batch gradient"] = row["run_s"] / base
            row["run"] = _common.fmt_ms(row["run_s"])
            row["compile"] = _common.fmt_ms(row["compile_s"])
        rows += case
        print(f"{meta}: " + ", ".join(f"{r['method']} {r['run']}" for r in case), flush=True)
    cols = ["mlp", "N", "P", "R", "method", "run", "x batch gradient", "compile", "run_s",
            "compile_s", "repeats"]  # fmt: skip
    rows = [{c: r.get(c) for c in cols} for r in rows]
    notes = f"dtype {jnp.dtype(dtype).name}; LM rows: one jitted update (solve, trial, rho)."
    print(_common.write_results(args.out, rows, title="LM step per solve form", notes=notes))


if __name__ == "__main__":
    main()
