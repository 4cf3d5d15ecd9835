"""The Jacobian of a per-example function with respect to its parameters.

For ``fn(params, x) -> (m,)`` (any output shape, flattened in C order to m entries) and examples
``xs`` with a leading axis of N, the Jacobian is

    J[i*m + j, k] = d fn(params, xs[i])[j] / d theta_k,        J of shape (N*m, P),

with theta = ``ravel_pytree(params)[0]``. Row ``i*m + j`` is the gradient of output j on example
i; column k says how every output moves when theta_k alone moves.

Modes (all give the same numbers; the tests hold them to it):

| mode | how | cost |
|---|---|---|
| ``"per_example"`` | ``vmap`` over examples of reverse mode | ~3 N m P flops; m backward passes |
| ``"fwd"`` | ``vmap`` over examples of ``jax.jacfwd`` | P forward passes per example |
| ``"rev"`` | ``jax.jacrev`` of the batched function | N m passes of the whole batch |
| ``"structured"`` | layer inputs and output cotangents (``pb.linearize``) | m backward passes |
| ``"auto"`` | fwd when P < m, else per_example (see ``auto_mode``) | |

``"rev"`` is kept as the plain twin that users reach for first; ``"auto"`` never picks it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from paribus import _tree

PyTree = Any
MODES = ("auto", "per_example", "fwd", "rev", "structured")


class _Spec(NamedTuple):
    """Static description of a Jacobian's rows and columns (hashable: it is pytree aux data)."""

    n_examples: int
    out_shape: tuple[int, ...]
    treedef: Any
    leaf_names: tuple[str, ...]
    leaf_shapes: tuple[tuple[int, ...], ...]
    mode: str = "auto"


@jax.tree_util.register_pytree_node_class
class Jacobian:
    """A Jacobian matrix with its row and column meaning attached.

    Attributes:
      matrix: ``(N*m, P)``; row ``i*m + j`` is example i, output j; columns in ravel order.
      labels: P strings naming each column's parameter, e.g. ``"layers[1].w[3,7]"``.
      tree: the same numbers shaped like ``params``, each leaf ``(N, *out_shape, *leaf.shape)``.
      mode: the mode that computed ``matrix`` (what ``"auto"`` resolved to); static, so
        ``jax.eval_shape(lambda p, x: pb.jacobian(fn, p, x), params, xs).mode`` tells the
        choice without computing anything.
    """

    def __init__(self, matrix: jax.Array, spec: _Spec):
        self.matrix = matrix
        self.spec = spec

    def tree_flatten(self):
        return (self.matrix,), self.spec

    @classmethod
    def tree_unflatten(cls, spec, children):
        return cls(children[0], spec)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)

    @property
    def mode(self) -> str:
        """The mode that computed the matrix (what ``"auto"`` resolved to)."""
        return self.spec.mode

    @property
    def n_examples(self) -> int:
        return self.spec.n_examples

    @property
    def n_outputs(self) -> int:
        return int(np.prod(self.spec.out_shape))

    @property
    def labels(self) -> tuple[str, ...]:
        return _tree.labels_from(self.spec.leaf_names, self.spec.leaf_shapes)

    @property
    def tree(self) -> PyTree:
        leaves, start = [], 0
        lead = (self.spec.n_examples, *self.spec.out_shape)
        for shape in self.spec.leaf_shapes:
            size = int(np.prod(shape))
            block = self.matrix[:, start : start + size]
            leaves.append(block.reshape(*lead, *shape))
            start += size
        return jax.tree.unflatten(self.spec.treedef, leaves)

    def __repr__(self) -> str:
        return (
            f"Jacobian(shape={self.shape}, N={self.n_examples}, out_shape={self.spec.out_shape}, "
            f"P={self.shape[1]})"
        )


def _spec(fn, params: PyTree, xs: PyTree, *, where: str) -> _Spec:
    _tree.check_float_params(params, where=where)
    n = _tree.leading_size(xs, where=where)
    if n == 0:
        raise ValueError(
            f"{where}: the batch is empty (N = 0); expected at least one example along the "
            "leading axis."
        )
    x0 = jax.tree.map(lambda a: a[0], xs)
    out = jax.eval_shape(fn, params, x0)
    if not isinstance(out, jax.ShapeDtypeStruct) or not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(
            f"{where}: fn(params, x) must return one floating-point array for one example; "
            f"got {out}."
        )
    leaves = jax.tree.leaves(params)
    return _Spec(
        n_examples=n,
        out_shape=tuple(out.shape),
        treedef=jax.tree.structure(params),
        leaf_names=tuple(_tree.leaf_names(params)),
        leaf_shapes=tuple(tuple(np.shape(leaf)) for leaf in leaves),
    )


