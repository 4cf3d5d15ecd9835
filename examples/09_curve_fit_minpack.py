"""A classic curve fit with MINPACK's Levenberg-Marquardt, inside JAX: ``pb.least_squares``.

Not every least-squares problem is a network. For a model with a handful of parameters fitted
to data (here a decay with two exponentials, y = a1 exp(-k1 t) + a2 exp(-k2 t) + c, as in
fluorescence or drug-concentration data) the reference is MINPACK's ``lmder``, the algorithm
behind ``scipy.optimize.least_squares(method="lm")``. ``pb.least_squares(residual_fn, x0,
data)`` runs that algorithm (Moré's trust region, the step on its boundary solved exactly:
``pb.fit`` with ``pb.levenberg_marquardt(damping="minpack")``), so it needs MINPACK's function
evaluations; and being JAX, it runs under ``jit`` and ``vmap``: a bootstrap of hundreds of
refits is one compiled call instead of a Python loop.

Finding: ``pb.least_squares`` reaches scipy's MINPACK minimum in as many trials as scipy
(6 and 6; ``pb.levenberg_marquardt()``'s network defaults 7), and 256 bootstrap refits in one
``jit(vmap(pb.least_squares))`` take 35 ms against 2.6 s for a loop over scipy (2 CPU cores).
For networks use ``pb.fit`` with ``pb.levenberg_marquardt()``: on them MINPACK's trust region
ends far higher (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import time

import _common
import jax

jax.config.update("jax_enable_x64", True)  # a curve fit is judged in float64

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.optimize import least_squares  # noqa: E402

import paribus as pb  # noqa: E402

TRUE = np.array([3.0, 2.5, 0.8, 0.25, 0.1])  # a1, k1, a2, k2, c
T = jnp.linspace(0.0, 10.0, 60)


def model(x, t):
    return x[0] * jnp.exp(-x[1] * t) + x[2] * jnp.exp(-x[3] * t) + x[4]


def residual_fn(x, ys):
    """r_i = model(x, t_i) - y_i; the batch is the data."""
    return model(x, T) - ys


def first_within(costs, best, rtol=1e-9):
    """Trials until the cost is within rtol of the best: costs[0] is the start (scipy's first
    evaluation, paribus's history.loss[0]), costs[k] follows k trials."""
    return int(np.argmax(np.asarray(costs) <= best * (1 + rtol)))


def main(quick: bool = False, out=_common.DEFAULT_OUT):
    # --- Data: the curve plus noise of 0.01 ----------------------------------------------------
    rng = np.random.default_rng(0)
    ys = jnp.asarray(np.asarray(model(TRUE, T)) + 0.01 * rng.normal(size=T.size))
    x0 = jnp.array([1.0, 1.0, 1.0, 0.1, 0.0])

    # --- scipy's MINPACK, every evaluation's cost recorded -------------------------------------
    fun, jac = jax.jit(residual_fn), jax.jit(jax.jacfwd(residual_fn))
    costs = []

    def scipy_fun(x):
        r = np.asarray(fun(jnp.asarray(x), ys))
        costs.append(0.5 * r @ r)
        return r

    ref = least_squares(scipy_fun, np.asarray(x0), lambda x: np.asarray(jac(jnp.asarray(x), ys)),
                        method="lm", xtol=1e-14, ftol=1e-14, gtol=1e-14)  # fmt: skip
    print(f"scipy lm: cost {ref.cost:.10g} after {ref.nfev} evaluations ({ref.message})")

    # --- paribus: MINPACK's algorithm, and LM's defaults for networks --------------------------
    runs = {
        "pb.least_squares": pb.least_squares(residual_fn, x0, ys),
        "pb.levenberg_marquardt()": pb.fit(residual_fn, x0, pb.levenberg_marquardt(), ys,
                                           max_steps=500),
    }  # fmt: skip
    for name, result in runs.items():
        print(f"{name}: cost {float(result.history.loss[-1]):.10g} after {result.steps} trials "
              f"({result.stop_reason}, converged {result.converged})")  # fmt: skip
    best = min(ref.cost, *(float(np.min(r.history.loss)) for r in runs.values()))
    count = {"scipy lm": first_within(costs, best)}
    for name, result in runs.items():
        count[name] = first_within(result.history.loss, best)  # loss[k]: L after k trials
    mine = np.asarray(runs["pb.least_squares"].params)
    gap = float(np.max(np.abs(mine - ref.x) / np.abs(ref.x)))
    print("trials to the minimum (1e-9 relative):", count)

    # --- A bootstrap: refit on resampled residuals, all at once ---------------------------------
    n_boot = 32 if quick else 256
    fitted = model(mine, T)
    resid = np.asarray(ys - fitted)
    picks = rng.integers(0, T.size, size=(n_boot, T.size))
    samples = jnp.asarray(np.asarray(fitted)[None, :] + resid[picks])
    refit = jax.jit(jax.vmap(lambda y: pb.least_squares(residual_fn, jnp.asarray(mine), y,
                                                        max_steps=100).params))  # fmt: skip
    jax.block_until_ready(refit(samples))  # compile once
    start = time.perf_counter()
    boot = np.asarray(jax.block_until_ready(refit(samples)))
    ours = time.perf_counter() - start
    start = time.perf_counter()
    loop = np.stack([
        least_squares(lambda x, y=y: np.asarray(fun(jnp.asarray(x), y)), np.asarray(mine),
                      lambda x, y=y: np.asarray(jac(jnp.asarray(x), y)), method="lm").x
        for y in samples
    ])  # fmt: skip
    theirs = time.perf_counter() - start
    agree = float(np.max(np.abs(boot - loop) / np.abs(loop)))
    spread = boot.std(axis=0)
    print(f"bootstrap ({n_boot} refits): standard errors a1, k1, a2, k2, c = {np.round(spread, 4)}")
    print(f"  one jit(vmap(pb.least_squares)) {ours * 1e3:.0f} ms, "
          f"scipy loop {theirs * 1e3:.0f} ms, parameters agree to {agree:.1e}")  # fmt: skip

    # --- Picture: the fit, and the cost per evaluation ------------------------------------------
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(T, ys, ".", label="data")
    left.plot(T, fitted, "-", label="fit (pb.least_squares)")
    left.set(xlabel="t", ylabel="y", title="y = a1 exp(-k1 t) + a2 exp(-k2 t) + c")
    left.legend()

    def above(c):
        return np.maximum(np.asarray(c) - best, 1e-16)

    right.semilogy(above(costs), "o-", label="scipy lm (every evaluation)")
    for name, result in runs.items():
        right.semilogy(above(result.history.loss), ".-", label=f"{name} (kept points)")
    right.set(xlabel="evaluations / trials", ylabel="cost - best", title="convergence")
    right.legend()
    print("plot:", _common.save_figure(fig, out, "09_curve_fit.png"))

    ours_k, scipy_k, default_k = (
        count["pb.least_squares"],
        count["scipy lm"],
        count["pb.levenberg_marquardt()"],
    )
    print(
        f"FINDING: pb.least_squares reaches scipy's MINPACK minimum (parameters within "
        f"{gap:.1e}) in {ours_k} trials against scipy's {scipy_k} (pb.levenberg_marquardt()'s "
        f"defaults: {default_k}); "
        f"{n_boot} bootstrap refits in one jit(vmap(pb.least_squares)) took {ours * 1e3:.0f} ms "
        f"against {theirs * 1e3:.0f} ms for scipy's loop"
    )


if __name__ == "__main__":
    _common.run(main, plot=True)
