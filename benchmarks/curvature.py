"""Structured curvature of MLPs against the generic ways, in one run.

Question: how much do the per-layer factors of a ``pb.nets`` MLP save over generic JAX for
the NTK, GGN-vector products, per-example gradient norms and the Jacobian itself?

Setup: MLPs 1-64-64-1 and 16-512-512-1 (tanh), N = 512 examples, float32 (``--x64`` for
float64); every quantity jit-compiled, compile time reported apart, median run time over
repeats. Methods per quantity:

- NTK (N m x N m): ``pb.ntk`` (factored: sum_l (A A^T + 1) * (D D^T)); J by ``vmap(grad)``
  then J J^T ("materialise"); and one implicit NTK-vector product K u = J (J^T u) (a VJP and a
  JVP), which a CG solve of the dual system repeats once per iteration where the structured K
  is formed once. (Forming K from N m such products, batched by ``vmap``, took 26 s at
  1-64-64-1 on the CPU: it is not timed.)
- GGN-vector product J^T J v: ``pb.ggn_vector_product`` (factored for m = 1) and the generic
  ``jax.linearize`` + transpose path, against one batch gradient.
- Per-example gradient norms: ``pb.per_example_grad_norms`` (one forward and backward keeping
  per-example signals) and ``vmap(grad)`` then norms, against one batch gradient.
- Jacobian: ``pb.jacobian(mode="structured")``, ``vmap(grad)``, and a copy of a J-sized array
  (the memory-write floor).
- Dual LM step from ``pb.linearize``'s NTK: K + lambda I, Cholesky, one J^T product.

Goals (issue 4, on the 2-core CPU): NTK >= 50x faster than materialise-then-contract at
16-512-512-1; GGN-vector product <= 2.5x a batch gradient; per-example norms <= 3x a batch
gradient; structured J <= 1.2x ``vmap(grad)``.
"""

from __future__ import annotations

import os

# LAPACK (the Cholesky of the dual step) goes through OpenBLAS, whose threads spin on shared
# cores: 512 x 512 cho_solve measured 3.7 ms with one thread and 60-900 ms with the default.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _common import fmt_ms, parser, time_fn, write_results  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import paribus as pb  # noqa: E402
from paribus import curvature  # noqa: E402


def _setup(sizes, n, dtype):
    init, apply = pb.nets.mlp(sizes, "tanh", dtype=dtype)
    params = init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (n, sizes[0]), dtype)
    ys = jax.random.normal(jax.random.key(2), (n, sizes[-1]), dtype)
    return apply, params, (xs, ys)


