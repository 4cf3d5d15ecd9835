"""Benchmark: ``jax.vmap`` of ``pb.fit`` over seeds, against plain JAX, as max_steps grows.

Question: does a vmapped ``pb.fit`` (one compiled loop for every seed, as the studies' sweeps
run it) cost the same per seed-step at any ``max_steps``, as a hand-written ``lax.scan`` does?
A ``while_loop`` whose predicate is batched selects every leaf of its carry at every iteration,
so a history of max_steps + 1 rows carried through one loop grows the cost per step with
max_steps; ``pb.fit`` runs a traced run longer than 128 points as a scan over 128-point loops.

Setup: Hagan & Menhaj's 1-15-1 logistic network on 40 points of 1/2 + 1/4 sin(3 pi p), SGD at
learning rate 0.01, no stopping test that fires, S seeds at once, max_steps in (1,000, 4,000,
16,000). Methods, in one process: ``jax.jit(jax.vmap(pb.fit))`` with the scan over chunks
(the default), the same with one loop (``paribus._fit.fitting.TRACED_CHUNK`` raised above
max_steps, what ``pb.fit`` did before), plain JAX (a jitted, vmapped ``lax.scan`` of SGD that
records the loss at every step: the floor), and ``pb.fit`` seed by seed on the host.

Run: ``python benchmarks/vmap_seeds.py`` (``--quick``: 1,000 and 4,000 steps, 4 seeds).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

import paribus as pb
from paribus._fit import fitting


def problem():
    net = pb.nets.mlp([1, 15, 1], activation="sigmoid")
    xs = jnp.linspace(-1.0, 1.0, 40)[:, None]
    return net.init, pb.regression_residuals(net.apply), (xs, 0.5 + 0.25 * jnp.sin(3 * jnp.pi * xs))


def main() -> None:
    args = _common.parser("vmap_seeds", __doc__.splitlines()[0]).parse_args()
    jax.config.update("jax_enable_x64", args.x64)
    init, residual_fn, batch = problem()
    seeds = 4 if args.quick else 16
    lengths = (1_000, 4_000) if args.quick else (1_000, 4_000, 16_000)
    repeats = args.repeats or (2 if args.quick else 3)
    keys = jax.random.split(jax.random.key(0), seeds)
    opt = optax.sgd(0.01)

    def fit(key, steps):
        return pb.fit(residual_fn, init(key), opt, batch, max_steps=steps).history.loss

    def plain(key, steps):
        def loss(p):
            r = residual_fn(p, batch)
            return 0.5 * jnp.vdot(r, r)

        def step(p, _):
            value, grad = jax.value_and_grad(loss)(p)
            return jax.tree.map(lambda a, g: a - 0.01 * g, p, grad), value

        p, values = jax.lax.scan(step, init(key), None, length=steps)
        return jnp.append(values, loss(p))

    rows = []
    chunk = fitting.TRACED_CHUNK
    for steps in lengths:
        methods = {
            "pb.fit vmapped (scan of 128-point loops)": (chunk, fit),
            "pb.fit vmapped, one loop (before)": (steps + 1, fit),
            "plain JAX lax.scan vmapped": (chunk, plain),
        }
        results = {}
        for name, (traced_chunk, fn) in methods.items():
            fitting.TRACED_CHUNK = traced_chunk
            run = jax.jit(jax.vmap(lambda k, fn=fn, s=steps: fn(k, s)))
            t = _common.time_fn(lambda run=run: run(keys), repeats=repeats)
            results[name] = (t, np.asarray(run(keys)))
        fitting.TRACED_CHUNK = chunk

        def host(steps=steps):
            return [pb.fit(residual_fn, init(k), opt, batch, max_steps=steps, compile_mode="full")
                    for k in keys]  # fmt: skip

        t_host = _common.time_fn(lambda: [r.params for r in host()], repeats=1)
        results["pb.fit seed by seed (host loop)"] = (t_host, None)
        base = results["plain JAX lax.scan vmapped"][1]
        floor = results["plain JAX lax.scan vmapped"][0]["run_s"]
        for name, (t, losses) in results.items():
            agree = "" if losses is None else f"{np.max(np.abs(losses - base) / base):.1e}"
            rows.append({
                "max_steps": steps, "seeds": seeds, "method": name,
                "run": _common.fmt_ms(t["run_s"]),
                "us per seed-step": round(1e6 * t["run_s"] / (steps * seeds), 2),
                "x plain JAX": round(t["run_s"] / floor, 2),
                "compile": _common.fmt_ms(t["compile_s"]),
                "max rel. diff. of the losses from plain JAX": agree,
            })  # fmt: skip
            print(rows[-1], flush=True)
    notes = (
        f"SGD (lr 0.01) on Hagan & Menhaj's 1-15-1 sigmoid network, 40 points; {seeds} seeds "
        f"vmapped in one jitted call; median of {repeats} runs after a compiling call (the host "
        "loop: one run). 'one loop' sets paribus._fit.fitting.TRACED_CHUNK above max_steps."
    )
    print(_common.write_results(args.out, rows, title="vmap of pb.fit over seeds", notes=notes))


if __name__ == "__main__":
    main()
