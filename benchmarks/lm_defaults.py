"""Benchmark: which Levenberg-Marquardt defaults (damping rule, scaling, lam0, geodesic
acceleration) reach the minimum in the fewest trials?

Question (issue 11 item 2): do LM's defaults converge on networks with N < P as fast as
Gauss-Newton does where GN works, and need no more trials than MINPACK on the classic problems?

Setup, one process, float64 then float32 (``--dtypes``):

- The Moré-Garbow-Hillstrom problems of ``tests/zoo.py`` plus Broyden banded and Broyden
  tridiagonal (n = 10, f* = 0), from x0 and 10 x0. Solved: f = ||r||^2 within rtol (1e-6
  float64, 1e-3 float32) of a known minimum, or of MINPACK's final value from the same 10 x0
  start (so MINPACK solves every 10 x0 start by construction), or f <= 1e-14 (float64) /
  1e-10 (float32) where f* = 0.
- Networks with N < P: 1-32-1 tanh (P = 97) on 10 points of sin(3x), 5 seeds; solved: loss
  <= 1e-20 (float64) / 1e-10 (float32). N > P: 1-20-1 tanh (P = 61) on 2,000 points of
  sin(3x) + 0.3 cos(5x), 3 seeds; solved: f = 2 L <= 2e-4 (RMS residual 3e-4).

Trials are loss evaluations at a trial point: one per LM/GN step (accepted or not); a geodesic
step adds one second directional derivative r_vv (nested JVPs, about one more evaluation) and
is counted as two. MINPACK is ``scipy.optimize.least_squares(method="lm")`` (lmder, analytic
Jacobian from jax, tolerances 1e-15), float64 only; its trials are function evaluations up to
the first one that is solved. Every method runs each problem's two starts (or seeds) in one
``jit(vmap(pb.fit))``; nothing here is timed.

Run: ``python benchmarks/lm_defaults.py`` (all configurations) or ``--quick`` (fewer
configurations and steps).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))

import _common  # noqa: E402
from zoo import PROBLEMS, Problem  # noqa: E402

import paribus as pb  # noqa: E402

# "default" is pb.levenberg_marquardt() as it stands (Nielsen's damping, watchdog "auto": 8
# where R <= P, monotone LM elsewhere); the others are monotone (watchdog=None) unless they
# name a watchdog; "minpack" is MINPACK's lmder (pb.least_squares's default).
MONO = {"watchdog": None}
CONFIGS = {
    "default": {},
    "nielsen, monotone": MONO,
    "nielsen, marquardt scaling": {**MONO, "scaling": "marquardt"},
    "nielsen, tau 1e-6": {**MONO, "init_damping": 1e-6},
    "delayed (x2 / 3)": {**MONO, "damping": "delayed"},
    "trust_region, marquardt scaling": {**MONO, "damping": "trust_region", "scaling": "marquardt"},
    "nielsen + geodesic": {**MONO, "geodesic": 0.75},
    "nielsen, tau 1e-6 + geodesic": {**MONO, "init_damping": 1e-6, "geodesic": 0.75},
    "watchdog 4": {"watchdog": 4},
    "watchdog 8": {"watchdog": 8},
    "watchdog auto": {"watchdog": "auto"},
    "minpack (Moré's trust region)": {"damping": "minpack"},
}
QUICK = ("default", "nielsen, monotone", "nielsen + geodesic", "minpack (Moré's trust region)")


def _broyden_banded(x):
    n = x.shape[0]
    i = jnp.arange(n)
    near = (jnp.abs(i[:, None] - i[None, :]) <= jnp.where(i[None, :] < i[:, None], 5, 1)) & (
        i[:, None] != i[None, :]
    )
    return x * (2 + 5 * x**2) + 1 - near @ (x * (1 + x))


def _broyden_tridiagonal(x):
    left = jnp.concatenate([jnp.zeros(1, x.dtype), x[:-1]])
    right = jnp.concatenate([x[1:], jnp.zeros(1, x.dtype)])
    return (3 - 2 * x) * x - left - 2 * right + 1


EXTRA = (
    Problem("broyden_banded", _broyden_banded, (-1.0,) * 10, (0.0,)),
    Problem("broyden_tridiagonal", _broyden_tridiagonal, (-1.0,) * 10, (0.0,)),
)


def solved(f, minima, *, rtol, zero):
    return any(abs(f - m) <= rtol * abs(m) if m else f <= zero for m in minima)


def first_solved(fs, minima, *, rtol, zero):
    """Index of the first value in ``fs`` that is solved (NaN past the run are skipped)."""
    for k, f in enumerate(fs):
        if np.isfinite(f) and solved(float(f), minima, rtol=rtol, zero=zero):
            return k
    return None


def minpack(problem, x0):
    """(f values of every evaluation, final f) of MINPACK lmder from x0, float64."""
    fun = jax.jit(lambda x: problem.residuals(x))
    jac = jax.jit(jax.jacfwd(lambda x: problem.residuals(x)))
    seen = []

    def f(x):
        r = np.asarray(fun(jnp.asarray(x)))
        seen.append(float(r @ r))
        return r

    res = scipy.optimize.least_squares(
        f, np.asarray(x0, float), lambda x: np.asarray(jac(jnp.asarray(x))), method="lm",
        xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=100 * (len(x0) + 1) * 5,
    )  # fmt: skip
    # seen[0] is f(x0): scipy evaluates it once and serves MINPACK's own first evaluation from
    # its cache (as any repeated point), so seen[k] follows k trials, as history.loss[k] does.
    # (Until 2026-12-02 seen[0] was dropped, crediting MINPACK one trial too few.)
    return seen, float(2 * res.cost)


def minpack_refs(problem, starts, refs):
    """refs[name, start] = (minima counted as solved, MINPACK's trials to solve, its nfev)."""
    for label, x in starts:
        seen, final = minpack(problem, x)
        minima = problem.minima + ((final,) if label != "x0" else ())
        k = first_solved(seen, minima, rtol=1e-6, zero=1e-14)
        refs[problem.name, label] = (minima, k, len(seen))


def zoo_starts(problem):
    x0 = np.asarray(problem.x0)
    return [("x0", x0)] + ([("10 x0", 10 * x0)] if np.any(x0 != 0) else [])


def run_vmapped(residual_fn, starts, opt, batch, max_steps):
    """f = 2 L history (n_starts, max_steps + 1) of ``pb.fit`` from each start."""
    fit = jax.jit(jax.vmap(lambda x: pb.fit(residual_fn, x, opt, batch, max_steps=max_steps)))
    result = fit(starts)
    return 2 * np.asarray(result.history.loss, float)


def methods(names):
    out = {name: (pb.levenberg_marquardt(**CONFIGS[name]), CONFIGS[name]) for name in names}
    out["gauss_newton"] = (pb.gauss_newton(), {})
    return out


def evals(k, cfg):
    return None if k is None else k * (2 if cfg.get("geodesic") else 1)


def zoo_rows(names, dtype, max_steps, refs, out, earlier):
    rows = []
    rtol, zero = (1e-6, 1e-14) if dtype == jnp.float64 else (1e-3, 1e-10)
    for problem in PROBLEMS + EXTRA:
        starts = zoo_starts(problem)
        if (problem.name, "x0") not in refs:
            minpack_refs(problem, starts, refs)
        stacked = jnp.asarray(np.stack([x for _, x in starts] * (3 - len(starts))), dtype)
        residual_fn = lambda x, batch, p=problem: p.residuals(x).astype(x.dtype)  # noqa: E731
        for name, (opt, cfg) in methods(names).items():
            fs = run_vmapped(residual_fn, stacked, opt, None, max_steps)
            for i, (label, _) in enumerate(starts):
                minima, mp_k, mp_n = refs[problem.name, label]
                k = first_solved(fs[i], minima, rtol=rtol, zero=zero)
                rows.append({
                    "dtype": jnp.dtype(dtype).name, "problem": problem.name, "start": label,
                    "method": name, "trials": evals(k, cfg), "final_f": float(np.nanmin(fs[i])),
                    "minpack_trials": None if mp_k is None else mp_k, "minpack_nfev": mp_n,
                })  # fmt: skip
        print(problem.name, jnp.dtype(dtype).name, flush=True)
        _common.write_results(out / "detail", earlier + rows, title="LM defaults: every run")
    return rows


def sine_data(n_points, dtype, target):
    xs = jnp.linspace(-1, 1, n_points, dtype=dtype)[:, None]
    return xs, target(xs)


NETS = {
    "N<P: 1-32-1 tanh, N=10": ([1, 32, 1], 10, lambda x: jnp.sin(3 * x), 5),
    "N>P: 1-20-1 tanh, N=2000": ([1, 20, 1], 2000, lambda x: jnp.sin(3 * x) + 0.3 * jnp.cos(5 * x),
                                 3),
}  # fmt: skip


TARGET_OVER = 1e-4  # f = 2 L on the N > P network: RMS residual 2e-4 (reached at 2 TARGET_OVER)


def net_minpack(residual_fn, params, batch):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    fun = jax.jit(lambda v: jnp.ravel(residual_fn(unravel(v), batch)))
    jac = jax.jit(jax.jacfwd(lambda v: jnp.ravel(residual_fn(unravel(v), batch))))
    seen = []

    def f(v):
        r = np.asarray(fun(jnp.asarray(v)), float)
        seen.append(float(r @ r))
        return r

    scipy.optimize.least_squares(f, np.asarray(flat, float), lambda v: np.asarray(jac(v)),
                                 method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15,
                                 max_nfev=2000)  # fmt: skip
    return np.asarray(seen)  # seen[k] follows k trials (see minpack)


def net_rows(names, dtype, max_steps):
    rows = []
    for net, (sizes, n_points, target, seeds) in NETS.items():
        init, apply = pb.nets.mlp(sizes, "tanh", dtype=dtype)
        residual_fn = pb.regression_residuals(apply)
        batch = sine_data(n_points, dtype, target)
        starts = jax.vmap(init)(jax.random.split(jax.random.key(0), seeds))
        runs = {name: (run_vmapped(residual_fn, starts, opt, batch, max_steps), cfg)
                for name, (opt, cfg) in methods(names).items()}  # fmt: skip
        over = n_points > sum(np.size(x) for x in jax.tree.leaves(init(jax.random.key(0))))
        if over and dtype == jnp.float64:
            for s in range(seeds):
                params = jax.tree.map(lambda x, s=s: x[s], starts)
                runs.setdefault("minpack", (np.full((seeds, 1), np.nan), {}))
                fs = net_minpack(residual_fn, params, batch)
                mp = runs["minpack"][0]
                if mp.shape[1] < fs.size:
                    mp = np.pad(mp, ((0, 0), (0, fs.size - mp.shape[1])), constant_values=np.nan)
                mp[s, : fs.size] = fs
                runs["minpack"] = (mp, {})
        for s in range(seeds):
            if over:
                minima, rtol, zero = (TARGET_OVER,), 1.0, 0.0  # f <= 2 TARGET_OVER
            else:
                minima, rtol = (0.0,), 0.0
                zero = 2e-20 if dtype == jnp.float64 else 2e-10
            for name, (fs, cfg) in runs.items():
                k = first_solved(fs[s], minima, rtol=rtol, zero=zero)
                rows.append({
                    "dtype": jnp.dtype(dtype).name, "problem": net, "start": f"seed {s}",
                    "method": name, "trials": evals(k, cfg),
                    "final_f": float(np.nanmin(fs[s])),
                })  # fmt: skip
        print(net, jnp.dtype(dtype).name, flush=True)
    return rows


def summary(rows, names):
    out = []
    for dtype in sorted({r["dtype"] for r in rows}, reverse=True):
        for name in [*names, "gauss_newton"]:
            mine = [r for r in rows if r["dtype"] == dtype and r["method"] == name]
            zoo = [r for r in mine if "minpack_nfev" in r]
            ratios = [r["trials"] / max(r["minpack_trials"], 1) for r in zoo
                      if r["trials"] is not None and r["minpack_trials"] is not None]  # fmt: skip
            row = {"dtype": dtype, "method": name,
                   "zoo solved": f"{sum(r['trials'] is not None for r in zoo)}/{len(zoo)}",
                   "zoo median trials / MINPACK": float(np.median(ratios)) if ratios else None,
                   "zoo worst ratio": float(np.max(ratios)) if ratios else None}  # fmt: skip
            for net in NETS:
                got = [r["trials"] for r in mine if r["problem"] == net]
                ok = [t for t in got if t is not None]
                tag = net.split(":")[0]
                row[f"{tag} solved"] = f"{len(ok)}/{len(got)}"
                row[f"{tag} median trials"] = float(np.median(ok)) if ok else None
            out.append(row)
        first = [r for r in rows if r["dtype"] == dtype and r["method"] == names[0]]
        zoo = [r for r in first if "minpack_nfev" in r]
        row = {"dtype": dtype, "method": "MINPACK lmder (float64)",
               "zoo solved": f"{sum(r['minpack_trials'] is not None for r in zoo)}/{len(zoo)}",
               "zoo median trials / MINPACK": 1.0}  # fmt: skip
        for net in NETS:
            got = [r["trials"] for r in rows if r["dtype"] == dtype
                   and r["method"] == "minpack" and r["problem"] == net]  # fmt: skip
            ok = [t for t in got if t is not None]
            tag = net.split(":")[0]
            row[f"{tag} solved"] = (
                f"{len(ok)}/{len(got)}"
                if got
                else ("refuses R < P" if tag == "N<P" else "float64 only")
            )
            row[f"{tag} median trials"] = float(np.median(ok)) if ok else None
        out.append(row)
    return out


def main() -> None:
    p = _common.parser("lm_defaults", __doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float64,float32")
    p.add_argument("--configs", default=None, help="';'-separated names of CONFIGS")
    p.add_argument("--only", choices=("zoo", "nets"), default=None)
    args = p.parse_args()
    names = list(QUICK if args.quick else CONFIGS)
    if args.configs:
        names = [n.strip() for n in args.configs.split(";")]
    zoo_steps, net_steps = (200, 100) if args.quick else (500, 200)
    rows, refs = [], {}
    for dt in args.dtypes.split(","):
        # float64 first: MINPACK's references are computed there and reused for float32.
        jax.config.update("jax_enable_x64", dt == "float64")
        dtype = jnp.dtype(dt)
        if dt == "float32" and not refs and args.only != "nets":
            jax.config.update("jax_enable_x64", True)
            for problem in PROBLEMS + EXTRA:
                minpack_refs(problem, zoo_starts(problem), refs)
            jax.config.update("jax_enable_x64", False)
        # Networks first, and every row written as it comes: a long run leaves usable data.
        if args.only != "zoo":
            rows += net_rows(names, dtype, net_steps)
            _common.write_results(args.out / "detail", rows, title="LM defaults: every run")
        if args.only != "nets":
            rows += zoo_rows(names, dtype, zoo_steps, refs, args.out, rows)
    table = summary(rows, names)
    notes = (
        "Per configuration: zoo problem-starts solved; median and worst of trials / MINPACK "
        "trials over the starts both solve; networks: seeds solved and median trials. "
        "Per-problem rows are in results.csv."
    )
    _common.write_results(args.out / "detail", rows, title="LM defaults: every run")
    print(_common.write_results(args.out, table, title="LM defaults", notes=notes))


if __name__ == "__main__":
    main()
