"""Benchmark: LM with the watchdog against monotone LM on the networks users bring.

Question (issue 11 item 2, follow-up): does the watchdog (``pb.levenberg_marquardt(watchdog=8)``)
help or hurt on networks that are not ``pb.nets`` MLPs: a closure, Equinox, Flax NNX,
a CNN, attention, an RNN (``tests/nets_zoo.py``), in float64 and float32? And is it as fast
as Gauss-Newton where Gauss-Newton works (``pb.gauss_newton()`` runs alongside)?

Setup: each network of ``tests/nets_zoo.py`` (2 outputs) on two data sets, targets
t = (sin(s), cos(2 s)) with s the sum of an example's inputs: N = 6 examples (the zoo's own
inputs; R = 12 < P: interpolation) and N = 256 random normal inputs (R = 512 > P). LM with
each watchdog length of ``--watchdog`` (default 8), monotone LM (``watchdog=None``) and GN run
``pb.fit`` for 100 trials from the same parameters. Reported: L / L_0 after 10,
30 and 100 trials, the first trial with L <= 1e-20 L_0 (float64) / 1e-8 L_0 (float32) for
N = 6, and what the watchdog did (excursions that failed and returned to their anchor; the
largest rise of L above the lowest before it, as a factor). Nothing is timed.

Run: ``python benchmarks/lm_watchdog_nets.py`` (about 4 minutes on one CPU core; 2 minutes
more per extra watchdog length, e.g. ``--watchdog 2,4,8``).
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
from nets_zoo import ZOO  # noqa: E402

import paribus as pb  # noqa: E402

STEPS = 100


def methods(watchdogs):
    """Name -> optimiser: LM with each watchdog length, monotone LM, GN."""
    out = {f"watchdog={k}": pb.levenberg_marquardt(watchdog=k) for k in watchdogs}
    out["monotone"] = pb.levenberg_marquardt(watchdog=None)
    out["gauss_newton"] = pb.gauss_newton()
    return out


def data(xs, n, dtype, key=None):
    """(inputs, targets (sin s, cos 2 s)): the zoo's own inputs, or n normal draws from key."""
    if n is not None:
        key = jax.random.key(2) if key is None else key
        xs = jax.random.normal(key, (n, *xs.shape[1:]), dtype)
    s = jnp.sum(xs.reshape(xs.shape[0], -1), axis=1, keepdims=True)
    return xs, jnp.concatenate([jnp.sin(s), jnp.cos(2 * s)], axis=1).astype(dtype)


def first_below(loss, level):
    hits = np.nonzero(loss <= level)[0]
    return int(hits[0]) if hits.size else None


def rows_for(name, dtype, n, watchdogs=(8,)):
    apply, params, xs = ZOO[name](dtype=dtype)
    batch = data(xs, n, dtype)
    fn = pb.regression_residuals(apply)
    n_params = sum(np.size(x) for x in jax.tree.leaves(params))
    rows = []
    for method, opt in methods(watchdogs).items():
        result = pb.fit(fn, params, opt, batch, max_steps=STEPS,
                        grad_tol=0.0, target_loss=0.0)  # fmt: skip
        loss = np.asarray(result.history.loss, float)
        rel = loss / loss[0]
        best_before = np.minimum.accumulate(loss)[:-1]
        rise = float(np.max(loss[1:] / best_before)) if loss.size > 1 else 1.0
        level = 1e-20 if dtype == jnp.float64 else 1e-8
        state = result.state.opt_state
        rows.append({
            "dtype": jnp.dtype(dtype).name, "network": name, "N": batch[0].shape[0],
            "P": n_params, "method": method,
            "L/L0 @10": float(rel[min(10, rel.size - 1)]),
            "L/L0 @30": float(rel[min(30, rel.size - 1)]),
            "L/L0 end": float(np.min(rel)), "trials": int(result.steps),
            "stop": str(result.stop_reason.name),
            "trials to level": first_below(rel, level) if n is None else None,
            "failed excursions": int(state.failures) if hasattr(state, "failures") else None,
            "largest rise": rise, "finite": bool(np.all(np.isfinite(loss))),
        })  # fmt: skip
    return rows


def main() -> None:
    p = _common.parser("lm_watchdog_nets", __doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float64,float32")
    p.add_argument("--watchdog", default="8", help="','-separated watchdog lengths to run")
    args = p.parse_args()
    watchdogs = [int(k) for k in args.watchdog.split(",")]
    rows = []
    for dt in args.dtypes.split(","):
        jax.config.update("jax_enable_x64", dt == "float64")
        for name in ZOO:
            for n in (None, 256):
                rows += rows_for(name, jnp.dtype(dt), n, watchdogs)
                print(name, dt, n, flush=True)
    notes = ("L/L0 after 10 and 30 trials and the lowest over 100; 'trials to level': first "
             "trial with L <= 1e-20 L0 (float64) / 1e-8 L0 (float32), N = 6 only.")  # fmt: skip
    print(_common.write_results(args.out, rows, title="LM watchdog on the networks users bring",
                                notes=notes))  # fmt: skip


if __name__ == "__main__":
    main()
