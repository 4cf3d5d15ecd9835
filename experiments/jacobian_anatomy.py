"""The anatomy of the Jacobian of a network's residuals, and what each way of computing it costs.

Question: what are the rows, the columns and the spectrum of J = dr/dtheta (one row per example
and output, one column per parameter), and which Jacobian mode (per-example reverse, forward,
reverse over the batch, structured) is cheapest as N and P grow?

Setup: anatomy (float64): a 1-4-1 tanh MLP (P = 13) on N = 10 points of y = sin(pi x), each
identity checked by a second, independent route: row i of J is the per-example gradient of r_i
(``pb.per_example_grads``); column k is the partial derivative of every residual with respect to
theta_k alone (``pb.partial``, one JVP, and ``pb.nudge``, a central difference); J^T r is the
gradient of L = 1/2 ||r||^2 (``pb.loss_and_grad``); the squared singular values of J are the
nonzero eigenvalues of the NTK J J^T (``pb.ntk``). Spectrum (float64, seeds batched with
``jax.vmap``): NTK eigenvalues of 1-H-1 tanh MLPs on N = 64 points, H in {4, 16, 64, 256}, so P
runs from below N to far above it. Cost (float32, compile time apart, median of repeats, the
harness's ``time_call``): every mode of ``pb.jacobian`` on a 4-H-H-1 tanh MLP, first with H = 32
and N growing, then with N = 256 and H growing; a mode whose estimated work exceeds a budget is
skipped.

Finding (``experiments/run_all.py`` of 2026-12-02, 8 seeds, one CPU core; results/REPORT.md):
every identity holds to 5.5e-16 in float64 (rows are per-example gradients, columns the partial
derivatives, J^T r = g, J J^T = NTK, sigma^2 = its eigenvalues; nudging agrees to 1.9e-11). J
is badly conditioned: at H = 256 (P = 769 > N = 64) the rank bound is 64 but only 7 NTK
eigenvalues exceed 1e-6 of the largest. Per-example rows are the fastest way to J at every N and
P measured: reverse mode over the whole batch is up to 400x slower (N = 4..1,024), forward mode
6-390x (P = 45..1,249).

    python experiments/jacobian_anatomy.py            # a few minutes on 2 CPU cores
    python experiments/jacobian_anatomy.py --quick    # seconds (CI)
"""

from __future__ import annotations

import math
import time

import _harness as h  # first: it sets OpenBLAS's threads before jax loads
import jax
import jax.numpy as jnp
import numpy as np

import paribus as pb

NAME = "jacobian_anatomy"
MODES = ("structured", "per_example", "fwd", "rev")
COLORS = {"structured": "C0", "per_example": "C1", "fwd": "C2", "rev": "C3"}


# --------------------------------------------------------------------------------------------
# Anatomy: rows, columns, gradient, spectrum (float64).


def _sine_data(n: int, dtype) -> tuple[jax.Array, jax.Array]:
    xs = jnp.linspace(-1.0, 1.0, n, dtype=dtype)[:, None]
    return xs, jnp.sin(jnp.pi * xs)


def anatomy(seed: int) -> dict:
    """Every identity of the module docstring, checked by an independent route, in float64."""
    dt = jnp.float64
    init, apply = pb.nets.mlp([1, 4, 1], "tanh", b_init=jax.nn.initializers.normal(0.5), dtype=dt)
    params = init(jax.random.key(seed))
    batch = _sine_data(10, dt)
    residual_fn = pb.regression_residuals(apply)
    jac = pb.jacobian(apply, params, batch[0])
    J = np.asarray(jac.matrix)
    n, p = J.shape

    # Rows: the gradient of one example's residual r_i (m = 1, so a scalar per example).
    def one_residual(prm, example):
        return residual_fn.example_fn(prm, example)[0]

    rows = pb.per_example_grads(one_residual, params, batch)
    rows = np.asarray(jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(rows))

    # Columns: d r / d theta_k with every other parameter held fixed, one label at a time.
    def all_residuals(prm):
        return residual_fn(prm, batch).reshape(-1)

    # One jitted vmap over the parameter index k (both accept a traced integer k).
    ks = jnp.arange(p)
    cols_jvp = np.asarray(
        jax.jit(jax.vmap(lambda k: pb.partial(all_residuals, params, k), out_axes=1))(ks)
    )
    cols_fd = np.asarray(
        jax.jit(jax.vmap(lambda k: pb.nudge(all_residuals, params, k), out_axes=1))(ks)
    )

    loss, grad, r = pb.loss_and_grad(residual_fn, params, batch)
    g = np.asarray(jax.flatten_util.ravel_pytree(grad)[0])
    r = np.asarray(r).reshape(-1)
    K = np.asarray(pb.ntk(apply, params, batch[0]))
    sing = np.linalg.svd(J, compute_uv=False)
    eig = np.sort(np.linalg.eigvalsh(K))[::-1]
    k_top = min(n, p)
    scale = np.max(np.abs(J))
    return {
        "J": J,
        "labels": jac.labels,
        "r": r,
        "g": g,
        "loss": float(loss),
        "xs": np.asarray(batch[0]).reshape(-1),
        "fd_col": cols_fd,
        "rows": rows,
        "err_rows": float(np.max(np.abs(rows - J)) / scale),
        "err_cols_jvp": float(np.max(np.abs(cols_jvp - J)) / scale),
        "err_cols_fd": float(np.max(np.abs(cols_fd - J)) / scale),
        "err_grad": float(np.max(np.abs(J.T @ r - g)) / np.max(np.abs(g))),
        "err_ntk": float(np.max(np.abs(J @ J.T - K)) / np.max(np.abs(K))),
        "err_spectrum": float(np.max(np.abs(sing[:k_top] ** 2 - eig[:k_top])) / eig[0]),
        "sing": sing,
        "eig": eig,
    }


