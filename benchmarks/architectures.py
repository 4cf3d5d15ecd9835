"""Any network at structured speed: NTK and dual LM step per architecture, in one run.

Question: does a Gauss-Newton / LM step cost a few gradients for the network the user brings,
not only for ``pb.nets`` MLPs?

Setup: float32 (``--x64`` for float64), every quantity jit-compiled, compile time apart, median
of repeats. Per architecture, one batch gradient of the loss (the unit), then:

- ``pb.ntk``-style kernel ``pb.linearize(...).ntk()`` (the layers found in the per-example
  jaxpr: factored for dense layers at few positions, per-example rows for convolutions and
  norms, per-example Jacobian columns for what cannot be placed);
- the same kernel by materialise-then-contract: J by ``vmap(jacrev)`` per example, then J J^T
  (the obvious twin; skipped where J would not fit the memory budget);
- one dual LM update, ``pb.levenberg_marquardt(solve="dual")`` at its own first damping;
- for the MLPs, both against ``pb.nets`` of the same widths.

Networks: ``pb.nets`` MLPs, the same MLP behind a closure, ``eqx.nn.MLP``, a Flax NNX MLP, the
MLP written over the whole batch (found row-independent from its jaxpr); a CNN (two 3x3
convolutions, average pooling, dense head) on 8x8 images with softmax cross-entropy (m = 10);
a transformer block (multi-head self-attention, layer norm, per-token MLP over S tokens); an
Elman RNN by ``lax.scan`` (its recurrent weights fall back to per-example columns).

Also: the scikit-learn digits CNN (N = 1,437, cross-entropy) trained by ``pb.fit`` with the
library's defaults, in a subprocess whose peak resident memory is reported (goal < 4 GB).

Goals (issue 15, 2-core CPU): at 16-512-512-1, N = 512, the Equinox, Flax NNX and closure MLPs'
NTK and dual step within 1.3x of ``pb.nets``'s; CNN and transformer never slower than
materialise-then-contract.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import fmt_ms, parser, time_fn, write_results  # noqa: E402
from jax import lax  # noqa: E402

import paribus as pb  # noqa: E402

# ------------------------------------------------------------------------------ networks


def mlp_variants(sizes, dtype):
    """name -> (per-example apply, params) for one MLP, written five ways."""
    import equinox as eqx
    from flax import nnx

    init, apply = pb.nets.mlp(sizes, "tanh", dtype=dtype)
    out = {"pb.nets": (apply, init(jax.random.key(0)))}
    out["closure"] = (lambda p, x: apply(p, x), out["pb.nets"][1])
    depth = len(sizes) - 2
    model = eqx.nn.MLP(sizes[0], sizes[-1], sizes[1], depth, activation=jnp.tanh,
                       key=jax.random.key(0), dtype=dtype)  # fmt: skip
    params, static = eqx.partition(model, eqx.is_inexact_array)
    out["equinox"] = (lambda p, x: eqx.combine(p, static)(x), params)

    class Net(nnx.Module):
        def __init__(self, rngs):
            widths = list(zip(sizes[:-1], sizes[1:], strict=True))
            self.layers = nnx.List(
                [nnx.Linear(a, b, rngs=rngs, param_dtype=dtype, dtype=dtype) for a, b in widths]
            )

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = jnp.tanh(layer(x))
            return self.layers[-1](x)

    graphdef, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    out["flax nnx"] = (lambda p, x: nnx.merge(graphdef, p)(x), state)
    return out


def batched_mlp(params, xs):
    a = xs
    for i, layer in enumerate(params["layers"]):
        a = a @ layer["w"] + layer["b"][None, :]
        a = a if i == len(params["layers"]) - 1 else jnp.tanh(a)
    return a


def cnn(dtype, classes=10):
    def apply(p, x):  # x (8, 8, 1)
        dn = ("NHWC", "HWIO", "NHWC")
        y = x[None]
        for k in ("c1", "c2"):
            y = lax.conv_general_dilated(y, p[k], (1, 1), "SAME", dimension_numbers=dn)
            y = jnp.tanh(y + p[k + "_b"][None, None, None, :])
            y = lax.reduce_window(y, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
        return y.reshape(-1) @ p["w"] + p["b"]

    k = jax.random.split(jax.random.key(0), 3)
    params = {
        "c1": 0.3 * jax.random.normal(k[0], (3, 3, 1, 8), dtype), "c1_b": jnp.zeros(8, dtype),
        "c2": 0.1 * jax.random.normal(k[1], (3, 3, 8, 16), dtype), "c2_b": jnp.zeros(16, dtype),
        "w": 0.1 * jax.random.normal(k[2], (64, classes), dtype), "b": jnp.zeros(classes, dtype),
    }  # fmt: skip
    return apply, params


def transformer(dtype, s=16, d=32, heads=4):
    def norm(x, scale, bias):
        mu = jnp.mean(x, -1, keepdims=True)
        var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-6) * scale[None, :] + bias[None, :]

    def apply(p, x):  # x (S, d)
        h = norm(x, p["n1_s"], p["n1_b"])
        q, k, v = ((h @ p[w]).reshape(s, heads, -1) for w in ("wq", "wk", "wv"))
        att = jax.nn.softmax(jnp.einsum("shd,thd->hst", q, k) / jnp.sqrt(d / heads), axis=-1)
        x = x + jnp.einsum("hst,thd->shd", att, v).reshape(s, d) @ p["wo"]
        h = norm(x, p["n2_s"], p["n2_b"])
        x = x + jax.nn.gelu(h @ p["w1"] + p["b1"][None, :]) @ p["w2"]
        return jnp.mean(x, axis=0) @ p["head"]

    shapes = dict(n1_s=(d,), n1_b=(d,), wq=(d, d), wk=(d, d), wv=(d, d), wo=(d, d),
                  n2_s=(d,), n2_b=(d,), w1=(d, 4 * d), b1=(4 * d,), w2=(4 * d, d),
                  head=(d, 1))  # fmt: skip
    keys = jax.random.split(jax.random.key(0), len(shapes))
    params = {
        n: (jnp.ones(sh, dtype) if n.endswith("_s") else
            jax.random.normal(key, sh, dtype) / np.sqrt(sh[0]) if len(sh) == 2 else
            jnp.zeros(sh, dtype))
        for key, (n, sh) in zip(keys, shapes.items(), strict=True)
    }  # fmt: skip
    return apply, params


def rnn(dtype, h=32, n_in=4):
    def apply(p, xs_t):  # (T, n_in)
        def cell(state, x):
            return jnp.tanh(p["W"] @ state + p["U"] @ x + p["b"]), None

        state, _ = lax.scan(cell, jnp.zeros(h, dtype), xs_t)
        return p["V"] @ state + p["c"]

    k = jax.random.split(jax.random.key(0), 3)
    params = {
        "W": jax.random.normal(k[0], (h, h), dtype) / np.sqrt(h),
        "U": jax.random.normal(k[1], (h, n_in), dtype) / np.sqrt(n_in),
        "b": jnp.zeros(h, dtype), "V": jax.random.normal(k[2], (1, h), dtype) / np.sqrt(h),
        "c": jnp.zeros(1, dtype),
    }  # fmt: skip
    return apply, params


# ------------------------------------------------------------------------------ measuring


def materialised_ntk(residual_fn, loss, batch):
    """J by vmap(jacrev) per example (whitened for a loss), then J J^T."""
    from jax.flatten_util import ravel_pytree

    def kernel(params):
        flat, unravel = ravel_pytree(params)
        fn = residual_fn.example_fn

        def rows(ex):
            def z(theta):
                out = fn(unravel(theta), ex)
                return (out[0] if loss is not None else out).reshape(-1)

            jac = jax.jacrev(z)(flat)
            if loss is None:
                return jac
            zz, t = fn(params, ex)
            _, s = loss.whiten(zz, t)
            return s @ jac

        jac = jax.vmap(rows)(batch)
        jac = jac.reshape(-1, jac.shape[-1])
        return jac @ jac.T

    return kernel


def measure(name, residual_fn, params, batch, loss, repeats, budget_bytes, reference=None):
    """One table row: gradient, NTK two ways, dual LM update; times and ratios."""
    n_params = pb.num_params(params)
    lin = pb.linearize(residual_fn, params, batch, loss=loss)
    print(f"\n{name}\n{lin.plan}", flush=True)

    def value(p):
        return pb.linearize(residual_fn, p, batch, loss=loss).value

    grad = jax.jit(jax.grad(value))
    ntk = jax.jit(lambda p: pb.linearize(residual_fn, p, batch, loss=loss).ntk())
    opt = pb.levenberg_marquardt(solve="dual", loss=loss)
    state = opt.init(params)
    step = jax.jit(lambda p: opt.update(None, state, p, residual_fn=residual_fn, batch=batch))
    t_grad = time_fn(lambda: grad(params), repeats=repeats)
    t_ntk = time_fn(lambda: ntk(params), repeats=repeats)
    t_step = time_fn(lambda: step(params), repeats=repeats)
    r_rows = lin.n_residuals
    row = {
        "network": name,
        "N": lin.n_examples,
        "R": r_rows,
        "P": n_params,
        "source": lin.plan.source,
        "forms": " ".join(sorted({leaf.form for leaf in lin.plan.leaves})),
        "grad": fmt_ms(t_grad["run_s"]),
        "ntk": fmt_ms(t_ntk["run_s"]),
        "ntk / grad": t_ntk["run_s"] / t_grad["run_s"],
        "dual step": fmt_ms(t_step["run_s"]),
        "step / grad": t_step["run_s"] / t_grad["run_s"],
        "step compile": fmt_ms(t_step["compile_s"]),
    }
    itemsize = jnp.zeros((), jax.tree.leaves(params)[0].dtype).dtype.itemsize
    j_bytes = 3 * r_rows * n_params * itemsize
    if hasattr(residual_fn, "example_fn") and j_bytes < budget_bytes:
        twin = jax.jit(materialised_ntk(residual_fn, lin.loss, batch))
        t_twin = time_fn(lambda: twin(params), repeats=max(3, repeats // 3))
        err = float(jnp.max(jnp.abs(twin(params) - ntk(params))) / jnp.max(jnp.abs(ntk(params))))
        row["ntk materialised"] = fmt_ms(t_twin["run_s"])
        row["materialised / ntk"] = t_twin["run_s"] / t_ntk["run_s"]
        row["ntk rel. diff"] = err
    else:
        row["ntk materialised"] = "J does not fit" if hasattr(residual_fn, "example_fn") else ""
    if reference is not None:
        row["ntk / pb.nets"] = t_ntk["run_s"] / reference["ntk_s"]
        row["step / pb.nets"] = t_step["run_s"] / reference["step_s"]
    row["_ntk_s"], row["_step_s"] = t_ntk["run_s"], t_step["run_s"]
    return row


def digits_fit(quick: bool) -> dict:
    """Train the digits CNN with pb.fit defaults in a subprocess; its peak RSS."""
    code = f"""
