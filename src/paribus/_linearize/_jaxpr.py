"""Where the parameters enter a per-example function, read from its jaxpr.

A per-example function ``f(theta, x) -> z`` (m outputs for one example x) is traced once to a
jaxpr. Every value in it is classified by what it depends on:

- *derived parameters*: values computed from the parameters alone (and constants), the same
  for every example: ``W``, ``W.T``, ``reshape(b, (1, -1))``, ``exp(log_scale)``;
- *example values*: anything that depends on x.

A derived parameter meets the example at the first operation that takes both. When that
operation is linear in the derived parameter with the example values held fixed
(``dot_general``, a convolution, an elementwise product or sum, a concatenation, a gather), it
is a *use*: a layer. Adding a zero "tap" to a use's output y and differentiating with respect to
the taps gives the use's output cotangents D = dz / dy per example in one backward pass, and the
use's own input (the example-side operands) is recorded on the way forward. Then, exactly,

    d z_i / d W'  =  (the primitive's transpose in W')(inputs of example i, D_i),

and the columns of J for a parameter leaf follow through the derivative of the (example-free)
map from the leaves to the derived parameters. A leaf is *structured* when every path from it
to the outputs goes through a use; any other leaf (used inside ``scan``/``while``/``cond``,
under a ``custom_jvp``/``custom_vjp`` whose rule we cannot see through, in a nonlinear way with
example values, or passed straight to the output) falls back to per-example Jacobian columns.

This module only reads and re-evaluates jaxprs; :mod:`paribus._linearize.linearization` turns
the uses into kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

# Primitives whose body we evaluate ourselves (inline), so that uses inside them are found.
# Their semantics is exactly their body's: jit boundaries and rematerialisation only.
_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
           "remat2": "jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr"}  # fmt: skip

# Operations linear in the slot a derived parameter occupies, the example operands held fixed,
# and which example operands the transpose needs (the rest are replaced by zeros).
_BILINEAR = {"dot_general", "conv_general_dilated", "mul"}
_ADDITIVE = {"add", "sub", "add_any", "concatenate"}
_NEEDS_OPERANDS = {"select_n", "gather", "dynamic_slice", "div"}
_LINEAR_SLOTS: dict[str, Callable[[int], bool]] = {
    "select_n": lambda slot: slot >= 1,  # linear in the branches, given the predicate
    "gather": lambda slot: slot == 0,  # embedding tables: linear in the table
    "dynamic_slice": lambda slot: slot == 0,
    "div": lambda slot: slot == 0,  # W / a
}

# Pure layout operations: a derived parameter reached from one leaf through these alone is
# that leaf with its entries rearranged, so kernels of the derived parameter are the leaf's.
_LAYOUT = {"transpose", "reshape", "squeeze", "expand_dims", "copy", "copy_p",
           "convert_element_type", "broadcast_in_dim"}  # fmt: skip


@dataclass
class Use:
    """One operation where a derived parameter meets example values (a layer).

    Attributes:
      index: position in ``Analysis.uses``.
      primitive: the JAX primitive; ``params`` its bind parameters.
      slot: which operand is the derived parameter.
      operand_avals: per-example abstract values of every operand.
      out_aval: the per-example abstract value of the output (the tap's shape).
      recorded: operand slots whose (per-example) values the transpose needs.
      leaves: the parameter leaves the derived parameter depends on.
      layout_of: the leaf the derived parameter is a pure rearrangement of, else None.
      where: a short description for the plan (primitive and shapes).
      operand_vars, out_var: the jaxpr variables (to recognise a bias add that follows a
        dense layer: its example operand is the dot's output).
      out_consumers: how many equations (or jaxpr outputs) read the output.
    """

    index: int
    primitive: Any
    params: dict
    slot: int
    operand_avals: tuple
    out_aval: Any
    recorded: tuple[int, ...]
    leaves: frozenset
    layout_of: int | None
    where: str
    operand_vars: tuple = ()
    out_var: Any = None
    out_consumers: int = 0


@dataclass
class Analysis:
    """What the jaxpr of a per-example function says about each parameter leaf.

    Attributes:
      closed: the traced ``ClosedJaxpr`` of ``f(leaves, example_leaves) -> z_flat``.
      n_leaves: number of parameter leaves (the first jaxpr inputs).
      uses: every :class:`Use`, in evaluation order.
      fallback: leaf index -> why it falls back to per-example Jacobian columns.
      unused: leaves the outputs do not depend on (zero columns).
      actions: per equation of the top jaxpr, None (evaluate as is), ``("use", u)`` or
        ``("inline", actions of the body)``: a tree, because one body traced once (a
        ``jax.jit``-ed layer called twice) holds different uses at each call.
    """

    closed: Any
    n_leaves: int
    uses: list[Use] = field(default_factory=list)
    fallback: dict[int, str] = field(default_factory=dict)
    unused: set[int] = field(default_factory=set)
    actions: list = field(default_factory=list)

    def leaf_uses(self, k: int) -> list[Use]:
        return [u for u in self.uses if k in u.leaves]

    @property
    def structured(self) -> list[int]:
        return [k for k in range(self.n_leaves) if k not in self.fallback and k not in self.unused]


class _Info:
    """Abstract value of a jaxpr variable: does it depend on the example, on which leaves, and
    is it a pure rearrangement of one leaf (``layout``)?"""

    __slots__ = ("example", "leaves", "layout")

    def __init__(self, example: bool, leaves: frozenset, layout: int | None = None):
        self.example = example
        self.leaves = leaves
        self.layout = layout

    @property
    def derived(self) -> bool:
        return not self.example and bool(self.leaves)


_CONST = _Info(False, frozenset())


def _sub_jaxpr(eqn) -> Any:
    """The inlined body of a call-like equation (a ``Jaxpr`` or ``ClosedJaxpr``)."""
    return eqn.params[_INLINE[eqn.primitive.name]]


def _open(jaxpr) -> tuple[Any, Sequence[Any]]:
    """(Jaxpr, consts) of a Jaxpr or ClosedJaxpr."""
    if isinstance(jaxpr, jcore.ClosedJaxpr):
        return jaxpr.jaxpr, jaxpr.consts
    return jaxpr, ()


def _describe(eqn) -> str:
    shapes = " x ".join(str(tuple(v.aval.shape)) for v in eqn.invars)
    return f"{eqn.primitive.name} {shapes} -> {tuple(eqn.outvars[0].aval.shape)}"


def _is_layout(eqn, info_in: _Info) -> bool:
    if eqn.primitive.name not in _LAYOUT or len(eqn.invars) != 1 or info_in.layout is None:
        return False
    (out,) = eqn.outvars
    (inp,) = eqn.invars
    if np.prod(out.aval.shape, dtype=int) != np.prod(inp.aval.shape, dtype=int):
        return False  # a broadcast that replicates entries is not a rearrangement
    return jax.numpy.issubdtype(out.aval.dtype, jax.numpy.floating)


class _Analyser:
    def __init__(self):
        self.uses: list[Use] = []
        self.fallback: dict[int, str] = {}
        self.consumers: dict = {}

    def _fall(self, leaves, why: str) -> None:
        for k in leaves:
            self.fallback.setdefault(k, why)

    def run(self, jaxpr, infos_in: list[_Info]) -> tuple[list, list[_Info]]:
        """(actions, output infos) of one (sub-)jaxpr given its inputs' infos."""
        jaxpr, _ = _open(jaxpr)
        env: dict[Any, _Info] = {}
        for v in jaxpr.constvars:
            env[v] = _CONST
        for v, info in zip(jaxpr.invars, infos_in, strict=True):
            env[v] = info

        def read(v) -> _Info:
            return _CONST if isinstance(v, jcore.Literal) else env[v]

        self.consumers = _count_consumers(jaxpr)
        actions: list = []
        for eqn in jaxpr.eqns:
            action, outs = self._eqn(eqn, [read(v) for v in eqn.invars])
            actions.append(action)
            for v, info in zip(eqn.outvars, outs, strict=True):
                env[v] = info
        return actions, [read(v) for v in jaxpr.outvars]

    def _eqn(self, eqn, ins: list[_Info]):
        name = eqn.primitive.name
        example = any(i.example for i in ins)
        leaves = frozenset().union(*(i.leaves for i in ins))
        n_out = len(eqn.outvars)
        if not example:
            # The example-free part: evaluated once, differentiated only through its uses.
            layout = ins[0].layout if ins and _is_layout(eqn, ins[0]) else None
            return None, [_Info(False, leaves, layout)] * n_out
        plain = [_Info(True, leaves)] * n_out
        slots = [s for s, i in enumerate(ins) if i.derived]
        if not slots:
            return None, plain  # activations only: no parameter enters here
        if name in _INLINE:
            consumers = self.consumers
            actions, outs = self.run(_sub_jaxpr(eqn), ins)
            self.consumers = consumers
            return ("inline", actions), outs
        if len(slots) == 1 and n_out == 1 and self._linear_in(name, slots[0], eqn):
            return self._use(eqn, ins, slots[0]), plain
        why = f"enters {name} with example values"
        if name in ("scan", "while", "cond"):
            why = f"used inside {name}"
        elif name.startswith("custom_"):
            why = f"used inside a {name} (its derivative rule is opaque)"
        self._fall(frozenset().union(*(ins[s].leaves for s in slots)), why)
        return None, plain

    @staticmethod
    def _linear_in(name: str, slot: int, eqn) -> bool:
        if name in _BILINEAR or name in _ADDITIVE:
            if name == "conv_general_dilated":
                return eqn.params.get("batch_group_count", 1) == 1
            return True
        rule = _LINEAR_SLOTS.get(name)
        return rule is not None and rule(slot)

    def _use(self, eqn, ins, slot: int) -> tuple:
        name = eqn.primitive.name
        if name in _ADDITIVE:
            recorded: tuple[int, ...] = ()
        else:
            recorded = tuple(s for s, i in enumerate(ins) if s != slot and i.example)
        use = Use(
            index=len(self.uses),
            primitive=eqn.primitive,
            params=dict(eqn.params),
            slot=slot,
            operand_avals=tuple(v.aval for v in eqn.invars),
            out_aval=eqn.outvars[0].aval,
            recorded=recorded,
            leaves=ins[slot].leaves,
            layout_of=ins[slot].layout,
            where=_describe(eqn),
            operand_vars=tuple(eqn.invars),
            out_var=eqn.outvars[0],
            out_consumers=self.consumers.get(eqn.outvars[0], 0),
        )
        self.uses.append(use)
        return ("use", use.index)


def _count_consumers(jaxpr) -> dict:
    counts: dict[Any, int] = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                counts[v] = counts.get(v, 0) + 1
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal):
            counts[v] = counts.get(v, 0) + 1
    return counts


def analyse(fn: Callable, leaves: Sequence[Any], example: Any) -> Analysis:
    """Trace ``fn(leaves, example) -> z (m,)`` at one example and find its uses.

    ``leaves`` are the parameter leaves (arrays or ShapeDtypeStructs); ``example`` one example
    (a pytree). Returns an :class:`Analysis`; raises whatever tracing raises.
    """
    closed = jax.make_jaxpr(fn)(list(leaves), example)
    jaxpr = closed.jaxpr
    n = len(leaves)
    analyser = _Analyser()
    infos = [_Info(False, frozenset([k]), k) for k in range(n)]
    infos += [_Info(True, frozenset())] * (len(jaxpr.invars) - n)
    actions, outs = analyser.run(jaxpr, infos)
    for info in outs:
        if info.derived:
            analyser._fall(info.leaves, "reaches the outputs without meeting the example")
    reached = frozenset().union(*(i.leaves for i in outs))
    # A leaf that falls back is differentiated as a whole (its columns by per-example
    # Jacobians); a use whose derived parameter mixes it with structured leaves still serves
    # those, through the derivative of the example-free part.
    return Analysis(
        closed=closed,
        n_leaves=n,
        uses=analyser.uses,
        fallback=analyser.fallback,
        unused={k for k in range(n) if k not in reached},
        actions=actions,
    )


# ------------------------------------------------------------------------------ evaluation


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return out if eqn.primitive.multiple_results else [out]


class Evaluator:
    """Re-evaluates an analysed jaxpr, optionally with taps added to the uses' outputs.

    ``evaluate(leaves, example, taps)`` returns ``(outputs, recorded, derived)``:
    ``recorded[u]`` lists the operands of use u that its transpose needs, ``derived[u]`` is
    the derived parameter that entered it (example-free: under ``vmap`` it stays unbatched).
    ``taps`` is None or a list with one array per use, shaped like the use's output.
    """

    def __init__(self, analysis: Analysis):
        self.analysis = analysis

    def evaluate(self, leaves, example, taps=None):
        closed = self.analysis.closed
        args = list(leaves) + jax.tree.leaves(example)
        recorded: dict[int, list] = {}
        derived: dict[int, Any] = {}
        outs = self._run(
            closed.jaxpr, closed.consts, args, self.analysis.actions, taps, recorded, derived
        )
        n = len(self.analysis.uses)
        return outs, [recorded[u] for u in range(n)], [derived[u] for u in range(n)]

    def _run(self, jaxpr, consts, args, actions, taps, recorded, derived):
        env: dict[Any, Any] = {}
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = c
        for v, a in zip(jaxpr.invars, args, strict=True):
            env[v] = a

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for eqn, action in zip(jaxpr.eqns, actions, strict=True):
            invals = [read(v) for v in eqn.invars]
            if action is None:
                outs = _bind(eqn, invals)
            elif action[0] == "inline":
                sub, sub_consts = _open(_sub_jaxpr(eqn))
                outs = self._run(sub, sub_consts, invals, action[1], taps, recorded, derived)
            else:
                use = self.analysis.uses[action[1]]
                (out,) = _bind(eqn, invals)
                if taps is not None:
                    out = out + taps[use.index]
                recorded[use.index] = [invals[s] for s in use.recorded]
                derived[use.index] = invals[use.slot]
                outs = [out]
            for v, val in zip(eqn.outvars, outs, strict=True):
                env[v] = val
        return [read(v) for v in jaxpr.outvars]


def transpose_use(use: Use, operands: list, cotangent) -> Any:
    """d <cotangent, y> / d W' for one example: the use's primitive transposed in its slot.

    ``operands`` are the recorded example operands of the use (``use.recorded`` order); the
    others are zeros (the map is linear in the slot, so their values do not matter).
    """
    import jax.numpy as jnp

    values = [jnp.zeros(a.shape, a.dtype) for a in use.operand_avals]
    for s, val in zip(use.recorded, operands, strict=True):
        values[s] = val
    params = use.primitive.get_bind_params(use.params)

    def as_function_of_slot(w):
        vals = list(values)
        vals[use.slot] = w
        return use.primitive.bind(*vals, **params)

    _, pullback = jax.vjp(as_function_of_slot, values[use.slot])
    return pullback(cotangent.astype(use.out_aval.dtype))[0]