def _methods(apply, params, batch):
    """name -> (quantity, jitted zero-argument function)."""
    xs, ys = batch
    residual_fn = pb.regression_residuals(apply)
    plain_fn = lambda p, b: residual_fn(p, b)  # noqa: E731 - hides the structure
    flat, unravel = ravel_pytree(params)
    v = unravel(jax.random.normal(jax.random.key(3), flat.shape, flat.dtype))
    n, m = ys.shape

    def loss(p):
        return 0.5 * jnp.sum(jnp.square(residual_fn(p, batch)))

    def one_output(theta, x):
        return apply(unravel(theta), x)

    def vmap_grad_jacobian(theta):
        rows = jax.vmap(jax.jacrev(one_output), (None, 0))(theta, xs)
        return rows.reshape(n * m, -1)

    u = jax.random.normal(jax.random.key(4), (n * m,), flat.dtype)

    def ntk_vector_product(p):
        """K u = J (J^T u): one VJP and one JVP, J and K never formed."""
        residuals = lambda q: residual_fn(q, batch).reshape(-1)  # noqa: E731
        _, pullback = jax.vjp(residuals, p)
        return jax.jvp(residuals, (p,), pullback(u))[1]

    def dual_step(p):
        lin = pb.linearize(residual_fn, p, batch)
        kernel = lin.ntk()
        lam = jnp.asarray(1e-3, kernel.dtype)
        chol = jax.scipy.linalg.cho_factor(kernel + lam * jnp.eye(n * m, dtype=kernel.dtype))
        alpha = jax.scipy.linalg.cho_solve(chol, lin.r)
        return lin.vjp(-alpha)

    def per_example_norms_vmap(p):
        def example_loss(q, x, y):
            return 0.5 * jnp.sum(jnp.square(apply(q, x) - y))

        grads = jax.vmap(jax.grad(example_loss), (None, 0, 0))(p, xs, ys)
        sq = sum(jnp.sum(jnp.square(g.reshape(n, -1)), 1) for g in jax.tree.leaves(grads))
        return jnp.sqrt(sq)

    jac = jax.jit(vmap_grad_jacobian)(flat)
    jit = jax.jit
    return {
        "batch gradient": ("gradient", jit(jax.grad(loss)), (params,)),
        "ntk structured": ("NTK", jit(lambda p: pb.ntk(apply, p, xs)), (params,)),
        "ntk materialise J, J J^T": (
            "NTK",
            jit(lambda th: (lambda j: j @ j.T)(vmap_grad_jacobian(th))),
            (flat,),
        ),
        "one NTK-vector product K u": ("NTK-vector product", jit(ntk_vector_product), (params,)),
        "ggn-vp structured": (
            "GGN-vector product",
            jit(lambda p, w: curvature.ggn_vector_product(residual_fn, p, batch, w)),
            (params, v),
        ),
        "ggn-vp generic (linearize)": (
            "GGN-vector product",
            jit(lambda p, w: curvature.ggn_vector_product(plain_fn, p, batch, w)),
            (params, v),
        ),
        "norms structured": (
            "per-example grad norms",
            jit(lambda p: curvature.per_example_grad_norms(residual_fn, p, batch)),
            (params,),
        ),
        "norms vmap(grad)": ("per-example grad norms", jit(per_example_norms_vmap), (params,)),
        "J structured": (
            "Jacobian",
            jit(lambda p: pb.jacobian(apply, p, xs, mode="structured").matrix),
            (params,),
        ),
        "J vmap(grad)": ("Jacobian", jit(vmap_grad_jacobian), (flat,)),
        "J-sized copy": ("Jacobian", jit(lambda a: a * 2), (jac,)),
        "dual LM step (structured NTK)": ("LM step", jit(dual_step), (params,)),
    }


def main() -> None:
    cli = parser("curvature", __doc__.splitlines()[0])
    cli.add_argument(
        "--large", action="store_true", help="add 16-1024-1024-1 with N = 1024 (for a GPU)"
    )
    args = cli.parse_args()
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.x64 else jnp.float32
    configs = [([1, 64, 64, 1], 512), ([16, 512, 512, 1], 512)]
    if args.quick:
        configs = [([1, 64, 64, 1], 256), ([16, 256, 256, 1], 256)]
    if args.large:
        configs.append(([16, 1024, 1024, 1], 1024))
    repeats = args.repeats or (3 if args.quick else 7)
    rows = []
    for sizes, n in configs:
        apply, params, batch = _setup(sizes, n, dtype)
        n_params = ravel_pytree(params)[0].size
        label = "-".join(map(str, sizes))
        timings = {}
        for name, (quantity, fn, fn_args) in _methods(apply, params, batch).items():
            t = time_fn(lambda fn=fn, a=fn_args: fn(*a), repeats=repeats)
            timings[name] = t
            print(f"{label} N={n}: {name:40s} {fmt_ms(t['run_s']):>10s}", flush=True)
            rows.append(
                {
                    "mlp": label,
                    "N": n,
                    "P": n_params,
                    "quantity": quantity,
                    "method": name,
                    "compile_ms": 1e3 * t["compile_s"],
                    "run_ms": 1e3 * t["run_s"],
                }
            )
        grad = timings["batch gradient"]["run_s"]
        base = {
            "NTK": timings["ntk materialise J, J J^T"]["run_s"],
            "Jacobian": timings["J vmap(grad)"]["run_s"],
        }
        for row in rows[-len(timings) :]:
            row["x batch grad"] = row["run_ms"] / (1e3 * grad)
            ref = base.get(row["quantity"])
            row["x baseline"] = None if ref is None else row["run_ms"] / (1e3 * ref)
    notes = (
        "x batch grad: run time over one batch gradient of 1/2||r||^2 in the same run. "
        "x baseline: over materialise-then-contract (NTK) or vmap(grad) (Jacobian). "
        f"dtype {jnp.dtype(dtype).name}; median of {repeats} runs; compile time apart."
    )
    print(write_results(args.out, rows, title="Structured curvature", notes=notes))


if __name__ == "__main__":
    main()