import os, json, resource, time
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import jax, jax.numpy as jnp, numpy as np
import paribus as pb
from architectures import cnn
try:
    from sklearn.datasets import load_digits
    d = load_digits(); xs, labels = d.data / 16.0, d.target
except ImportError:
    rng = np.random.default_rng(0); xs = rng.random((1797, 64)); labels = rng.integers(0, 10, 1797)
n = {200 if quick else 1437}
xs = jnp.asarray(xs[:n].reshape(n, 8, 8, 1), jnp.float32); labels = jnp.asarray(labels[:n])
apply, params = cnn(jnp.float32)
loss = pb.losses.softmax_cross_entropy()
fn = pb.losses.network_outputs(apply, loss)
opt = pb.levenberg_marquardt()
t0 = time.perf_counter()
result = pb.fit(fn, params, opt, (xs, labels), max_steps={3 if quick else 10})
seconds = time.perf_counter() - t0
acc = float(jnp.mean(jnp.argmax(jax.vmap(apply, (None, 0))(result.params, xs), 1) == labels))
print(json.dumps(dict(n=n, steps=int(result.steps), seconds=seconds,
    loss0=float(result.history.loss[0]), loss=float(result.history.loss[-1]), accuracy=acc,
    form=pb.solvers.FORMS[int(result.history.solve_form[-1])],
    peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if out.returncode:
        return {"network": "digits CNN, pb.fit defaults", "error": out.stderr[-500:]}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "network": "digits CNN, pb.fit defaults",
        "N": res["n"],
        "steps": res["steps"],
        "fit time (compile incl.)": f"{res['seconds']:.1f} s",
        "loss": f"{res['loss0']:.4g} -> {res['loss']:.4g}",
        "train accuracy": res["accuracy"],
        "solve form": res["form"],
        "peak RSS": f"{res['peak_gib']:.2f} GiB",
    }


def main() -> None:
    cli = parser("architectures", __doc__.splitlines()[0])
    cli.add_argument(
        "--only",
        nargs="*",
        default=None,
        metavar="NAME",
        help="rows whose network name contains one of these (e.g. CNN digits)",
    )
    args = cli.parse_args()

    def keep(name: str) -> bool:
        return not args.only or any(part in name for part in args.only)

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.x64 else jnp.float32
    repeats = args.repeats or (3 if args.quick else 10)
    budget = pb.memory.default_budget()
    rows = []
    mlp_sizes = [[1, 64, 64, 1]] + ([] if args.quick else [[16, 512, 512, 1]])
    for sizes in mlp_sizes:
        n = 512
        xs = jax.random.normal(jax.random.key(1), (n, sizes[0]), dtype)
        batch = (xs, jnp.sin(xs[:, :1]))
        reference = None
        for name, (apply, params) in mlp_variants(sizes, dtype).items():
            if not keep(f"{'-'.join(map(str, sizes))} {name}"):
                continue
            fn = pb.regression_residuals(apply)
            row = measure(f"{'-'.join(map(str, sizes))} {name}", fn, params, batch, None,
                          repeats, budget, reference)  # fmt: skip
            if name == "pb.nets":
                reference = {"ntk_s": row["_ntk_s"], "step_s": row["_step_s"]}
            rows.append(row)
        params = mlp_variants(sizes, dtype)["pb.nets"][1]
        if not keep(f"{'-'.join(map(str, sizes))} whole-batch function"):
            continue
        row = measure(f"{'-'.join(map(str, sizes))} whole-batch function",
                      lambda p, b: batched_mlp(p, b[0]) - b[1], params, batch, None, repeats,
                      budget, reference)  # fmt: skip
        rows.append(row)
    n = 128 if args.quick else 512
    apply, params = cnn(dtype)
    imgs = jax.random.uniform(jax.random.key(2), (n, 8, 8, 1), dtype)
    labels = jax.random.randint(jax.random.key(3), (n,), 0, 10)
    loss = pb.losses.softmax_cross_entropy()
    if keep("CNN 8x8, cross-entropy"):
        rows.append(measure("CNN 8x8, cross-entropy", pb.losses.network_outputs(apply, loss),
                            params, (imgs, labels), None, repeats, budget))  # fmt: skip
    n = 64 if args.quick else 256
    apply, params = transformer(dtype)
    toks = jax.random.normal(jax.random.key(4), (n, 16, 32), dtype)
    if keep("transformer block S=16 d=32"):
        rows.append(measure("transformer block S=16 d=32", pb.regression_residuals(apply),
                            params, (toks, jnp.zeros((n, 1), dtype)), None, repeats,
                            budget))  # fmt: skip
    apply, params = rnn(dtype)
    seqs = jax.random.normal(jax.random.key(5), (n, 10, 4), dtype)
    if keep("RNN (lax.scan) T=10 H=32"):
        rows.append(measure("RNN (lax.scan) T=10 H=32", pb.regression_residuals(apply), params,
                            (seqs, jnp.zeros((n, 1), dtype)), None, repeats,
                            budget))  # fmt: skip
    for row in rows:
        row.pop("_ntk_s", None)
        row.pop("_step_s", None)
    if keep("digits CNN, pb.fit defaults"):
        rows.append(digits_fit(args.quick))
    md = write_results(
        args.out, rows, title="Any network: NTK and dual LM step per architecture",
        notes="Ratios are to one batch gradient of the same loss (jit, median of repeats); "
        "'materialised' forms J by vmap(jacrev) per example, then J J^T. Peak RSS of the "
        f"digits fit: its own process. Run at {time.strftime('%Y-%m-%d %H:%M')}.",
    )  # fmt: skip
    print(md)


if __name__ == "__main__":
    main()