def spectra(widths, n: int, seeds: int) -> list[dict]:
    """NTK eigenvalues of 1-H-1 tanh MLPs on n points, over seeds batched with ``jax.vmap``."""
    dt = jnp.float64
    xs, _ = _sine_data(n, dt)
    out = []
    for width in widths:
        init, apply = pb.nets.mlp(
            [1, width, 1], "tanh", b_init=jax.nn.initializers.normal(0.5), dtype=dt
        )

        def eigs(key, init=init, apply=apply):
            params = init(key)
            K = pb.ntk(apply, params, xs)
            J = pb.jacobian(apply, params, xs).matrix
            return jnp.linalg.eigvalsh(K)[::-1], jnp.linalg.svd(J, compute_uv=False)

        keys = jax.random.split(jax.random.key(1), seeds)
        eig, sing = (np.asarray(a) for a in jax.jit(jax.vmap(eigs))(keys))
        p = 3 * width + 1
        k_top = min(n, p)
        tol = eig[:, :1] * n * np.finfo(np.float64).eps
        out.append(
            {
                "H": width,
                "P": p,
                "N": n,
                "eig": eig,
                "rank_bound": k_top,
                "numerical_rank": np.sum(eig > tol, axis=1),
                "rank_1e-6": np.sum(eig > 1e-6 * eig[:, :1], axis=1),
                "cond_top10": eig[:, 0] / eig[:, min(9, k_top - 1)],
                "sv2_vs_eig": float(
                    np.max(np.abs(sing[:, :k_top] ** 2 - eig[:, :k_top]) / eig[:, :1])
                ),
            }
        )
    return out


# --------------------------------------------------------------------------------------------
# Cost of each mode (float32).


def _work(mode: str, n: int, p: int, width: int) -> float:
    """Rough flop count of one mode (for skipping runs that would not finish)."""
    if mode == "fwd":  # P tangents pushed through every example
        return 2.0 * n * p * p
    if mode == "rev":  # N cotangents pulled back through the whole batch
        return 3.0 * n * n * p
    if mode == "per_example":
        return 6.0 * n * p + n * width * width
    return 2.0 * n * p


def cost_point(n: int, width: int, *, budget: float, repeats: int) -> list[dict]:
    """Time every mode of pb.jacobian on a 4-H-H-1 tanh MLP and N random inputs."""
    init, apply = pb.nets.mlp([4, width, width, 1], "tanh")
    params = init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (n, 4))
    p = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))
    rows = []
    ref = None
    for mode in MODES:
        row = {"part": "cost", "mode": mode, "N": n, "H": width, "P": p}
        work = _work(mode, n, p, width)
        if work > budget:
            rows.append({**row, "status": f"skipped (est. {work:.1e} flops > {budget:.0e})"})
            continue
        fn = jax.jit(lambda prm, x, mode=mode: pb.jacobian(apply, prm, x, mode=mode).matrix)
        mat, compile_s, run_s = h.time_call(fn, params, xs, repeats=repeats)
        if run_s < 0.05:  # fast calls are the noisiest: take the median of more of them
            mat, _, run_s = h.time_call(fn, params, xs, repeats=int(min(200, 0.25 / run_s)))
        mat = np.asarray(mat)
        if ref is None:
            ref = mat
        err = float(np.max(np.abs(mat - ref)) / max(np.max(np.abs(ref)), 1e-30))
        rows.append(
            {
                **row,
                "status": "ok",
                "compile_s": compile_s,
                "run_s": run_s,
                "rel_diff_vs_structured": err,
            }
        )
    return rows


