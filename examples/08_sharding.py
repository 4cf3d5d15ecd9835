"""Training on many devices: shard the batch, replicate the parameters, call ``pb.fit``.

paribus has no distribution layer of its own. Every computation is a pure function of
``(params, batch)`` under ``jax.jit``, so once the inputs carry shardings XLA partitions the
work: each device computes the residuals and Jacobian rows of its own examples, and the sums
over examples (the gradient J^T r, the kernel J J^T of the dual LM step) end in collectives. You
place the data; paribus follows.

    pb.sharding.data_mesh()            every device JAX sees, one mesh axis "data"
    pb.sharding.shard_batch(batch, m)  examples split over the devices (N divisible by their number)
    pb.sharding.replicate(params, m)   a full copy of the parameters on every device

On one device this runs as is (the "mesh" has one device). To see the batch split on a CPU-only
machine, ask XLA for several host devices before JAX starts:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/08_sharding.py

Finding: Levenberg-Marquardt on a batch sharded over several devices takes the same steps as on
one device, up to rounding (the sums over examples are taken in another order), and returns the
parameters replicated on every device.
"""

from __future__ import annotations

import _common
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import paribus as pb


def main(quick: bool = False):
    mesh = pb.sharding.data_mesh()
    n_dev = mesh.size
    print(f"{n_dev} device(s): {[str(d) for d in mesh.devices.flat]}")

    # N must split evenly over the devices: 16 examples per device in quick mode.
    n = (16 if quick else 256) * n_dev
    xs = jnp.linspace(-1.0, 1.0, n)[:, None]
    ys = jnp.sin(3 * xs) + 0.3 * xs**2
    init, apply = pb.nets.mlp([1, 32, 32, 1], "tanh")
    params = init(jax.random.key(0))
    residual_fn = pb.regression_residuals(apply)
    steps = 10 if quick else 30

    # --- The same LM run twice: on one device, then with the batch split over all of them ---------
    single = pb.fit(residual_fn, params, pb.levenberg_marquardt(), (xs, ys), max_steps=steps)

    batch = pb.sharding.shard_batch((xs, ys), mesh)
    placed = pb.sharding.replicate(params, mesh)
    shards = [s.data.shape for s in batch[0].addressable_shards]
    print(
        f"xs {xs.shape} is held as {len(shards)} shard(s) of shape {shards[0]}: {batch[0].sharding}"
    )
    sharded = pb.fit(residual_fn, placed, pb.levenberg_marquardt(), batch, max_steps=steps)

    # --- Compare ----------------------------------------------------------------------------------
    a = np.asarray(ravel_pytree(single.params)[0])
    b = np.asarray(ravel_pytree(sharded.params)[0])
    gap = np.max(np.abs(a - b)) / np.max(np.abs(a))
    replicated = all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sharded.params))
    loss_1, loss_d = float(single.history.loss[-1]), float(sharded.history.loss[-1])
    print(f"one device:   {single.steps} steps, loss {loss_1:.6g} ({single.stop_reason})")
    print(f"{n_dev} device(s): {sharded.steps} steps, loss {loss_d:.6g} ({sharded.stop_reason})")
    print(
        f"FINDING: LM with the batch sharded over {n_dev} device(s) ({n // n_dev} examples each) "
        f"matches the one-device run to {gap:.1e} (max parameter difference, relative); "
        f"parameters replicated: {replicated}"
    )


if __name__ == "__main__":
    _common.run(main, plot=False)
