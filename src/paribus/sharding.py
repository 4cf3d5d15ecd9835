"""Data parallelism through ``jax.sharding``: split the examples, replicate the parameters.

Nothing here is a distribution layer of its own. Every paribus computation is a pure function of
``(params, batch)`` built from ``vmap``, ``jvp`` and ``vjp``; under ``jax.jit``, XLA's sharding
propagation (GSPMD) partitions it once the inputs carry shardings:

- the batch is split over the example axis, ``NamedSharding(mesh, P("data"))``: device d holds
  examples ``d*N/D .. (d+1)*N/D - 1`` of N, for D devices;
- the parameters are replicated, ``NamedSharding(mesh, P())``.

Then the residuals r and J v are computed shard by shard (no communication), J^T u and the
gradient g = J^T r end with one all-reduce over the devices (a sum over examples), and the NTK
K = J J^T of the dual form is assembled from the per-shard factors: for a ``pb.nets`` network the
structured NTK gathers the per-layer activations and backprop signals (N * sum of widths
numbers), never J (N * m * P numbers). The small (N*m, N*m) Cholesky of the dual form runs
replicated. What the user controls is where the data and the parameters live; this module gives
the three lines that say so:

    mesh = pb.sharding.data_mesh()                   # every device JAX sees, one axis "data"
    batch = pb.sharding.shard_batch(batch, mesh)     # examples split over the devices
    params = pb.sharding.replicate(params, mesh)     # a full copy on every device
    result = pb.fit(residual_fn, params, opt, batch, max_steps=100)

On several hosts, call ``jax.distributed.initialize()`` first in every process; ``data_mesh``
then spans every device of every process and ``shard_batch`` takes each process's own examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from paribus import _tree

PyTree = Any


def data_mesh(devices: Sequence[jax.Device] | None = None, *, axis: str = "data") -> Mesh:
    """A one-axis mesh over ``devices`` (default: ``jax.devices()``, every device of every
    process) for data parallelism.

    Args:
      devices: the devices to split the examples over, in the order the shards are laid out.
      axis: the mesh axis name, used by :func:`shard_batch`.

    Returns:
      ``Mesh`` of shape ``(len(devices),)`` with axis type ``Auto``: sharding is propagated by
      the compiler through unannotated code, which is what lets paribus's (and the user's)
      ``vmap`` / ``jvp`` / ``vjp`` code run sharded unchanged. (``jax.make_mesh`` defaults to
      ``Explicit`` axes, under which shardings are part of the types and must be stated at
      every ambiguous operation.)
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh: no devices given; expected at least one jax.Device.")
    if len(set(devices)) != len(devices):
        raise ValueError(f"data_mesh: devices must be distinct; got {devices}.")
    if not isinstance(axis, str) or not axis:
        raise ValueError(f"data_mesh: axis must be a non-empty string; got {axis!r}.")
    return Mesh(np.asarray(devices, dtype=object), (axis,), axis_types=(AxisType.Auto,))


def _data_axis(mesh: Mesh, axis: str | None, *, where: str) -> str:
    if axis is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(
                f"{where}: the mesh has axes {mesh.axis_names}; say which one splits the "
                "examples with axis=..."
            )
        return mesh.axis_names[0]
    if axis not in mesh.axis_names:
        raise ValueError(f"{where}: axis {axis!r} is not an axis of the mesh {mesh.axis_names}.")
    return axis


def batch_sharding(mesh: Mesh, *, axis: str | None = None) -> NamedSharding:
    """``NamedSharding(mesh, P(axis))``: the leading (example) axis split over ``axis``, every
    other axis whole. ``axis`` defaults to the mesh's only axis."""
    return NamedSharding(mesh, PartitionSpec(_data_axis(mesh, axis, where="batch_sharding")))


def replicated(mesh: Mesh) -> NamedSharding:
    """``NamedSharding(mesh, P())``: a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def _divisors_up_to(n: int, limit: int) -> list[int]:
    return [d for d in range(1, limit + 1) if n % d == 0]


def shard_batch(batch: PyTree, mesh: Mesh, *, axis: str | None = None) -> PyTree:
    """Place ``batch`` with its examples split over ``axis`` of ``mesh``.

    Every leaf carries a leading example axis of N (the residual-function convention); the
    result holds the same numbers as ``jax.Array`` s sharded as ``NamedSharding(mesh, P(axis))``,
    so device d of the D devices along ``axis`` holds examples ``d*N/D`` to ``(d+1)*N/D - 1``.

    With several processes (after ``jax.distributed.initialize()``), ``batch`` is this
    process's share of the examples, N_local per process; the global batch is the
    concatenation of every process's share in process order, built with
    ``jax.make_array_from_process_local_data``.

    Raises:
      ValueError: when the examples cannot be split evenly, saying which sizes would do.
    """
    sharding = batch_sharding(mesh, axis=axis)
    axis = sharding.spec[0]
    n = _tree.leading_size(batch, where="shard_batch")
    multi = jax.process_count() > 1
    # Devices along the data axis that this process feeds: all of them on one host.
    n_dev = mesh.shape[axis]
    n_local_dev = n_dev if not multi else n_dev // jax.process_count()
    if n_local_dev == 0 or n % n_local_dev:
        total = n_local_dev or n_dev
        sizes = sorted({(n // total) * total, -(-n // total) * total} - {0})
        fits = _divisors_up_to(n, total)
        who = "examples" if not multi else f"examples on process {jax.process_index()}"
        raise ValueError(
            f"shard_batch: N = {n} {who} cannot be split evenly over the {total} devices on "
            f"mesh axis {axis!r}. Use N a multiple of {total} (e.g. "
            f"{' or '.join(map(str, sizes))}: drop or add examples), or a mesh over "
            f"{fits[-1]} device(s) (data_mesh(jax.devices()[:{fits[-1]}]); N = {n} splits "
            f"evenly over {fits} devices)."
        )
    if multi:
        return jax.tree.map(
            lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)),
            batch,
        )
    return jax.device_put(batch, sharding)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place a full copy of ``tree`` (parameters, optimiser state) on every device of ``mesh``.

    The parameters of data-parallel training are replicated: each device computes its
    examples' residuals and Jacobian rows with the whole network, and the update, computed from
    all-reduced sums, is the same on every device, so the copies never drift apart.
    """
    return jax.device_put(tree, replicated(mesh))


def local_examples(batch: PyTree) -> int:
    """N / D: the examples each device holds of a batch placed by :func:`shard_batch` (what a
    per-device memory budget is spent on). An unsharded batch counts whole."""
    leaves = jax.tree.leaves(batch)
    n = _tree.leading_size(batch, where="local_examples")
    sharding = getattr(leaves[0], "sharding", None)
    if sharding is None:
        return n
    return int(sharding.shard_shape(np.shape(leaves[0]))[0])