def _crossover(rows: list[dict], axis: str, a: str, b: str, *, tie: float = 1.3) -> str:
    """Where mode a stops being faster than mode b along axis (log-linear interpolation).

    Ratios within a factor ``tie`` of 1 count as ties: on a shared machine single timings
    wander by that much, and a "crossover" between two tied points would be noise.
    """
    t = {}
    for row in rows:
        if row.get("status") == "ok":
            t.setdefault(row["mode"], {})[row[axis]] = row["run_s"]
    common = sorted(set(t.get(a, {})) & set(t.get(b, {})))
    if len(common) < 2:
        return f"{a} vs {b}: not enough common points"
    ratio = [math.log(t[a][x] / t[b][x]) for x in common]
    clear = [(x, r) for x, r in zip(common, ratio, strict=True) if abs(r) > math.log(tie)]
    for (x0, r0), (x1, r1) in zip(clear, clear[1:], strict=False):
        if (r0 < 0) != (r1 < 0):
            frac = r0 / (r0 - r1)
            xc = math.exp(math.log(x0) + frac * (math.log(x1) - math.log(x0)))
            first, second = (a, b) if r0 < 0 else (b, a)
            return (
                f"{first} is faster than {second} below {axis} ~ {xc:,.0f}, slower above "
                f"(ratio {a}/{b}: {math.exp(r0):.2g} at {axis}={x0:,}, "
                f"{math.exp(r1):.2g} at {axis}={x1:,})"
            )
    span = f"{axis} = {common[0]:,}..{common[-1]:,}"
    lo, hi = math.exp(min(ratio)), math.exp(max(ratio))
    if not clear:
        return f"{a} and {b} tie within a factor {tie} over {span} (ratio {lo:.2g}..{hi:.2g})"
    faster = a if clear[-1][1] < 0 else b
    return (
        f"no crossover over {span}: {faster} is faster wherever they differ by more than "
        f"{tie}x (time ratio {a}/{b} between {lo:.2g} and {hi:.2g})"
    )


# --------------------------------------------------------------------------------------------
# Plots.


