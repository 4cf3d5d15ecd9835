"""The plan of a linearisation: what was found in the user's function, and how each parameter
leaf's columns of J are computed. Printed, it is a table a user reads to see what is fast."""

from __future__ import annotations

from dataclasses import dataclass

FORMS = {
    "factored": "Gram products of layer inputs and output cotangents (never forms its rows)",
    "rows": "its per-example gradient rows, from the layer's inputs and output cotangents",
    "columns": "per-example Jacobian columns of this leaf (fallback)",
    "unused": "the outputs do not depend on it (zero columns)",
    "opaque": "products with the whole-batch function (jvp / vjp); J by chunks of products",
}

SOURCES = {
    "per_example": "a per-example function (pb.per_example / pb.regression_residuals / "
    "network outputs)",
    "separable": "a whole-batch function, shown from its jaxpr to treat every example apart",
    "opaque": "a function of the whole batch",
    "no_batch": "a function without examples",
}


@dataclass(frozen=True)
class LeafPlan:
    """One parameter leaf: its name and shape, where it enters, and its form."""

    name: str
    shape: tuple[int, ...]
    form: str
    uses: tuple[str, ...] = ()
    note: str = ""

    @property
    def size(self) -> int:
        out = 1
        for s in self.shape:
            out *= s
        return out


@dataclass(frozen=True)
class Plan:
    """What :func:`pb.linearize` found and how it computes each block of J.

    Attributes:
      source: "per_example", "separable", "opaque" or "no_batch" (see ``SOURCES``).
      note: why the function is treated that way (for "opaque": what mixes examples, and how
        to mark the function with ``pb.per_example`` if its rows are in fact independent).
      n_examples, n_outputs: N and m (R = N m rows); n_params: P.
      leaves: one :class:`LeafPlan` per parameter leaf, in ``jax.tree`` order.
      loss: the loss's name ("squared" for 1/2 ||r||^2).
    """

    source: str
    note: str
    n_examples: int
    n_outputs: int
    n_params: int
    leaves: tuple[LeafPlan, ...]
    loss: str = "squared"

    def forms(self) -> dict[str, str]:
        """Leaf name -> form."""
        return {leaf.name: leaf.form for leaf in self.leaves}

    def __str__(self) -> str:
        head = (
            f"linearisation of {SOURCES[self.source]}: N = {self.n_examples} examples x "
            f"m = {self.n_outputs} outputs, P = {self.n_params:,} parameters, loss "
            f"{self.loss}"
        )
        lines = [head]
        if self.note:
            lines.append(f"  {self.note}")
        if self.leaves:
            width = max(len(leaf.name) for leaf in self.leaves)
            for leaf in self.leaves:
                where = "; ".join(leaf.uses) if leaf.uses else ""
                extra = f" ({leaf.note})" if leaf.note else ""
                lines.append(
                    f"  {leaf.name:<{width}}  {str(leaf.shape):<14} {leaf.form:<8} "
                    f"{where}{extra}".rstrip()
                )
        return "\n".join(lines)
