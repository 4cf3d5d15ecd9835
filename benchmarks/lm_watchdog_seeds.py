"""Benchmark: the watchdog against monotone LM over seeds, on the networks users bring.

Question (issue 11 item 2): ``benchmarks/lm_watchdog_nets.py`` fits each network of
``tests/nets_zoo.py`` on one data set from one start. Does what it shows (the watchdog takes
Gauss-Newton's trials where Gauss-Newton works; it ends higher with N > P) hold over data
sets and starts, so that a default can be chosen from it?

Setup: each network (a closure is the pb.nets MLP again, so it is left out), float64 and
float32, targets t = (sin(s), cos(2 s)) with s the sum of an example's inputs, random normal
inputs. Per seed the inputs are drawn again and every parameter is multiplied by
(1 + 0.3 z), z standard normal. Regimes: N = 6 and N = 12 examples (R = 2 N < P for every
network: interpolation), ``--seeds`` seeds each, 200 trials: the first trial with
L <= 1e-20 L_0 (float64) / 1e-8 L_0 (float32), for ``pb.levenberg_marquardt(watchdog=8)``,
monotone LM (``watchdog=None``) and ``pb.gauss_newton()``; N = 256 (R = 512 > P), 100
trials: the lowest L / L_0, watchdog against monotone. Nothing is timed.

Run: ``python benchmarks/lm_watchdog_seeds.py`` (about 15 minutes on one CPU core with the
default 4 seeds; ``--quick``: 2 seeds, pb.nets, Equinox and the CNN).
"""

from __future__ import annotations

import csv
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
from lm_watchdog_nets import data  # noqa: E402
from nets_zoo import ZOO  # noqa: E402

import paribus as pb  # noqa: E402

NETS = ("pbnets", "equinox", "flax", "cnn", "transformer", "rnn")
UNDER, UNDER_STEPS = (6, 12), 200
OVER, OVER_STEPS = 256, 100