def plot_anatomy(a: dict):
    import matplotlib.pyplot as plt

    J, labels, n = a["J"], a["labels"], a["J"].shape[0]
    row_i, col_k = 7, labels.index("layers[0].w[0,2]")
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0, 0]
    lim = np.max(np.abs(J))
    im = ax.imshow(J, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=70, fontsize=8)
    ax.set_yticks(range(n), [f"x={x:+.2f}" for x in a["xs"]], fontsize=8)
    ax.axhline(row_i, color="k", lw=0.8, ls="--")
    ax.axvline(col_k, color="k", lw=0.8, ls="--")
    ax.set_title(f"J = dr/dtheta ({n} x {len(labels)}): rows = examples, columns = parameters")
    fig.colorbar(im, ax=ax, fraction=0.04)

    ax = axes[0, 1]
    ax.bar(range(len(labels)), J[row_i], color="C0", label="row of J")
    ax.plot(
        range(len(labels)),
        a["rows"][row_i],
        "x",
        color="C1",
        ms=9,
        mew=2,
        label="pb.per_example_grads of r_i",
    )
    ax.legend()
    ax.set_xticks(range(len(labels)), labels, rotation=70, fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"row {row_i} = gradient of r_{row_i} (example x = {a['xs'][row_i]:+.2f})")

    ax = axes[1, 0]
    ax.plot(a["xs"], J[:, col_k], "o-", label="column of J (JVP with e_k)")
    ax.plot(a["xs"], a["fd_col"][:, col_k], "x", ms=10, label="nudge: central difference")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("example x")
    ax.set_ylabel("d r_i / d theta_k")
    ax.set_title(f"column '{labels[col_k]}': how every residual moves with that weight alone")
    ax.legend()

    ax = axes[1, 1]
    width = 0.4
    idx = np.arange(len(labels))
    ax.bar(idx - width / 2, J.T @ a["r"], width, label="J^T r")
    ax.bar(idx + width / 2, a["g"], width, label="gradient of 1/2||r||^2 (one VJP)")
    ax.set_xticks(range(len(labels)), labels, rotation=70, fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"J^T r = g (max relative difference {a['err_grad']:.1e})")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_spectra(specs: list[dict]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, s in enumerate(specs):
        eig = np.maximum(s["eig"] / s["eig"][:, :1], 1e-20)
        idx = np.arange(1, eig.shape[1] + 1)
        med = np.median(eig, axis=0)
        ax.fill_between(idx, eig.min(0), eig.max(0), color=f"C{i}", alpha=0.2)
        ax.plot(idx, med, color=f"C{i}", label=f"H={s['H']}, P={s['P']} (N={s['N']})")
        if s["P"] < s["N"]:
            ax.axvline(s["P"], color=f"C{i}", ls=":", lw=1)
    ax.axhline(np.finfo(np.float64).eps, color="gray", ls="--", lw=0.8)
    ax.text(1, np.finfo(np.float64).eps * 2, "float64 eps", color="gray", fontsize=8)
    ax.axhline(np.finfo(np.float32).eps, color="gray", ls="-.", lw=0.8)
    ax.text(1, np.finfo(np.float32).eps * 2, "float32 eps", color="gray", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(1e-20, 2)
    ax.set_xlabel("index i (sorted, largest first)")
    ax.set_ylabel("NTK eigenvalue / largest  (= sigma_i(J)^2 / sigma_1^2)")
    ax.set_title(
        f"Spectrum of the NTK J J^T, 1-H-1 tanh MLP, N={specs[0]['N']} points\n"
        "(line: median over seeds, band: min..max; dotted: rank bound P when P < N)"
    )
    ax.legend()
    fig.tight_layout()
    return fig


def plot_cost(rows_n: list[dict], rows_p: list[dict]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, rows, axis, fixed in (
        (axes[0], rows_n, "N", f"4-{rows_n[0]['H']}-{rows_n[0]['H']}-1, P={rows_n[0]['P']:,}"),
        (axes[1], rows_p, "P", f"N={rows_p[0]['N']}, 4-H-H-1"),
    ):
        for mode in MODES:
            pts = [(r[axis], r["run_s"]) for r in rows if r["mode"] == mode and "run_s" in r]
            if pts:
                x, y = (np.asarray(v) for v in zip(*pts, strict=True))
                ax.plot(x, np.asarray(y) * 1e3, "o-", color=COLORS[mode], label=mode)
            skipped = [r[axis] for r in rows if r["mode"] == mode and "run_s" not in r]
            if skipped and pts:
                ax.plot(skipped[:1], [pts[-1][1] * 1e3], "x", color=COLORS[mode], ms=9)
        xs = sorted({r[axis] for r in rows})
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(axis + (" (examples)" if axis == "N" else " (parameters)"))
        ax.set_ylabel("time per Jacobian (ms, compile excluded)")
        ax.set_title(f"cost of pb.jacobian modes vs {axis} ({fixed})")
        ax.set_xticks(xs, [f"{x:,}" for x in xs], fontsize=8, rotation=30)
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(title="mode (x: next size skipped)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------


def run(cfg: dict, args, out: h.Output) -> str:
    t_start = time.perf_counter()
    widths, n_spec = cfg["spectrum_widths"], cfg["spectrum_n"]
    n_sweep, h_fixed = cfg["n_sweep"], cfg["h_fixed"]
    h_sweep, n_fixed = cfg["h_sweep"], cfg["n_fixed"]
    budget, repeats = cfg["budget"], cfg["repeats"]

    with jax.enable_x64(True):
        a = anatomy(seed=0)
        specs = spectra(widths, n_spec, args.seeds)

    rows_n, rows_p = [], []
    jobs = [("N", n, h_fixed) for n in n_sweep] + [("P", n_fixed, width) for width in h_sweep]
    for axis, n, width in h.progress(jobs, desc="jacobian modes", disable=args.no_progress):
        res = cost_point(n, width, budget=budget, repeats=repeats)
        (rows_n if axis == "N" else rows_p).extend({**r, "sweep": axis} for r in res)

    cross = [
        _crossover(rows_n, "N", "rev", "per_example"),
        _crossover(rows_n, "N", "structured", "per_example"),
        _crossover(rows_p, "P", "fwd", "per_example"),
        _crossover(rows_p, "P", "fwd", "structured"),
        _crossover(rows_p, "P", "structured", "per_example"),
    ]

    out.figure("anatomy.png", plot_anatomy(a))
    out.figure("spectrum.png", plot_spectra(specs))
    out.figure("cost.png", plot_cost(rows_n, rows_p))

    identities = [
        {"identity": "row i of J = per-example gradient of r_i", "max_rel_err": a["err_rows"]},
        {"identity": "column k of J = pb.partial (JVP with e_k)", "max_rel_err": a["err_cols_jvp"]},
        {"identity": "column k of J = pb.nudge (central diff.)", "max_rel_err": a["err_cols_fd"]},
        {"identity": "J^T r = gradient of 1/2||r||^2", "max_rel_err": a["err_grad"]},
        {"identity": "J J^T = pb.ntk", "max_rel_err": a["err_ntk"]},
        {"identity": "sigma_i(J)^2 = lambda_i(J J^T)", "max_rel_err": a["err_spectrum"]},
    ]
    spec_rows = [
        {
            "H": s["H"],
            "P": s["P"],
            "N": s["N"],
            "rank bound min(N,P)": s["rank_bound"],
            "numerical rank (median)": int(np.median(s["numerical_rank"])),
            "eigs > 1e-6 lambda_1 (median)": int(np.median(s["rank_1e-6"])),
            "lambda_1/lambda_10 (median)": float(np.median(s["cond_top10"])),
            "max |sigma^2 - lambda| / lambda_1": s["sv2_vs_eig"],
        }
        for s in specs
    ]
    csv_rows = [{"part": "identity", **r} for r in identities]
    csv_rows += [
        {
            "part": "spectrum",
            "H": s["H"],
            "P": s["P"],
            "N": s["N"],
            "seed": i,
            "index": j,
            "eig": float(s["eig"][i, j]),
        }
        for s in specs
        for i in range(s["eig"].shape[0])
        for j in range(s["eig"].shape[1])
    ]
    csv_rows += rows_n + rows_p
    out.csv(f"{NAME}.csv", csv_rows)

    cost_cols = ["mode", "N", "H", "P", "status", "run_s", "compile_s", "rel_diff_vs_structured"]
    s_big = specs[-1]
    worst = max(a[k] for k in ("err_rows", "err_cols_jvp", "err_grad", "err_ntk", "err_spectrum"))
    finding = (
        f"- Every identity holds: rows, columns (JVP), J^T r = g, J J^T = NTK and "
        f"sigma^2 = NTK eigenvalues agree to at most "
        f"{worst:.1e}"
        f" (float64); the central difference (nudge) agrees to {a['err_cols_fd']:.1e}.\n"
        f"- J is badly conditioned: for H={s_big['H']} (P={s_big['P']:,} > N={s_big['N']}) the "
        f"rank bound is {s_big['rank_bound']} but only "
        f"{int(np.median(s_big['rank_1e-6']))} NTK eigenvalues exceed 1e-6 of the largest "
        f"(median over {args.seeds} seeds); undamped Gauss-Newton would divide by the rest.\n"
        + "".join(f"- {c}.\n" for c in cross)
    )
    crossings = "".join(f"- {c}\n" for c in cross)
    body = [
        "## Identities (float64, 1-4-1 tanh MLP, N = 10)",
        "",
        f"Loss at the random initialisation: {a['loss']:.4g}.",
        "",
        h.table(identities),
        "",
        "![anatomy](anatomy.png)",
        "",
        "## Spectrum: singular values of J and NTK eigenvalues",
        "",
        h.table(spec_rows),
        "",
        "Numerical rank: eigenvalues above N eps lambda_1 (float64). The dotted lines in the plot "
        "mark P for the networks with P < N: the NTK has N - P exact zeros there (at round-off).",
        "",
        "![spectrum](spectrum.png)",
        "",
        f"## Cost of each Jacobian mode (float32, compile excluded, median of {repeats})",
        "",
        f"Growing N at H = {h_fixed}:",
        "",
        h.table(rows_n, cost_cols),
        "",
        f"Growing P at N = {n_fixed}:",
        "",
        h.table(rows_p, cost_cols),
        "",
        "Measured crossovers:",
        "",
        crossings,
        "![cost](cost.png)",
    ]
    return h.report(
        "Jacobian anatomy",
        __doc__,
        name=NAME,
        args=args,
        seconds=time.perf_counter() - t_start,
        finding=finding,
        body=body,
    )


FULL = {
    "spectrum_widths": (4, 16, 64, 256),
    "spectrum_n": 64,
    "n_sweep": (4, 16, 64, 256, 1024, 4096),
    "h_fixed": 32,
    "h_sweep": (4, 8, 16, 32, 64, 128, 256),
    "n_fixed": 256,
    "budget": 5e9,
    "repeats": 5,
}
QUICK = {
    "spectrum_widths": (4, 64),
    "spectrum_n": 32,
    "n_sweep": (8, 64),
    "h_fixed": 16,
    "h_sweep": (4, 32),
    "n_fixed": 64,
    "budget": 2e8,
    "repeats": 2,
}


if __name__ == "__main__":
    h.exit(h.main(NAME, __doc__, run, full=FULL, quick=QUICK, seeds=8))
