"""Whole-batch residual functions whose rows are independent, shown from their jaxpr.

Most users write ``lambda p, b: apply_batched(p, b[0]) - b[1]`` over the whole batch. Such a
function is per example exactly when no operation mixes examples. This module proves that by
following the example axis through the jaxpr of ``residual_fn(params, batch)``: the batch's
leading axis (N) enters as the example axis of every batch leaf, and each operation either
carries it to a known axis of its output (elementwise operations, transposes, reshapes that
keep it apart, dense layers applied along other axes, convolutions over it as their batch
dimension, reductions over other axes, ...) or mixes examples (a reduction, contraction, sort,
gather or cumulative sum over it; a constant with one row per example; anything not known).
One unknown is enough to give up: the function then stays on the opaque path, which is always
exact, and the plan says why (and that ``pb.per_example`` marks the function by hand).

When proven, the per-example function is the user's own function called on a batch of one
example, ``residual_fn(params, batch[i:i+1])``, and the rows of example i are its output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

_ELEMENTWISE = set(
    """abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp clz conj
    convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1
    floor ge gt igamma igammac imag integer_pow is_finite le lgamma log log1p logistic lt max
    min mul ne neg nextafter not or polygamma population_count pow real reduce_precision rem
    round rsqrt select_n shift_left shift_right_arithmetic shift_right_logical sign sin sinh
    sqrt square stop_gradient sub tan tanh xor zeta bessel_i0e bessel_i1e optimization_barrier
    sharding_constraint name""".split()
)
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
           "reduce_xor", "argmax", "argmin", "reduce"}  # fmt: skip
_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "remat2": "jaxpr", "checkpoint": "jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr"}  # fmt: skip


class Mixed(Exception):
    """Raised when an operation may mix examples; the message says which."""


class Batched(NamedTuple):
    """The example axis of a value: ``axis``; with ``block`` > 1 that axis has N * block
    entries and example i owns ``block`` consecutive ones (a merged reshape)."""

    axis: int
    block: int = 1


class Free(NamedTuple):
    """A value that does not depend on the batch; constant along the dims in ``uniform``."""

    uniform: frozenset = frozenset()


_SCALAR_FREE = Free(frozenset(range(64)))


class Proof(NamedTuple):
    """The outcome: ``example_fn`` (None when not shown, with ``reason``) and the row order."""

    example_fn: Callable | None
    order: np.ndarray | None
    reason: str


def _shape(v) -> tuple[int, ...]:
    return tuple(v.aval.shape)


def _compatible_free(state: Free, shape, axis: int) -> bool:
    """A batch-free operand meeting a batched one at ``axis`` must not vary along it."""
    return len(shape) == 0 or shape[axis] == 1 or axis in state.uniform


class _Prover:
    def __init__(self, n: int):
        self.n = n

    def run(self, jaxpr, states: list) -> list:
        jaxpr, _ = (jaxpr.jaxpr, jaxpr.consts) if isinstance(jaxpr, jcore.ClosedJaxpr) else (
            jaxpr, ())  # fmt: skip
        env: dict[Any, Any] = {}
        for v in jaxpr.constvars:
            env[v] = Free()
        for v, s in zip(jaxpr.invars, states, strict=True):
            env[v] = s

        def read(v):
            if isinstance(v, jcore.Literal):
                return _SCALAR_FREE if np.ndim(v.val) == 0 else Free()
            return env[v]

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self._eqn(eqn, ins)
            for v, s in zip(eqn.outvars, outs, strict=True):
                env[v] = s
        return [read(v) for v in jaxpr.outvars]

    def _eqn(self, eqn, ins) -> list:
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        if not any(isinstance(s, Batched) for s in ins):
            return [self._free(eqn, ins)] * n_out
        if name in _CALLS:
            return self.run(eqn.params[_CALLS[name]], ins)
        rule = getattr(self, "_" + name, None)
        if name in _ELEMENTWISE:
            return [self._elementwise(eqn, ins)] * n_out
        if rule is None:
            raise Mixed(f"{name} is applied to per-example values (not known to keep them apart)")
        out = rule(eqn, ins)
        return out if isinstance(out, list) else [out] * n_out

    # ------------------------------------------------------------------ batch-free values

    def _free(self, eqn, ins) -> Free:
        name = eqn.primitive.name
        out_shape = _shape(eqn.outvars[0])
        if name == "broadcast_in_dim":
            (op,) = ins[:1]
            dims = eqn.params["broadcast_dimensions"]
            in_shape = _shape(eqn.invars[0])
            uniform = {d for d in range(len(out_shape)) if d not in dims}
            uniform |= {
                dims[i] for i, s in enumerate(in_shape) if s == 1 and out_shape[dims[i]] != 1
            }
            uniform |= {dims[i] for i in op.uniform if i < len(dims)}
            return Free(frozenset(uniform))
        if name in _ELEMENTWISE:
            uniform = frozenset(range(len(out_shape)))
            for s, v in zip(ins, eqn.invars, strict=True):
                shape = np.shape(v.val) if isinstance(v, jcore.Literal) else _shape(v)
                if len(shape) == 0:
                    continue
                uniform &= s.uniform | {d for d, size in enumerate(shape) if size == 1}
            return Free(uniform)
        return Free()

    # ------------------------------------------------------------------ rules

    def _elementwise(self, eqn, ins) -> Batched:
        batched = {s for s in ins if isinstance(s, Batched)}
        if len(batched) != 1:
            raise Mixed(f"{eqn.primitive.name} combines values with different example axes")
        (b,) = batched
        for s, v in zip(ins, eqn.invars, strict=True):
            if isinstance(s, Free):
                shape = np.shape(v.val) if isinstance(v, jcore.Literal) else _shape(v)
                if not _compatible_free(s, shape, b.axis):
                    raise Mixed(
                        f"{eqn.primitive.name} combines per-example values with a constant that "
                        "has one entry per example (data closed over instead of passed in the "
                        "batch?)"
                    )
        return b

    def _broadcast_in_dim(self, eqn, ins):
        (b,) = ins[:1]
        dims = eqn.params["broadcast_dimensions"]
        out = dims[b.axis]
        if _shape(eqn.outvars[0])[out] != _shape(eqn.invars[0])[b.axis]:
            raise Mixed("broadcast_in_dim replicates the example axis")
        return Batched(out, b.block)

    def _reshape(self, eqn, ins):
        (b,) = ins[:1]
        if eqn.params.get("dimensions") is not None:
            raise Mixed("reshape with a transposition")
        old = _shape(eqn.invars[0])
        new = tuple(eqn.params["new_sizes"])
        pre = int(np.prod(old[: b.axis], dtype=np.int64))
        post = int(np.prod(old[b.axis + 1 :], dtype=np.int64))
        for k in range(len(new)):
            if int(np.prod(new[:k], dtype=np.int64)) != pre:
                continue
            if new[k] == old[b.axis] and int(np.prod(new[k + 1 :], dtype=np.int64)) == post:
                return Batched(k, b.block)
            if pre == 1 and new[k] % self.n == 0 and new[k] != 1:
                # The example owns a contiguous range: merged into (or split from) this axis.
                block = new[k] // self.n
                if block * int(np.prod(new[k + 1 :], dtype=np.int64)) == b.block * post:
                    return Batched(k, block)
        raise Mixed(f"reshape {old} -> {new} moves the example axis")

    def _transpose(self, eqn, ins):
        (b,) = ins
        perm = tuple(eqn.params["permutation"])
        return Batched(perm.index(b.axis), b.block)

    def _squeeze(self, eqn, ins):
        (b,) = ins
        dims = tuple(eqn.params["dimensions"])
        if b.axis in dims:
            raise Mixed("squeeze of the example axis")
        return Batched(b.axis - sum(d < b.axis for d in dims), b.block)

    def _expand_dims(self, eqn, ins):  # pragma: no cover - not a primitive in current JAX
        raise Mixed("expand_dims")

    def _reduce_axes(self, eqn, ins):
        (b,) = [s for s in ins if isinstance(s, Batched)][:1]
        axes = tuple(eqn.params["axes"])
        if b.axis in axes:
            raise Mixed(f"{eqn.primitive.name} reduces over the example axis")
        return Batched(b.axis - sum(a < b.axis for a in axes), b.block)

    def _cumulative(self, eqn, ins):
        (b,) = ins
        if eqn.params["axis"] == b.axis:
            raise Mixed(f"{eqn.primitive.name} accumulates along the example axis")
        return b

    def _dot_general(self, eqn, ins):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        lshape, rshape = _shape(eqn.invars[0]), _shape(eqn.invars[1])
        nb = len(lb)
        lfree = [d for d in range(len(lshape)) if d not in lc and d not in lb]
        rfree = [d for d in range(len(rshape)) if d not in rc and d not in rb]
        if isinstance(lhs, Batched) and isinstance(rhs, Batched):
            if lhs.axis in lb and rhs.axis in rb and lb.index(lhs.axis) == rb.index(rhs.axis):
                if lhs.block == rhs.block:
                    return Batched(lb.index(lhs.axis), lhs.block)
            raise Mixed("dot_general of two per-example values across examples")
        if isinstance(lhs, Batched):
            if lhs.axis not in lfree:
                raise Mixed("dot_general contracts (or pairs) the example axis")
            return Batched(nb + lfree.index(lhs.axis), lhs.block)
        if rhs.axis not in rfree:
            raise Mixed("dot_general contracts (or pairs) the example axis")
        return Batched(nb + len(lfree) + rfree.index(rhs.axis), rhs.block)

    def _conv_general_dilated(self, eqn, ins):
        lhs, rhs = ins
        dn = eqn.params["dimension_numbers"]
        if isinstance(rhs, Batched) or eqn.params.get("batch_group_count", 1) != 1:
            raise Mixed("convolution with a per-example kernel")
        if lhs.axis != dn.lhs_spec[0] or lhs.block != 1:
            raise Mixed("convolution over the example axis")
        return Batched(dn.out_spec[0], 1)

    def _reduce_window(self, eqn, ins):
        b = next(s for s in ins if isinstance(s, Batched))
        p = eqn.params
        a = b.axis
        if (p["window_dimensions"][a] != 1 or p["window_strides"][a] != 1
                or tuple(p["padding"][a]) != (0, 0)):  # fmt: skip
            raise Mixed("pooling window spans the example axis")
        return b

    def _slice(self, eqn, ins):
        (b,) = ins
        a = b.axis
        p = eqn.params
        full = _shape(eqn.invars[0])[a]
        strides = p.get("strides") or (1,) * len(p["start_indices"])
        if p["start_indices"][a] != 0 or p["limit_indices"][a] != full or strides[a] != 1:
            raise Mixed("slice along the example axis")
        return b

    def _pad(self, eqn, ins):
        b, value = ins
        if isinstance(value, Batched) or tuple(eqn.params["padding_config"][b.axis]) != (0, 0, 0):
            raise Mixed("pad along the example axis")
        return b

    def _concatenate(self, eqn, ins):
        b = self._elementwise_axis(eqn, ins)
        if eqn.params["dimension"] == b.axis:
            raise Mixed("concatenate along the example axis")
        return b

    def _elementwise_axis(self, eqn, ins) -> Batched:
        batched = {s for s in ins if isinstance(s, Batched)}
        if len(batched) != 1:
            raise Mixed(f"{eqn.primitive.name} of values with different example axes")
        (b,) = batched
        for s, v in zip(ins, eqn.invars, strict=True):
            if isinstance(s, Free) and not _compatible_free(s, _shape(v), b.axis):
                raise Mixed(f"{eqn.primitive.name} with a constant that varies per example")
        return b

    def _rev(self, eqn, ins):
        (b,) = ins
        if b.axis in eqn.params["dimensions"]:
            raise Mixed("rev reverses the example axis")
        return b

    def _sort(self, eqn, ins):
        b = self._elementwise_axis(eqn, ins)
        if eqn.params["dimension"] == b.axis:
            raise Mixed("sort along the example axis")
        return [b] * len(eqn.outvars)

    def _split(self, eqn, ins):
        (b,) = ins
        if eqn.params["axis"] == b.axis:
            raise Mixed("split along the example axis")
        return [b] * len(eqn.outvars)

    def _gather(self, eqn, ins):
        operand, indices = ins
        dn = eqn.params["dimension_numbers"]
        if (
            dn.operand_batching_dims
            or isinstance(operand, Batched)
            and isinstance(indices, Batched)
        ):
            raise Mixed("gather from per-example values at per-example indices")
        out_rank = len(_shape(eqn.outvars[0]))
        if isinstance(indices, Batched):  # an embedding lookup of per-example tokens
            idx_rank = len(_shape(eqn.invars[1]))
            if indices.axis == idx_rank - 1:
                raise Mixed("gather indexed along the example axis")
            batch_dims = [d for d in range(out_rank) if d not in dn.offset_dims]
            return Batched(batch_dims[indices.axis], indices.block)
        a = operand.axis
        full = _shape(eqn.invars[0])[a]
        if a in dn.collapsed_slice_dims or a in dn.start_index_map:
            raise Mixed("gather indexes the example axis")
        if eqn.params["slice_sizes"][a] != full:
            raise Mixed("gather slices the example axis")
        kept = [d for d in range(len(_shape(eqn.invars[0]))) if d not in dn.collapsed_slice_dims]
        return Batched(dn.offset_dims[kept.index(a)], operand.block)

    def _dynamic_slice(self, eqn, ins):
        b, *starts = ins
        if any(isinstance(s, Batched) for s in starts) or not isinstance(b, Batched):
            raise Mixed("dynamic_slice at per-example positions")
        if eqn.params["slice_sizes"][b.axis] != _shape(eqn.invars[0])[b.axis]:
            raise Mixed("dynamic_slice of the example axis")
        return b

    def _cond(self, eqn, ins):
        if isinstance(ins[0], Batched):
            raise Mixed("a branch chosen per example (lax.cond on per-example data)")
        outs = [self.run(branch, ins[1:]) for branch in eqn.params["branches"]]
        first = outs[0]
        if any(o != first for o in outs[1:]):
            raise Mixed("branches of lax.cond treat the example axis differently")
        return first

    def _scan(self, eqn, ins):
        p = eqn.params
        n_consts, n_carry = p["num_consts"], p["num_carry"]
        consts, carry, xs = ins[:n_consts], ins[n_consts : n_consts + n_carry], ins[
            n_consts + n_carry :]  # fmt: skip
        if any(isinstance(x, Batched) and x.axis == 0 for x in xs):
            raise Mixed("scan over the example axis")
        xs_in = [Batched(x.axis - 1, x.block) if isinstance(x, Batched) else Free() for x in xs]
        carry_in = list(carry)
        for _ in range(4):
            outs = self.run(p["jaxpr"], [*consts, *carry_in, *xs_in])
            carry_out = outs[:n_carry]
            joined = [_join(a, b) for a, b in zip(carry_in, carry_out, strict=True)]
            if joined == carry_in:
                ys = [Batched(y.axis + 1, y.block) if isinstance(y, Batched) else Free()
                      for y in outs[n_carry:]]  # fmt: skip
                return [*carry_out, *ys]
            carry_in = joined
        raise Mixed("scan carries do not settle")


for _name in _REDUCE:
    setattr(_Prover, "_" + _name, _Prover._reduce_axes)
for _name in _CUMULATIVE:
    setattr(_Prover, "_" + _name, _Prover._cumulative)
for _name in ("reduce_window_sum", "reduce_window_max", "reduce_window_min"):
    setattr(_Prover, "_" + _name, _Prover._reduce_window)


def _join(a, b):
    """The state that covers both a carry's entry and its update."""
    if a == b:
        return a
    if isinstance(a, Free) and isinstance(b, Batched):
        if b.axis in a.uniform:
            return b
    if isinstance(b, Free) and isinstance(a, Batched):
        if a.axis in b.uniform:
            return a
    raise Mixed("a scan carry changes how it holds the example axis")


