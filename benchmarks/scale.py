"""Benchmark: the dual LM step at scale, against a batch gradient; data-parallel over devices.

Question (issue 7): on a wide MLP with far more parameters than residuals (32-2048-2048-1,
N = 1024: P = 4,265,985, N*m = 1024), does one dual (kernel) Levenberg-Marquardt step cost no
more than 3 batch gradients? A hand-written JAX prototype measured 1.3 ms against 0.53 ms on an
H200 (DESIGN.md).

The dual step is delta = -J^T (J J^T + lambda I)^(-1) r: the structured NTK J J^T from per-layer
activations and backprop signals (J never formed), one Cholesky of (N*m)^2, one vjp, and the
loss at the trial point (what LM needs for its gain ratio). Rows:

- ``batch gradient``: 1/2 ||r||^2 and g = J^T r by one vjp (``pb.loss_and_grad``), the baseline;
- ``residual NTK``: ``pb.curvature.residual_ntk`` (R, R);
- ``LM step (paribus, dual)``: one jitted ``pb.levenberg_marquardt(solve="dual").update``,
  whose Cholesky step is refined by preconditioned CG (one JVP to check it, then a VJP and a JVP
  per iteration) when lambda is under 10 eps ||J J^T||_F, where the formed kernel's rounding
  could swamp it (float32, large P);
- ``LM step (paribus, dual, bare Cholesky)``: the same with ``dual_refine_steps=0``;
- ``LM step (paribus, dual, LM's first lambda ...)``: the default step at the damping LM starts
  from, 1e-3 max diag(J^T J), instead of the prototype's absolute 0.01;
- on an accelerator, ``LM step (paribus, dual, matmul precision highest)``: the default step
  traced under ``jax.default_matmul_precision("highest")`` (true float32 products instead of
  TF32 / bfloat16, what a float32-accurate step costs there);
- ``LM step (plain JAX, dual)``: the hand-written prototype, the twin the paribus step is held to.

Every paribus row says what LM did with its trial (accepted or rejected, and the gain ratio):
a step at a lambda below the kernel's rounding can be fast and useless. With more than one
device visible, the gradient and both LM steps are timed again data-parallel
(batch split over every device, params replicated: ``pb.sharding``). float32 by default.

Run: ``python benchmarks/scale.py`` (full) or ``--quick`` (the issue's case and a small one).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

import paribus as pb  # noqa: E402
from paribus import sharding  # noqa: E402

# (sizes, N); reference figures from DESIGN.md (plain JAX, no paribus): batch gradient and dual
# LM step in ms, on one H200 (GPU, float32) and on the 2-core CPU reference machine.
CASES = {
    "1-64-64-1": ([1, 64, 64, 1], 512),
    "16-512-512-1": ([16, 512, 512, 1], 512),
    "16-1024-1024-1": ([16, 1024, 1024, 1], 1024),
    "32-2048-2048-1": ([32, 2048, 2048, 1], 1024),
}
REFERENCE = {
    "gpu": {
        "1-64-64-1": (0.29, 0.42),
        "16-1024-1024-1": (0.22, 1.05),
        "32-2048-2048-1": (0.53, 1.30),
    },
    "cpu": {"1-64-64-1": (0.23, 1.8), "16-512-512-1": (2.9, 10.5)},
}
# --quick: the case on an accelerator; on a CPU the largest CPU reference case instead (J
# is never formed, but each 32-2048-2048-1 row takes seconds there: ``--case
# 32-2048-2048-1:1024`` runs it, about a minute on 2 cores).
QUICK = {"gpu": ("1-64-64-1", "32-2048-2048-1"), "cpu": ("1-64-64-1", "16-512-512-1")}
FULL = {"gpu": ("1-64-64-1", "16-1024-1024-1", "32-2048-2048-1"), "cpu": tuple(CASES)[:3]}
DAMPING = 1e-2


def problem(sizes, n, dtype):
    init, apply = pb.nets.mlp(sizes, "tanh", dtype=dtype)
    params = init(jax.random.key(0))
    kx, ky = jax.random.split(jax.random.key(1))
    xs = jax.random.normal(kx, (n, sizes[0]), dtype)
    ys = jax.random.normal(ky, (n, sizes[-1]), dtype)
    return apply, params, (xs, ys)


def plain_dual_step(apply, params, batch, lam):
    """delta = -J^T (K + lam I)^(-1) r with K = sum_l (A_l A_l^T + 1) * (D_l D_l^T) for m = 1,
    A_l the layer inputs (N, n_(l-1)) and D_l the backprop signals (N, n_l); then L(theta+delta).
    """
    xs, ys = batch
    layers = params["layers"]
    inputs, preacts, a = [], [], xs
    for i, layer in enumerate(layers):
        z = a @ layer["w"] + layer["b"]
        inputs.append(a)
        preacts.append(z)
        a = z if i == len(layers) - 1 else jnp.tanh(z)
    r = (a - ys)[:, 0]
    signal = jnp.ones_like(preacts[-1])
    kernel = (inputs[-1] @ inputs[-1].T + 1) * (signal @ signal.T)
    for layer_above, z, x_in in zip(layers[:0:-1], preacts[-2::-1], inputs[-2::-1], strict=True):
        signal = (signal @ layer_above["w"].T) * (1 - jnp.tanh(z) ** 2)
        kernel = kernel + (x_in @ x_in.T + 1) * (signal @ signal.T)
    eye = jnp.eye(r.shape[0], dtype=r.dtype)
    coef = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(kernel + lam * eye), r)
    _, pullback = jax.vjp(lambda p: jax.vmap(apply, (None, 0))(p, xs)[:, 0], params)
    (step,) = pullback(-coef)
    trial = jax.tree.map(jnp.add, params, step)
    trial_r = jax.vmap(apply, (None, 0))(trial, xs) - ys
    return step, 0.5 * jnp.sum(trial_r**2)


def paribus_lm(residual_fn, refine: int = 10, damping: float = DAMPING):
    """One jitted dual LM update of ``pb.levenberg_marquardt``, or None when it is not there.

    ``refine``: ``dual_refine_steps``; 0 is the bare Cholesky step, the prototype's maths.
    ``damping``: lambda, absolute (``DAMPING`` as in the prototype by default).
    """
    if not hasattr(pb, "levenberg_marquardt"):
        return None, "pb.levenberg_marquardt not available"
    opt = pb.levenberg_marquardt(
        solve="dual", init_damping=damping, init_damping_relative=False, dual_refine_steps=refine
    )

    def step(params, batch, state):
        return opt.update(None, state, params, residual_fn=residual_fn, batch=batch)

    return (opt, step), ""


def _device_bytes() -> int | None:
    """Memory of device 0 as the allocator sees it (None on a CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def _measure(fn, args, repeats: int) -> dict:
    """Compile ``fn`` on ``args`` (timed), refuse what would not fit the device, time runs."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    limit = _device_bytes()
    stats = compiled.memory_analysis()
    if limit and stats is not None:
        need = stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
        if need > 0.9 * limit:
            return {"skip": f"needs {need / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB"}
    t = _common.time_fn(lambda: compiled(*args), repeats=repeats, min_time=0.2)
    return {"run_s": t["run_s"], "compile_s": compile_s, "out": compiled(*args)}


def _trial(out) -> str:
    """What a paribus LM update did with its trial: accepted or not, and its gain ratio."""
    state = out[1] if isinstance(out, tuple) and len(out) == 2 else None
    if not hasattr(state, "gain_ratio"):
        return ""
    verdict = "accepted" if bool(state.step_info.accepted) else "rejected"
    return f"{verdict}, rho = {float(state.step_info.gain_ratio):.3g}"


def time_case(name, sizes, n, ref, *, dtype, repeats, mesh=None):
    apply, params, batch = problem(sizes, n, dtype)
    residual_fn = pb.regression_residuals(apply)
    where = "1 device" if mesh is None else f"{mesh.size} devices"
    if mesh is not None:
        batch = sharding.shard_batch(batch, mesh)
        params = sharding.replicate(params, mesh)
    n_params = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))
    base = {"mlp": name, "N": n, "P": n_params, "placement": where}

    methods = [
        ("batch gradient", lambda p, b: pb.loss_and_grad(residual_fn, p, b)[:2], (), ref[0]),
    ]
    if mesh is None:
        ntk = lambda p, b: pb.curvature.residual_ntk(residual_fn, p, b)  # noqa: E731
        methods.append(("residual NTK", ntk, (), None))
    lm, why = paribus_lm(residual_fn)
    refinable = {"LM step (paribus, dual)": DAMPING}  # default steps: name -> their lambda
    if lm is not None:
        opt, step = lm
        methods.append(("LM step (paribus, dual)", step, (opt.init(params),), ref[1]))
        opt, step = paribus_lm(residual_fn, refine=0)[0]
        bare = "LM step (paribus, dual, bare Cholesky)"
        methods.append((bare, step, (opt.init(params),), ref[1]))
        if mesh is None:  # LM's own first lambda: 1e-3 max diag(J^T J) (Nielsen, relative)
            diag = jax.jit(pb.curvature.residual_jtj_diag, static_argnums=0)
            lam0 = 1e-3 * float(jnp.max(diag(residual_fn, params, batch)))
            opt, step = paribus_lm(residual_fn, damping=lam0)[0]
            name = f"LM step (paribus, dual, LM's first lambda = 1e-3 max diag JᵀJ = {lam0:.3g})"
            methods.append((name, step, (opt.init(params),), None))
            refinable[name] = lam0
        if jax.default_backend() != "cpu":  # float32 products are TF32 / bfloat16 by default
            opt, step = lm

            def highest(p, b, s, step=step):
                with jax.default_matmul_precision("highest"):
                    return step(p, b, s)

            name = "LM step (paribus, dual, matmul precision highest)"
            methods.append((name, highest, (opt.init(params),), None))
    plain = lambda p, b: plain_dual_step(apply, p, b, DAMPING)  # noqa: E731
    methods.append(("LM step (plain JAX, dual)", plain, (), ref[1]))

    rows, grad_s = [], None
    switch = None
    if mesh is None:  # does the default paribus step refine here? (lam < 10 eps ||K||_F)
        from paribus.solvers import _linear

        kernel = jax.jit(pb.curvature.residual_ntk, static_argnums=0)(residual_fn, params, batch)
        switch = float(10 * _linear.rounding_floor(kernel))
        del kernel
    for method, fn, extra, ref_ms in methods:
        row = base | {"method": method}
        if switch is not None and method in refinable:
            mode = "checked, refined if need be" if refinable[method] < switch else "bare"
            row["method"] += f" [10 eps ‖K‖_F = {switch:.2g}: {mode}]"
        try:
            t = _measure(fn, (params, batch, *extra), repeats)
        except Exception as err:  # noqa: BLE001 - a failed method is a row, not a lost run
            t = {"skip": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"}
        if "skip" in t:
            rows.append(row | {"run": t["skip"]})
            continue
        grad_s = t["run_s"] if grad_s is None else grad_s
        rows.append(
            row
            | {
                "run": _common.fmt_ms(t["run_s"]),
                "compile": _common.fmt_ms(t["compile_s"]),
                "x batch grad": f"{t['run_s'] / grad_s:.2f}",
                "reference (DESIGN.md)": f"{ref_ms} ms" if ref_ms and mesh is None else "",
                "trial": _trial(t["out"]),
                "run_ms": t["run_s"] * 1e3,
            }
        )
    if lm is None:
        rows.append(base | {"method": "LM step (paribus, dual)", "run": f"skipped: {why}"})
    return rows


def check_twins(dtype) -> str:
    """The paribus dual step equals the plain-JAX prototype on a small case (a benchmark of the
    wrong numbers is worth nothing)."""
    apply, params, batch = problem([3, 32, 32, 1], 64, dtype)
    step_plain, _ = jax.jit(lambda p, b: plain_dual_step(apply, p, b, DAMPING))(params, batch)
    lm, why = paribus_lm(pb.regression_residuals(apply))
    if lm is None:
        return f"paribus dual step not checked: {why}"
    opt, step = lm
    updates, state = jax.jit(step)(params, batch, opt.init(params))
    if not bool(
        state.step_info.accepted
    ):  # a rejected trial returns zeros; its norm is in the state
        ref = float(optax.tree.norm(step_plain))
        err = abs(float(state.step_info.step_norm) - ref) / ref
        return (
            f"paribus dual step norm vs plain-JAX prototype (rejected trial): rel. diff {err:.1e}"
        )
    err = max(
        float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(v)) + 1e-30))
        for u, v in zip(jax.tree.leaves(updates), jax.tree.leaves(step_plain), strict=True)
    )
    return f"paribus dual update vs plain-JAX prototype (3-32-32-1, N=64): max rel. diff {err:.1e}"


def main() -> None:
    p = _common.parser("scale", __doc__.splitlines()[0])
    p.add_argument(
        "--case",
        action="append",
        default=None,
        help="extra MLP case WIDTHS:N, e.g. 8-256-256-1:256 (repeatable; replaces the defaults)",
    )
    args = p.parse_args()
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.x64 else jnp.float32
    repeats = args.repeats or (5 if args.quick else 20)
    platform = "cpu" if jax.devices()[0].platform == "cpu" else "gpu"
    names = (QUICK if args.quick else FULL)[platform]
    for spec in args.case or ():
        widths, n = spec.split(":")
        CASES[widths] = ([int(w) for w in widths.split("-")], int(n))
    names = tuple(spec.split(":")[0] for spec in args.case) if args.case else names
    rows = []
    for name in names:
        sizes, n = CASES[name]
        ref = REFERENCE[platform].get(name, (None, None))
        print(f"scale: {name}, N={n}", flush=True)
        rows += time_case(name, sizes, n, ref, dtype=dtype, repeats=repeats)
        if jax.device_count() > 1:
            mesh = sharding.data_mesh()
            if n % mesh.size == 0:
                rows += time_case(name, sizes, n, ref, dtype=dtype, repeats=repeats, mesh=mesh)
    note = check_twins(dtype)
    goal = [
        r
        for r in rows
        if r["mlp"] == "32-2048-2048-1" and r["method"].startswith("LM") and "run_ms" in r
    ]
    verdicts = "; ".join(
        f"{r['method']} on {r['placement']}: {r['x batch grad']}x batch gradient "
        f"({'meets' if float(r['x batch grad']) <= 3 else 'misses'} the <= 3x goal)"
        for r in goal
    )
    verdicts = verdicts or "32-2048-2048-1 not run here (--quick on a CPU runs smaller cases)"
    notes = (
        f"{jnp.dtype(dtype).name}; lambda = {DAMPING}; "
        f"median of >= {repeats} runs; compile time apart. Goal: dual LM step on "
        f"32-2048-2048-1, N = 1024, <= 3x a batch gradient. {verdicts}. Check: {note}."
    )
    for r in rows:
        r.pop("run_ms", None)
    md = _common.write_results(args.out, rows, title="Dual LM step at scale", notes=notes)
    print(md)


if __name__ == "__main__":
    main()