def problem(name, dtype, n, seed):
    """(residual_fn, params, batch): fresh inputs and jittered parameters for this seed."""
    apply, params, xs = ZOO[name](dtype=dtype)
    k_data, k_params = jax.random.split(jax.random.key(1000 * n + seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(k_params, len(leaves))
    jitter = [
        p * (1 + 0.3 * jax.random.normal(k, p.shape, p.dtype))
        for p, k in zip(leaves, keys, strict=True)
    ]
    batch = data(xs, n, dtype, k_data)
    return pb.regression_residuals(apply), jax.tree.unflatten(tree, jitter), batch


def losses(fn, params, opt, batch, steps):
    result = pb.fit(fn, params, opt, batch, max_steps=steps, grad_tol=0.0, target_loss=0.0)
    loss = np.asarray(result.history.loss, float)
    return loss / loss[0]


def rows_for(name, dtype, seeds):
    rows = []
    level = 1e-20 if dtype == jnp.float64 else 1e-8
    methods = {
        "watchdog 8": pb.levenberg_marquardt(watchdog=8),
        "monotone": pb.levenberg_marquardt(watchdog=None),
        "gauss_newton": pb.gauss_newton(),
    }
    for n in (*UNDER, OVER):
        for seed in range(seeds):
            fn, params, batch = problem(name, dtype, n, seed)
            row = {"network": name, "dtype": jnp.dtype(dtype).name, "N": n, "seed": seed,
                   "P": sum(np.size(p) for p in jax.tree.leaves(params))}  # fmt: skip
            for method, opt in methods.items():
                if n == OVER and method == "gauss_newton":
                    continue
                rel = losses(fn, params, opt, batch, OVER_STEPS if n == OVER else UNDER_STEPS)
                if n == OVER:
                    row[method] = float(np.min(rel))
                else:
                    hits = np.nonzero(rel <= level)[0]
                    row[method] = int(hits[0]) if hits.size else None
            rows.append(row)
            print(row, flush=True)
            # Each fit compiles its own executables; without this a full run reaches the
            # kernel's limit on memory maps (65,530) and XLA fails with "Cannot allocate memory".
            jax.clear_caches()
    return rows


def read_rows(path):
    """Rows of an earlier run's detail CSV, typed as ``rows_for`` makes them."""
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            typed = {"network": row["network"], "dtype": row["dtype"], "N": int(row["N"]),
                     "seed": int(row["seed"]), "P": int(row["P"])}  # fmt: skip
            for method in ("watchdog 8", "monotone", "gauss_newton"):
                value = row.get(method, "")
                typed[method] = None if value in ("", "None") else (
                    float(value) if typed["N"] == OVER else int(float(value))
                )  # fmt: skip
            if typed["N"] == OVER:
                del typed["gauss_newton"]
            out.append(typed)
    return out


def geo(values):
    return float(np.exp(np.mean(np.log(values)))) if values else None


def summary(rows):
    out = []
    for dtype in ("float64", "float32"):
        mine = [r for r in rows if r["dtype"] == dtype]
        under = [r for r in mine if r["N"] != OVER]
        cap = 1.25 * UNDER_STEPS  # a run that never reaches the level counts as 250 trials
        w = [cap if r["watchdog 8"] is None else r["watchdog 8"] for r in under]
        m = [cap if r["monotone"] is None else r["monotone"] for r in under]
        pairs = list(zip(w, m, strict=True))
        gn = [r for r in under if r["gauss_newton"] is not None]
        over = [r for r in mine if r["N"] == OVER]
        ratio = [r["watchdog 8"] / r["monotone"] for r in over]
        out.append({
            "dtype": dtype,
            "N<P runs": len(under),
            "solved: watchdog / monotone / GN": (
                f"{sum(r['watchdog 8'] is not None for r in under)} / "
                f"{sum(r['monotone'] is not None for r in under)} / {len(gn)}"
            ),
            "trials watchdog / monotone (geo mean)": geo([a / b for a, b in pairs]),
            "watchdog fewer / more / tie": (
                f"{sum(a < b for a, b in pairs)} / {sum(a > b for a, b in pairs)} / "
                f"{sum(a == b for a, b in pairs)}"
            ),
            "where GN solves: watchdog = GN / monotone <= GN": (
                f"{sum(r['watchdog 8'] == r['gauss_newton'] for r in gn)} / "
                f"{sum((r['monotone'] or 10**9) <= r['gauss_newton'] for r in gn)}"
                f" of {len(gn)}"
            ),
            "N>P end L: watchdog / monotone (geo mean)": geo(ratio),
            "N>P watchdog lower / higher": (
                f"{sum(x < 1 for x in ratio)} / {sum(x > 1 for x in ratio)} of {len(ratio)}"
            ),
        })  # fmt: skip
    return out


def main() -> None:
    p = _common.parser("lm_watchdog_seeds", __doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--nets", default=None, help="comma-separated names of tests/nets_zoo.py")
    p.add_argument(
        "--add",
        type=Path,
        nargs="*",
        default=(),
        help="detail CSVs of earlier runs (other --nets) to summarise with this one",
    )
    args = p.parse_args()
    jax.config.update("jax_enable_x64", True)
    nets = ("pbnets", "equinox", "cnn") if args.quick else NETS
    nets = args.nets.split(",") if args.nets else nets
    seeds = args.seeds or (2 if args.quick else 4)
    rows = [earlier for path in args.add for earlier in read_rows(path)]
    for name in nets:
        for dtype in (jnp.float64, jnp.float32):
            rows += rows_for(name, dtype, seeds)
            _common.write_results(args.out / "detail", rows, title="LM watchdog over seeds")
    notes = (
        "N < P: N = 6 and 12 (R < P), trials to L <= 1e-20 L_0 (float64) / 1e-8 L_0 (float32) "
        f"in {UNDER_STEPS}, a miss counted as {int(1.25 * UNDER_STEPS)}; N > P: N = {OVER}, "
        f"lowest L / L_0 in {OVER_STEPS} trials. Per-run rows are in detail/results.csv."
    )
    print(_common.write_results(args.out, summary(rows), title="LM watchdog over seeds",
                                notes=notes))  # fmt: skip


if __name__ == "__main__":
    main()
