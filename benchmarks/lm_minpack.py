"""Benchmark: MINPACK's trust region (``damping="minpack"``) against Nielsen's damping on
networks with R > P, over seeds, and what one update costs.

Question (issue 11 item 2): ``benchmarks/lm_defaults.py`` shows MINPACK's radius rules (Moré
1978) need fewer trials than Nielsen's damping on the overdetermined MGH problems. Does that
hold on the networks users bring when they are fitted with more residuals than parameters,
and what does the eigendecomposition of J^T J each update cost against the primal form's
Cholesky?

Setup:

- Trials: each network of ``tests/nets_zoo.py`` except the closure (pb.nets again), float64
  and float32, N = 256 examples with 2 outputs (R = 512 > P), targets (sin s, cos 2s), inputs
  and parameters drawn per seed as in ``benchmarks/lm_watchdog_seeds.py``; 100 trials of
  ``pb.levenberg_marquardt(damping=...)`` for "nielsen" (monotone, ``watchdog=None``) and
  "minpack". Reported: the lowest L / L_0 after 25 and 100 trials, and the trials each needs
  to reach the other's 100-trial value (1.001 x).
- Time: one jitted update (compile apart) of the pb.nets MLP 1-h-1 (tanh) on N points of a
  sine, float32, for (N, h) with P from 61 to 1,201 and R / P from 4 to 33; the solve form
  is "auto" (primal for all of these).
- ``--small`` (only this): pb.nets MLPs as small as classic curve fits (``SMALL``: 1-2-1 to
  1-12-1, P = 7 to 37), N = 40 and 256, 4 seeds, both dtypes: does MINPACK's trust region
  hold where P is small? Reported: the lowest L / L_0 after 100 trials, minpack / nielsen.

Run: ``python benchmarks/lm_minpack.py`` (about 15 minutes on one core; ``--quick``: 2
seeds, pb.nets, Equinox and the CNN, two timing sizes); ``--small``: about 4 minutes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))

import _common  # noqa: E402
from lm_watchdog_seeds import NETS, geo, problem  # noqa: E402

import paribus as pb  # noqa: E402

N_OVER, STEPS = 256, 100
METHODS = {
    "nielsen": {"damping": "nielsen", "watchdog": None},
    "minpack": {"damping": "minpack"},
}
TIMING = ((2000, 20), (2000, 100), (4000, 300), (8000, 400))  # (N, hidden): P = 3 h + 1
# --small: pb.nets MLPs with few parameters (P = 7 to 37), as small as classic curve fits.
SMALL = ([1, 2, 1], [1, 3, 1], [1, 4, 1], [1, 5, 1], [2, 4, 1], [1, 8, 1], [1, 3, 3, 1],
         [1, 12, 1])  # fmt: skip


def curve(fn, params, opt, batch):
    result = pb.fit(fn, params, opt, batch, max_steps=STEPS, grad_tol=0.0, target_loss=0.0)
    loss = np.asarray(result.history.loss, float)
    best = np.minimum.accumulate(loss / loss[0])
    return np.pad(best, (0, STEPS + 1 - best.size), mode="edge")


def reach(best, level):
    hits = np.nonzero(best <= 1.001 * level)[0]
    return int(hits[0]) if hits.size else None


def trial_rows(nets, seeds):
    rows = []
    for name in nets:
        for dtype in (jnp.float64, jnp.float32):
            for seed in range(seeds):
                fn, params, batch = problem(name, dtype, N_OVER, seed)
                curves = {m: curve(fn, params, pb.levenberg_marquardt(**cfg), batch)
                          for m, cfg in METHODS.items()}  # fmt: skip
                n, m = curves["nielsen"], curves["minpack"]
                row = {"network": name, "dtype": jnp.dtype(dtype).name, "seed": seed,
                       "P": sum(np.size(p) for p in jax.tree.leaves(params)),
                       "nielsen L/L0 @25": n[25], "minpack L/L0 @25": m[25],
                       "nielsen L/L0 @100": n[STEPS], "minpack L/L0 @100": m[STEPS],
                       "minpack trials to nielsen's @100": reach(m, n[STEPS]),
                       "nielsen trials to minpack's @100": reach(n, m[STEPS])}  # fmt: skip
                rows.append(row)
                print(row, flush=True)
                jax.clear_caches()  # see lm_watchdog_seeds.py: the kernel's memory-map limit
    return rows


def small_rows(seeds):
    """Lowest L / L_0 after 100 trials, minpack against nielsen (monotone), on small pb.nets
    MLPs (tanh), N = 40 and 256 uniform inputs, targets sin(3 s) + 0.3 cos(5 s) of their sum."""
    rows = []
    for sizes in SMALL:
        for n in (40, 256):
            for dtype in (jnp.float64, jnp.float32):
                init, apply = pb.nets.mlp(sizes, "tanh", dtype=dtype)
                xs = jax.random.uniform(jax.random.key(7), (n, sizes[0]), dtype, -1, 1)
                s = xs.sum(1, keepdims=True)
                batch = (xs, jnp.sin(3 * s) + 0.3 * jnp.cos(5 * s))
                fn = pb.regression_residuals(apply)
                for seed in range(seeds):
                    params = init(jax.random.key(seed))
                    ends = {m: curve(fn, params, pb.levenberg_marquardt(**cfg), batch)[STEPS]
                            for m, cfg in METHODS.items()}  # fmt: skip
                    rows.append({"sizes": "-".join(map(str, sizes)), "N": n,
                                 "dtype": jnp.dtype(dtype).name, "seed": seed,
                                 "P": sum(np.size(p) for p in jax.tree.leaves(params)),
                                 "nielsen L/L0 @100": ends["nielsen"],
                                 "minpack L/L0 @100": ends["minpack"]})  # fmt: skip
                    jax.clear_caches()
    return rows


def small_summary(rows):
    out = []
    for sizes in dict.fromkeys(r["sizes"] for r in rows):
        for dtype in ("float64", "float32"):
            mine = [r for r in rows if r["sizes"] == sizes and r["dtype"] == dtype]
            ratio = [r["minpack L/L0 @100"] / r["nielsen L/L0 @100"] for r in mine]
            out.append({"network": sizes, "P": mine[0]["P"], "dtype": dtype, "runs": len(ratio),
                        "end L minpack / nielsen (geo mean)": geo(ratio),
                        "minpack lower / higher": f"{sum(x < 1 for x in ratio)} / "
                                                  f"{sum(x > 1 for x in ratio)}"})  # fmt: skip
    return out


def trial_summary(rows):
    out = []
    for dtype in ("float64", "float32"):
        mine = [r for r in rows if r["dtype"] == dtype]
        for at in (25, 100):
            ratio = [r[f"minpack L/L0 @{at}"] / r[f"nielsen L/L0 @{at}"] for r in mine]
            out.append({
                "dtype": dtype, "after trials": at, "runs": len(ratio),
                "end L minpack / nielsen (geo mean)": geo(ratio),
                "minpack lower / higher": f"{sum(x < 1 for x in ratio)} / "
                                          f"{sum(x > 1 for x in ratio)}",
                "median trials, minpack to nielsen's L@100": float(np.median(
                    [r["minpack trials to nielsen's @100"] or 1.25 * STEPS for r in mine])),
                "median trials, nielsen to minpack's L@100": float(np.median(
                    [r["nielsen trials to minpack's @100"] or 1.25 * STEPS for r in mine])),
            })  # fmt: skip
    return out


def timing_rows(sizes, repeats):
    rows = []
    jax.config.update("jax_enable_x64", False)
    for n, hidden in sizes:
        init, apply = pb.nets.mlp([1, hidden, 1], "tanh")
        params = init(jax.random.key(0))
        xs = jnp.linspace(-1, 1, n)[:, None]
        batch = (xs, jnp.sin(3 * xs))
        fn = pb.regression_residuals(apply)
        row = {"N": n, "P": sum(np.size(p) for p in jax.tree.leaves(params))}
        for method, cfg in METHODS.items():
            opt = pb.levenberg_marquardt(**cfg)
            update = jax.jit(
                lambda s, p, o=opt, f=fn, b=batch: o.update(None, s, p, residual_fn=f, batch=b)
            )
            state = opt.init(params)
            t = _common.time_fn(lambda u=update, s=state, p=params: u(s, p), repeats=repeats)
            row[f"{method} update"] = _common.fmt_ms(t["run_s"])
            row[f"{method} compile"] = _common.fmt_ms(t["compile_s"])
            row[f"_{method}"] = t["run_s"]
        row["minpack / nielsen"] = round(row.pop("_minpack") / row.pop("_nielsen"), 2)
        rows.append(row)
        print(row, flush=True)
        jax.clear_caches()
    return rows


def main() -> None:
    p = _common.parser("lm_minpack", __doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--nets", default=None, help="comma-separated names of tests/nets_zoo.py")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--small", action="store_true", help="only the small pb.nets MLPs (SMALL)")
    args = p.parse_args()
    if args.small:
        jax.config.update("jax_enable_x64", True)
        rows = small_rows(args.seeds or (2 if args.quick else 4))
        _common.write_results(args.out / "small_runs", rows, title="minpack vs nielsen, small")
        title = "minpack vs nielsen on small pb.nets MLPs: lowest L / L_0 after 100 trials"
        print(_common.write_results(args.out / "small", small_summary(rows), title=title))
        return
    nets = ("pbnets", "equinox", "cnn") if args.quick else NETS
    nets = args.nets.split(",") if args.nets else nets
    seeds = args.seeds or (2 if args.quick else 4)
    jax.config.update("jax_enable_x64", True)
    rows = trial_rows(nets, seeds)
    _common.write_results(args.out / "trials", rows, title="minpack vs nielsen, R > P")
    text = _common.write_results(
        args.out / "summary",
        trial_summary(rows),
        title="minpack vs nielsen, R > P: over seeds",
        notes=f"N = {N_OVER} (R = {2 * N_OVER} > P); lowest L / L_0 after 25 and {STEPS} "
        f"trials; a miss counts as {int(1.25 * STEPS)} trials. Per-run rows: trials/.",
    )
    print(text)
    if not args.no_timing:
        sizes = TIMING[:2] if args.quick else TIMING
        timed = timing_rows(sizes, args.repeats or (5 if args.quick else 10))
        print(_common.write_results(args.out / "timing", timed, title=(
            f"One LM update, pb.nets 1-h-1 tanh, float32, {_common.device_name()}")))  # fmt: skip


if __name__ == "__main__":
    main()
