"""Benchmark: the full Jacobian J (N*m, P) of an MLP's outputs over a batch, paribus vs plain JAX.

Question: how fast does ``pb.jacobian`` build J, in each of its modes, against the ways a JAX user
would write it by hand: ``jax.jacrev`` of the batched function (N*m reverse passes over the whole
batch: N times the needed work), ``jax.jacfwd`` of the batched function (P forward passes over
the batch; out of memory for wide nets) and ``vmap`` over examples of a per-example gradient?

Every method returns the same (N*m, P) matrix (columns in ``ravel_pytree`` order) and is jitted;
compile time is reported apart from the median run time; ratios are to the best plain-JAX way and
to ``jax.jacrev`` of the batched function. float32 by default.

Goals (issue 2): ``auto`` within 1.1x of the best plain-JAX way everywhere, and at least 20x
faster than ``jax.jacrev`` of the batched function at 1-64-64-1, N = 512.

Run: ``python benchmarks/jacobian.py`` (full) or ``--quick``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

import paribus as pb  # noqa: E402

# A method whose intermediates would exceed this many bytes is skipped with a note.
MEMORY_BUDGET = 2 * 2**30


def plain_jax_methods(apply, params, xs):
    """The plain-JAX ways to J, each a zero-argument jitted thunk returning (N*m, P)."""
    flat, unravel = ravel_pytree(params)

    def one(theta, x):
        return apply(unravel(theta), x).reshape(-1)

    def batched(theta):
        return jax.vmap(one, (None, 0))(theta, xs).reshape(-1)

    @jax.jit
    def vmap_grad(theta, xs):
        # vmap over examples of reverse mode (for m = 1 this is vmap(grad)).
        rows = jax.vmap(jax.jacrev(one), (None, 0))(theta, xs)
        return rows.reshape(-1, theta.size)

    @jax.jit
    def vmap_grad_tree(params, xs):
        # The same on the params pytree, ravelled afterwards: what users write first.
        tree = jax.vmap(jax.jacrev(lambda p, x: apply(p, x).reshape(-1)), (None, 0))(params, xs)
        lead = xs.shape[0] * tree_out(tree)
        return jnp.concatenate([leaf.reshape(lead, -1) for leaf in jax.tree.leaves(tree)], 1)

    def tree_out(tree):
        leaf, shape = jax.tree.leaves(tree)[0], jax.tree.leaves(params)[0].shape
        return int(np.prod(leaf.shape[1 : leaf.ndim - len(shape)]))

    jacrev_batched = jax.jit(jax.jacrev(batched))
    jacfwd_batched = jax.jit(jax.jacfwd(batched))
    return {
        "vmap(grad)": lambda: vmap_grad(flat, xs),
        "vmap(grad) on tree": lambda: vmap_grad_tree(params, xs),
        "jax.jacrev(batched)": lambda: jacrev_batched(flat),
        "jax.jacfwd(batched)": lambda: jacfwd_batched(flat),
    }


def paribus_methods(apply, params, xs):
    methods = {}
    for mode in ("auto", "structured", "per_example", "fwd", "rev"):
        fn = jax.jit(lambda p, x, mode=mode: pb.jacobian(apply, p, x, mode=mode).matrix)
        methods[f"pb {mode}"] = lambda fn=fn: fn(params, xs)
    return methods


def forward_mode_bytes(sizes, n, p, itemsize):
    """Forward mode pushes P tangents through every layer of every example."""
    return p * n * max(sizes) * itemsize


def run_case(sizes, n, repeats, dtype):
    init, apply = pb.nets.mlp(sizes, "tanh", dtype=dtype)
    params = init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (n, sizes[0]), dtype)
    p = sum(leaf.size for leaf in jax.tree.leaves(params))
    m = sizes[-1]
    itemsize = jnp.dtype(dtype).itemsize
    big_fwd = forward_mode_bytes(sizes, n, p, itemsize) > MEMORY_BUDGET
    methods = {**paribus_methods(apply, params, xs), **plain_jax_methods(apply, params, xs)}
    auto_resolves_to = pb.jacobian(apply, params, xs[:2]).mode

    reference = None
    rows, fast = [], {}
    for name, thunk in methods.items():
        row = {
            "mlp": "-".join(map(str, sizes)),
            "N": n,
            "P": p,
            "J_MB": n * m * p * itemsize / 2**20,
        }
        row["method"] = name
        if big_fwd and ("fwd" in name):
            rows.append({**row, "note": "skipped: forward mode needs > 2 GiB of tangents"})
            continue
        # jacrev of the batched function repeats the whole batch N*m times: skip when huge.
        if "rev" in name and n * m * p * n > 2e11:
            rows.append({**row, "note": "skipped: N*m reverse passes over the batch take minutes"})
            continue
        # The N-times-the-work methods take seconds a call: time them alone, a few repeats.
        if any(tag in name for tag in ("fwd", "rev")):
            stats = _common.time_fn(thunk, repeats=3)
            row.update(compile_s=stats["compile_s"], run_s=stats["run_s"], min_s=stats["run_s"])
        else:
            t0 = time.perf_counter()
            jax.block_until_ready(thunk())
            row["first_s"] = time.perf_counter() - t0
            fast[name] = thunk
        out = np.asarray(thunk())
        if reference is None:
            reference = out
        row["max_rel_diff"] = float(np.max(np.abs(out - reference)) / np.max(np.abs(reference)))
        rows.append(row)
    # The fast methods are timed in interleaved rounds, so that load from other processes on a
    # shared machine falls on all of them alike; median and minimum over the rounds.
    # CPU time (all threads of this process) is reported too: it does not count the time spent
    # waiting for a core, so on a loaded machine its ratios are steadier than wall-clock ones.
    times: dict[str, list[float]] = {name: [] for name in fast}
    cpu: dict[str, list[float]] = {name: [] for name in fast}
    for _ in range(repeats):
        for name, thunk in fast.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(thunk())
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    for r in rows:
        if r["method"] in times:
            runs = sorted(times[r["method"]])
            r["run_s"], r["min_s"] = runs[len(runs) // 2], runs[0]
            r["cpu_s"] = sorted(cpu[r["method"]])[len(runs) // 2]
            r["compile_s"] = max(r.pop("first_s") - r["run_s"], 0.0)
    plain = [r["run_s"] for r in rows if "run_s" in r and not r["method"].startswith("pb ")]
    best_plain = min(plain)
    best_plain_cpu = min(
        r["cpu_s"] for r in rows if "cpu_s" in r and not r["method"].startswith("pb ")
    )
    jacrev = next((r.get("run_s") for r in rows if r["method"] == "jax.jacrev(batched)"), None)
    for r in rows:
        if "run_s" in r:
            r["x_best_plain"] = r["run_s"] / best_plain
            r["jacrev_batched_over_this"] = jacrev / r["run_s"] if jacrev else None
            if "cpu_s" in r:
                r["cpu_x_best_plain"] = r["cpu_s"] / best_plain_cpu
        if r["method"] == "pb auto":
            r["note"] = f"auto -> {auto_resolves_to}"
    return rows


def main() -> None:
    p = _common.parser("jacobian", __doc__.splitlines()[0])
    args = p.parse_args()
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.x64 else jnp.float32
    if args.quick:
        cases = [([1, 64, 64, 1], 512), ([4, 32, 32, 3], 128)]
    else:
        cases = [
            ([1, 64, 64, 1], 512),
            ([4, 32, 32, 3], 128),
            ([8, 128, 128, 10], 256),
            ([16, 512, 512, 1], 512),
        ]
    repeats = args.repeats or (10 if args.quick else 30)
    rows = []
    for sizes, n in cases:
        print(f"MLP {sizes}, N = {n} ...", flush=True)
        rows += run_case(sizes, n, repeats, dtype)
    for r in rows:
        for key in ("compile_s", "run_s", "min_s", "cpu_s"):
            if key in r:
                r[key.replace("_s", "_ms")] = r.pop(key) * 1e3
    columns = [
        "mlp", "N", "P", "J_MB", "method", "run_ms", "min_ms", "cpu_ms", "compile_ms",
        "x_best_plain", "cpu_x_best_plain",
        "jacrev_batched_over_this", "max_rel_diff", "note",
    ]  # fmt: skip
    rows = [{c: r.get(c) for c in columns} for r in rows]
    notes = (
        "run_ms: median run time (fast methods timed in interleaved rounds); min_ms: fastest "
        "run; cpu_ms: median CPU time of this process (all threads; steadier on a loaded "
        "machine); compile_ms: first call minus a run. x_best_plain: run time over "
        "the fastest plain-JAX way (vmap(grad), vmap(grad) on tree, jax.jacrev(batched), "
        "jax.jacfwd(batched)); cpu_x_best_plain: the same with CPU times (fast methods only); "
        "jacrev_batched_over_this: speed-up over jax.jacrev of the batched "
        "function. max_rel_diff: max |J - J_first| / max |J_first| against pb auto. "
        f"dtype {jnp.dtype(dtype).name}."
    )
    md = _common.write_results(args.out, rows, title="Jacobian of an MLP over a batch", notes=notes)
    print(md)


if __name__ == "__main__":
    main()