def auto_mode(fn, spec: _Spec) -> str:
    """The mode ``"auto"`` resolves to for ``fn`` and these shapes.

    For a dense J the structured mode does not win: writing J costs the same N m P stores either
    way, and XLA's fused per-example reverse pass wrote it 1.0-1.3x faster than the explicit
    outer products on a 2-core CPU (benchmarks/jacobian.py: 1-64-64-1 and 4-32-32-3 at 1.3x,
    equal at 16-512-512-1) and about as fast on an H200 (1.10x at 16-1024-1024-1). The
    structured factors win where J is never formed (the NTK, J^T J products, diagonals,
    per-example norms in :mod:`paribus.curvature`), which use them whatever this returns.
    """
    del fn  # The choice depends on the shapes only (see above).
    n_params = sum(int(np.prod(s)) for s in spec.leaf_shapes)
    m = int(np.prod(spec.out_shape))
    # Forward mode costs P passes and reverse mode m passes (each ~2x a forward pass).
    return "fwd" if n_params < m else "per_example"


def jacobian(
    fn,
    params: PyTree,
    xs: PyTree,
    *,
    mode: str = "auto",
    chunk_size: int | str | None = "auto",
    memory_budget: int | None = None,
) -> Jacobian:
    """The Jacobian of ``fn(params, x)`` over the examples ``xs``, shape ``(N*m, P)``.

    Args:
      fn: ``fn(params, x) -> array`` for **one** example (e.g. a ``pb.nets`` apply).
      params: any pytree of float arrays; P scalars in all.
      xs: an array or pytree of arrays with a leading example axis of N.
      mode: ``"auto"``, ``"per_example"``, ``"fwd"``, ``"rev"`` or ``"structured"`` (see the
        module docstring for what each costs).
      chunk_size: process this many examples at a time to bound the intermediate memory
        (the output itself is still N*m*P numbers); ``"auto"`` (default) picks it from
        ``memory_budget`` (``None``: all at once when that fits); ``None``: all at once.
      memory_budget: bytes for J and its intermediates; default
        ``pb.memory.default_budget()`` (half the free memory of the device). When not even the
        output fits, ``pb.memory.MemoryBudgetError`` says how many examples would.

    Returns:
      A :class:`Jacobian` with ``.matrix`` (N*m, P), ``.labels`` (P) and ``.tree``.

    Example:
      >>> import jax, jax.numpy as jnp, paribus as pb
      >>> init, apply = pb.nets.mlp([2, 3, 1])
      >>> params = init(jax.random.key(0))
      >>> pb.jacobian(apply, params, jnp.ones((5, 2))).matrix.shape
      (5, 13)
    """
    if mode not in MODES:
        raise ValueError(f"unknown Jacobian mode {mode!r}; expected one of {MODES}.")
    if chunk_size not in (None, "auto") and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int, 'auto' or None; got {chunk_size!r}.")
    spec = _spec(fn, params, xs, where="pb.jacobian")
    if mode == "auto":
        mode = auto_mode(fn, spec)
    spec = spec._replace(mode=mode)
    flat, unravel = ravel_pytree(params)
    n, m = spec.n_examples, int(np.prod(spec.out_shape))
    from paribus import memory

    if chunk_size == "auto":
        chunk_size = memory.jacobian_chunk_size(n, m, flat.size, flat.dtype, budget=memory_budget)
    elif memory_budget is not None:  # an explicit chunk (or None: all N) must fit it too
        memory.check_jacobian_chunk_size(
            chunk_size, n, m, flat.size, flat.dtype, budget=memory_budget
        )

    def fn_flat(theta, x):
        return fn(unravel(theta), x).reshape(-1)

    if mode == "structured":
        from paribus._linearize import linearize
        from paribus.residuals import per_example

        lin = linearize(per_example(lambda p, x: fn(p, x)), params, xs)
        return Jacobian(lin.dense(structured=True), spec)
    if mode == "rev":
        matrix = _rev(fn_flat, flat, xs, n, chunk_size)
    else:
        one = jax.jacrev(fn_flat) if mode == "per_example" else jax.jacfwd(fn_flat)
        matrix = map_examples(lambda x: one(flat, x), xs, chunk_size).reshape(n * m, flat.size)
    return Jacobian(matrix, spec)


def map_examples(f, xs: PyTree, chunk_size: int | None):
    """``vmap(f)(xs)``, or in chunks of ``chunk_size`` examples to bound memory."""
    if chunk_size is None:
        return jax.vmap(f)(xs)
    # lax.map with batch_size vmaps inside each chunk and loops over chunks (remainder included).
    return jax.lax.map(f, xs, batch_size=chunk_size)


def _rev(fn_flat, flat, xs, n: int, chunk_size: int | None) -> jax.Array:
    def batched(theta, xs_chunk):
        return jax.vmap(fn_flat, (None, 0))(theta, xs_chunk).reshape(-1)

    step = chunk_size or n
    blocks = []
    for start in range(0, n, step):
        chunk = jax.tree.map(lambda a, s=start: a[s : s + step], xs)
        blocks.append(jax.jacrev(batched)(flat, chunk))
    return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=0)
