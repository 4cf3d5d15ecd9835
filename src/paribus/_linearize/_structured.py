"""The per-example backend: J of a per-example function from its layers' factors.

For ``example_fn(params, x_i) -> z_i (m,)`` over N examples, one forward pass of the batch
(``vmap`` of the re-evaluated jaxpr, with zero taps on every use's output) is linearised once.
From that one linearisation:

- r, J v and J^T u (one pass each);
- per use, the output cotangents D of every (whitened) output: m transposes with cotangent
  rows S_i[k, :] (one per output k), all examples at once because example i's taps reach only
  example i's outputs;
- from the uses' recorded inputs and D, each leaf's block of J J^T, diag(J^T J) and the
  per-example gradient norms, by the cheaper exact form: ``factored`` (Gram products of
  inputs and cotangents, for a dense layer at few positions) or ``rows`` (the leaf's
  per-example gradient rows, from the layer's transpose); leaves the analysis could not place
  (``columns``) by per-example Jacobians of just those leaves.

Nothing here forms a whole-batch Jacobian: every dense block is built per example.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paribus._linearize import _factored, _jaxpr
from paribus._linearize._kernel import Kernel
from paribus._linearize._plan import LeafPlan
from paribus._linearize._whiten import Whitening, whiten

PyTree = Any


def _leading(batch: PyTree) -> int:
    return int(jax.tree.leaves(batch)[0].shape[0])


def _first(batch: PyTree) -> PyTree:
    return jax.tree.map(lambda a: a[0], batch)


class Structured:
    """Everything :class:`~paribus.Linearization` needs, per example, in (N, m) layout.

    Args:
      z_fn: ``z_fn(leaves, example) -> z (m,)``: the differentiable outputs of one example.
      leaves: the parameter leaves (``jax.tree.leaves(params)``).
      names: their names, for the plan.
      batch: the examples, every leaf with a leading N axis.
      loss: None, an ``OutputLoss`` or a ``ResidualLoss``; targets (N, ...) for an
        ``OutputLoss``.
    """

    def __init__(self, z_fn: Callable, leaves: list, names: list[str], batch: PyTree, loss,
                 targets, analysis: _jaxpr.Analysis | None):  # fmt: skip
        self.z_fn = z_fn
        self.leaves = list(leaves)
        self.names = names
        self.batch = batch
        self.loss = loss
        self.targets = targets
        self.n = _leading(batch)
        self.analysis = analysis
        uses = analysis.uses if analysis is not None else []
        fallback = set(range(len(leaves))) if analysis is None else set(analysis.fallback)
        unused = set() if analysis is None else set(analysis.unused)
        self.fallback = [k for k in range(len(leaves)) if k in fallback and k not in unused]
        self.unused = sorted(unused)
        structured = [k for k in range(len(leaves)) if k not in fallback and k not in unused]
        # Only uses that serve a structured leaf need a tap.
        self.uses = [u for u in uses if u.leaves & set(structured)]
        self._forward(uses)
        self.m = int(self.z.shape[1])
        self._choose_forms(structured)

    # ------------------------------------------------------------------ forward and taps

    def _forward(self, all_uses) -> None:
        evaluator = _jaxpr.Evaluator(self.analysis) if self.analysis is not None else None
        tapped = {u.index for u in self.uses}
        self.tap_index = {u.index: i for i, u in enumerate(self.uses)}
        n = self.n

        def batched(leaves, taps):
            if evaluator is None:
                return jax.vmap(lambda ex: self.z_fn(leaves, ex))(self.batch), []

            def one(ex, tp):
                full = [None] * len(all_uses)
                for u, t in zip(self.uses, tp, strict=True):
                    full[u.index] = t
                full = [
                    t if t is not None else jnp.zeros(all_uses[i].out_aval.shape,
                                                      all_uses[i].out_aval.dtype)
                    for i, t in enumerate(full)
                ]  # fmt: skip
                outs, recorded, _ = evaluator.evaluate(leaves, ex, full)
                z = jnp.ravel(outs[0]) if len(outs) == 1 else jnp.concatenate(
                    [jnp.ravel(o) for o in outs])  # fmt: skip
                return z, [recorded[u.index] for u in self.uses if u.index in tapped]

            return jax.vmap(one)(self.batch, taps)

        taps0 = [jnp.zeros((n, *u.out_aval.shape), u.out_aval.dtype) for u in self.uses]
        self.taps0 = taps0
        z, self._lin, recorded = jax.linearize(batched, self.leaves, taps0, has_aux=True)
        self.z = z
        self.recorded = recorded
        self._transpose = jax.linear_transpose(self._lin, self.leaves, taps0)
        self.whitening: Whitening = whiten(self.loss, z, self.targets)
        self._zero_leaves = [jnp.zeros_like(leaf) for leaf in self.leaves]

    # ------------------------------------------------------------------ products

    def jvp(self, tangent_leaves: list) -> jax.Array:
        """(S J v) (N, m)."""
        zero_taps = [jnp.zeros_like(t) for t in self.taps0]
        return self.whitening.forward(self._lin(list(tangent_leaves), zero_taps))

    def vjp(self, u: jax.Array) -> list:
        """J^T S^T u as leaves, for u (N, m)."""
        return self.vjp_outputs(self.whitening.backward(u))

    def vjp_outputs(self, c: jax.Array) -> list:
        """J^T c as leaves for a cotangent c (N, m) of the outputs themselves (unwhitened)."""
        return self._transpose(c.astype(self.z.dtype))[0]

    def _at_taps(self, cotangent: jax.Array) -> list:
        """Cotangents at every tap for an output cotangent (N, m)."""
        return self._transpose(cotangent.astype(self.z.dtype))[1]

    def signals(self) -> list:
        """Per use, D (N, m, *y): d (S z)_k / dy for every whitened output k."""
        if not self.uses:
            return []
        per_k = jax.vmap(self._at_taps)(self.whitening.rows())  # list of (m, N, *y)
        return [jnp.swapaxes(d, 0, 1) for d in per_k]

    # ------------------------------------------------------------------ forms

    def _choose_forms(self, structured: list[int]) -> None:
        self.form: dict[int, str] = {k: "rows" for k in structured}
        self.layouts: dict[int, _factored.DotLayout] = {}
        self.notes: dict[int, str] = {}
        for k in structured:
            uses = [u for u in self.uses if k in u.leaves]
            if len(uses) != 1:
                self.notes[k] = f"{len(uses)} uses"
                continue
            (u,) = uses
            if u.primitive.name != "dot_general" or u.layout_of != k or u.leaves != {k}:
                continue
            layout = _factored.dot_layout(u)
            factored, rows = _factored.costs(layout, self.n, self.m)
            self.layouts[u.index] = layout
            if factored <= rows:
                self.form[k] = "factored"
            self.notes[k] = f"{layout.sizes[2]} position(s)" if layout.sizes[2] > 1 else ""
        self.bias_of: dict[int, Any] = {}
        self._fuse_biases()
        factored_leaves = {k for k, f in self.form.items() if f == "factored"}
        self.factored_uses = [u for u in self.uses if u.index in self.layouts and
                              next(iter(u.leaves)) in factored_leaves]  # fmt: skip
        fused = {v.index for v in self.bias_of.values()}
        self.row_uses = [
            u for u in self.uses if not u.leaves <= factored_leaves and u.index not in fused
        ]  # fmt: skip
        self.row_leaves = [k for k, f in sorted(self.form.items()) if f == "rows"]

    def _fuse_biases(self) -> None:
        """A bias added right after a factored dense layer at one position joins its kernel:
        y = x W + b is x' W' with x' = [x, 1] and W' = [W; b], so the bias costs a column of
        ones in the layer's inputs instead of a Gram product of its own (the "+ 1" of the
        classic MLP formula (A A^T + 1) * (D D^T))."""
        for v in self.uses:
            if v.primitive.name not in ("add", "add_any") or len(v.leaves) != 1:
                continue
            (kb,) = v.leaves
            if v.layout_of != kb or self.form.get(kb) != "rows":
                continue
            if len([u for u in self.uses if kb in u.leaves]) != 1:
                continue
            other = v.operand_vars[1 - v.slot]
            dot = next((u for u in self.uses if u.out_var is other), None)
            if dot is None or dot.index not in self.layouts or dot.out_consumers != 1:
                continue
            (kw,) = dot.leaves
            b, _, s, f = self.layouts[dot.index].sizes
            bias_size = int(np.prod(v.operand_avals[v.slot].shape, dtype=np.int64))
            if (self.form.get(kw) != "factored" or b != 1 or s != 1 or bias_size != f
                    or tuple(v.out_aval.shape) != tuple(dot.out_aval.shape)):  # fmt: skip
                continue
            self.bias_of[dot.index] = v
            self.form[kb] = "factored"
            self.notes[kb] = f"bias of {self.names[kw]}"

    def plan_leaves(self) -> list[LeafPlan]:
        out = []
        for k, (name, leaf) in enumerate(zip(self.names, self.leaves, strict=True)):
            shape = tuple(np.shape(leaf))
            if k in self.form:
                uses = tuple(u.where for u in self.uses if k in u.leaves)
                out.append(LeafPlan(name, shape, self.form[k], uses, self.notes.get(k, "")))
            elif k in self.unused:
                out.append(LeafPlan(name, shape, "unused"))
            else:
                why = self.analysis.fallback.get(k, "") if self.analysis is not None else ""
                out.append(LeafPlan(name, shape, "columns", (), why))
        return out

    # ------------------------------------------------------------------ blocks of J

    def _x(self, use, recorded) -> jax.Array:
        """Canonical inputs (N, B, C, S) of a factored use, with a column of ones appended
        when a bias is fused into it (C + 1)."""
        layout = self.layouts[use.index]
        x = _factored.canonical_x(layout, recorded[self.tap_index[use.index]][0])
        if use.index in self.bias_of:
            x = jnp.concatenate([x, jnp.ones_like(x[:, :, :1])], axis=2)
        return x

    def _derived_pullback(self, uses: list):
        """The transpose of leaves -> the uses' derived parameters (example-free)."""
        evaluator = _jaxpr.Evaluator(self.analysis)
        example = _first(self.batch)
        full_taps = [jnp.zeros(u.out_aval.shape, u.out_aval.dtype) for u in self.analysis.uses]

        def derived(leaves):
            _, _, values = evaluator.evaluate(leaves, example, full_taps)
            return [values[u.index] for u in uses]

        _, pullback = jax.vjp(derived, self.leaves)
        return pullback

    def _rows(self, signals: list, leaves_wanted: list[int], uses: list):
        """Per-example rows (N, m, *leaf) of the wanted leaves from the given uses' signals."""
        if not leaves_wanted:
            return {}
        grads = []
        for u in uses:
            i = self.tap_index[u.index]
            rec = self.recorded[i]
            d = signals[i]  # (N, m, *y)

            def one(rec_i, d_ij, u=u):
                return _jaxpr.transpose_use(u, rec_i, d_ij)

            per_example = jax.vmap(lambda r_i, d_i, one=one: jax.vmap(lambda dd: one(r_i, dd))(
                d_i))  # fmt: skip
            grads.append(per_example(rec, d))  # (N, m, *w)
        pullback = self._derived_pullback(uses)
        m = grads[0].shape[1]
        flat = [g.reshape(self.n * m, *g.shape[2:]) for g in grads]
        rows = jax.vmap(lambda gs: pullback(list(gs))[0])(flat)
        return {k: rows[k].reshape(self.n, m, *np.shape(self.leaves[k])) for k in leaves_wanted}

    def _columns(self, ks: list[int] | None = None) -> dict[int, jax.Array]:
        """Per-example Jacobian blocks (N, m, *leaf), whitened, of the leaves ``ks`` (default:
        the fallback leaves), by reverse (or forward) mode per example."""
        ks = self.fallback if ks is None else ks
        if not ks:
            return {}

        def one(ex):
            def f(sub):
                leaves = list(self.leaves)
                for k, leaf in zip(ks, sub, strict=True):
                    leaves[k] = leaf
                return self.z_fn(leaves, ex)

            sub = [self.leaves[k] for k in ks]
            total = sum(int(np.size(s)) for s in sub)
            return (jax.jacfwd if total < self.m else jax.jacrev)(f)(sub)

        blocks = jax.vmap(one)(self.batch)
        out = {}
        for k, block in zip(ks, blocks, strict=True):
            shape = np.shape(self.leaves[k])
            flat = self.whitening.blocks(block.reshape(self.n, self.m, -1))
            out[k] = flat.reshape(self.n, self.m, *shape)
        return out

    def _derived_linear(self, uses: list):
        """(jvp, transpose) of leaves -> the uses' derived parameters (example-free; for the
        factored uses a pure rearrangement of each leaf)."""
        evaluator = _jaxpr.Evaluator(self.analysis)
        example = _first(self.batch)
        full_taps = [jnp.zeros(u.out_aval.shape, u.out_aval.dtype) for u in self.analysis.uses]

        def derived(leaves):
            _, _, values = evaluator.evaluate(leaves, example, full_taps)
            return [values[u.index] for u in uses]

        _, forward = jax.linearize(derived, self.leaves)
        return forward, jax.linear_transpose(forward, self.leaves)

    def _stack(self, blocks: dict) -> tuple[jax.Array | None, list]:
        """Per-leaf blocks (N, m, *leaf) -> one (N m, P') matrix and its [(leaf, size)]."""
        if not blocks:
            return None, []
        index = [(k, int(np.size(self.leaves[k]))) for k in sorted(blocks)]
        nm = self.n * self.m
        rows = jnp.concatenate([blocks[k].reshape(nm, -1) for k, _ in index], axis=1)
        return rows, index

    def kernel(self) -> Kernel:
        """The factors of S J (see :class:`Kernel`): its Gram matrix, J^T u and J v."""
        if not self.factored_uses:
            # Every block is rows: the layers' output cotangents would be computed only to
            # rebuild per-example gradients, which reverse mode per example does directly.
            rows, index = self._stack(self._columns(self.row_leaves + self.fallback))
            return Kernel(self, [], rows, index, None, None)
        signals = self.signals()
        factors = []
        for u in self.factored_uses:
            d = _factored.canonical_d(self.layouts[u.index], signals[self.tap_index[u.index]])
            factors.append((u, self._x(u, self.recorded), d))
        blocks = self._rows(signals, self.row_leaves, self.row_uses)
        blocks.update(self._columns())
        rows, index = self._stack(blocks)
        uses = [u for u, _, _ in factors]
        uses += [self.bias_of[u.index] for u in uses if u.index in self.bias_of]
        forward, transpose = self._derived_linear(uses)
        return Kernel(self, factors, rows, index, forward, transpose)

    def ntk(self, other: Structured | None = None) -> jax.Array:
        """S J J'^T S'^T (N m, N' m), example-major; ``other`` another batch's backend of the
        same function (default: this one)."""
        mine = self.kernel()
        return mine.matrix(None if other is None else other.kernel())

    def dense_structured(self) -> jax.Array:
        """S J (N, m, P) assembled from the layers' factors (each block of rows by the layer's
        transpose; fallback leaves by per-example Jacobians): the "structured" Jacobian."""
        signals = self.signals()
        wanted = [k for k in self.form]
        rows = self._rows(signals, wanted, self.uses)
        rows.update(self._columns())
        blocks = []
        for k, leaf in enumerate(self.leaves):
            if k in rows:
                blocks.append(rows[k].reshape(self.n, self.m, -1))
            else:
                blocks.append(jnp.zeros((self.n, self.m, int(np.size(leaf))), self.z.dtype))
        return jnp.concatenate(blocks, axis=2)

    def jtj_diag(self) -> list:
        """diag(J^T S^T S J) as leaves."""
        signals = self.signals()
        out = [jnp.zeros_like(leaf) for leaf in self.leaves]
        one_position = [
            u for u in self.factored_uses if self.layouts[u.index].sizes[2] == 1
        ]  # fmt: skip
        for u in one_position:
            i = self.tap_index[u.index]
            layout = self.layouts[u.index]
            x = self._x(u, self.recorded)
            d = _factored.canonical_d(layout, signals[i])
            bcf = _factored.diag_one_position(x, d)
            c = layout.sizes[1]
            diag_w = _factored.to_parameter_layout(layout, bcf[:, :c])
            targets = [(u, diag_w)]
            bias = self.bias_of.get(u.index)
            if bias is not None:
                targets.append((bias, bcf[0, c].reshape(bias.operand_avals[bias.slot].shape)))
            for use, diag in targets:
                (k,) = use.leaves
                # A pure rearrangement of the leaf: its transpose maps squares to squares.
                pulled = self._derived_pullback([use])([diag.astype(use.operand_avals[use.slot]
                                                                    .dtype)])  # fmt: skip
                out[k] = pulled[0][k].astype(out[k].dtype)
        many = [u for u in self.factored_uses if u not in one_position]
        wanted = self.row_leaves + [next(iter(u.leaves)) for u in many]
        rows = self._rows(signals, wanted, self.row_uses + many)
        rows.update(self._columns())
        for k, block in rows.items():
            out[k] = jnp.sum(jnp.square(block), axis=(0, 1)).astype(out[k].dtype)
        return out

    def per_example_sq_norms(self) -> jax.Array:
        """||J_i^T S_i^T rw_i||^2 (N,): each example's loss gradient, squared norm."""
        cot = self.whitening.backward(self.whitening.rw)  # grad_z of each example's loss
        total = jnp.zeros((self.n,), self.z.dtype)
        deltas = self._at_taps(cot) if self.uses else []
        for u in self.factored_uses:
            i = self.tap_index[u.index]
            layout = self.layouts[u.index]
            x = self._x(u, self.recorded)
            delta = _factored.canonical_d(layout, deltas[i][:, None])[:, 0]
            total = total + _factored.sq_norms(x, delta).astype(total.dtype)
        if self.row_leaves:
            as_signals = [d[:, None] for d in deltas]  # one "output": the loss
            rows = self._rows(as_signals, self.row_leaves, self.row_uses)
            for block in rows.values():
                total = total + jnp.sum(jnp.square(block.reshape(self.n, -1)), axis=1)
        cols = self._columns()
        for block in cols.values():
            g = jnp.einsum("nm,nmp->np", self.whitening.rw, block.reshape(self.n, self.m, -1))
            total = total + jnp.sum(jnp.square(g), axis=1)
        return total

    def dense(self, chunk_size: int | None) -> jax.Array:
        """S J (N, m, P) by per-example Jacobians, ``chunk_size`` examples at a time."""
        n_params = sum(int(np.size(leaf)) for leaf in self.leaves)

        def one(ex):
            jac = (jax.jacfwd if n_params < self.m else jax.jacrev)(self.z_fn)(self.leaves, ex)
            return jnp.concatenate([j.reshape(self.m, -1) for j in jac], axis=1)

        if chunk_size is None:
            blocks = jax.vmap(one)(self.batch)
        else:
            blocks = jax.lax.map(one, self.batch, batch_size=chunk_size)
        return self.whitening.blocks(blocks)