def prove(residual_fn: Callable, params: Any, batch: Any, loss: Any) -> Proof:
    """Show that ``residual_fn(params, batch)`` treats every example apart, or say why not.

    The examples are the leading axis N of every batch leaf. With an ``OutputLoss`` the
    outputs are the first of the pair ``(z, t)`` the function returns, and t its targets.
    """
    from paribus._linearize._whiten import kind

    leaves = jax.tree.leaves(batch)
    n = int(np.shape(leaves[0])[0])
    output_loss = kind(loss) == "output"
    try:
        closed = jax.make_jaxpr(residual_fn)(params, batch)
    except Exception as err:  # noqa: BLE001 - the caller's own call will raise it again
        return Proof(None, None, f"the function could not be traced ({type(err).__name__})")
    out_tree = jax.tree.structure(jax.eval_shape(residual_fn, params, batch))
    n_params = len(jax.tree.leaves(params))
    states = [Free()] * n_params + [Batched(0, 1)] * len(leaves)
    try:
        if n == 1:
            outs = [Batched(0, 1)] * len(closed.jaxpr.outvars)
        else:
            outs = _Prover(n).run(closed.jaxpr, states)
    except Mixed as why:
        return Proof(None, None, f"rows may depend on other examples: {why}")
    out_avals = [v.aval for v in closed.jaxpr.outvars]
    if output_loss:
        out_leaves = jax.tree.unflatten(out_tree, list(zip(outs, out_avals, strict=True)))
        z_states = jax.tree.leaves(out_leaves[0], is_leaf=lambda x: isinstance(x, tuple))
        checked = z_states
    else:
        checked = list(zip(outs, out_avals, strict=True))
    blocks = []
    for state, aval in checked:
        if not isinstance(state, Batched) or state.axis != 0:
            return Proof(None, None, "an output does not carry the examples on its leading axis")
        if output_loss and (state.block != 1 or len(aval.shape) != 2):
            return Proof(None, None, "the outputs are not (N, m)")
        blocks.append(state.block * int(np.prod(aval.shape[1:], dtype=np.int64)))

    def example_fn(p, example):
        one = jax.tree.map(lambda a: jnp.asarray(a)[None], example)
        out = residual_fn(p, one)
        if output_loss:
            z, t = out
            return z[0], jax.tree.map(lambda a: a[0], t)
        return out

    # Tracing at one example must give each output its per-example share of rows.
    try:
        one = jax.eval_shape(
            example_fn, params, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                                             batch))  # fmt: skip
    except Exception as err:  # noqa: BLE001
        return Proof(None, None, f"the function fails on one example ({type(err).__name__})")
    got = [int(np.prod(leaf.shape, dtype=np.int64)) for leaf in jax.tree.leaves(
        one[0] if output_loss else one)]  # fmt: skip
    if got != blocks:
        return Proof(None, None, "on one example the function does not return one row block")
    order = None
    if not output_loss and len(blocks) > 1:
        from paribus._linearize._build import _leaf_major_order

        order = _leaf_major_order(n, blocks)
    return Proof(example_fn, order, "")
