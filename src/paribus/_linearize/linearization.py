"""The :class:`Linearization`: the Gauss-Newton model at the current parameters, built by
:func:`pb.linearize` (``paribus._linearize._build``) over one of two backends (per example,
``_structured``; whole batch, ``_opaque``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from paribus import _tree
from paribus._linearize._opaque import Opaque
from paribus._linearize._plan import Plan
from paribus._linearize._structured import Structured
from paribus._linearize._whiten import kind

PyTree = Any


class Linearization:
    """The Gauss-Newton model of an objective at ``params``: built once, used by everything.

    Rows are in the order of ``ravel_pytree(residual_fn(params, batch))`` (for a loss at the
    outputs: example i, output j at row ``i*m + j``); columns in ``ravel_pytree(params)`` order.

    Attributes:
      value: the loss L(theta) (1/2 ||r||^2, or the loss's value).
      r: (R,) the residuals (whitened for a loss: the model is 1/2 ||r + J delta||^2).
      plan: a :class:`Plan`: what was found in the function and how each leaf's columns are
        computed. ``print(lin.plan)`` shows it.
      n_residuals, n_params: R and P; n_examples: N (None without examples).
      loss: the loss in use (None: 1/2 ||r||^2), given or carried by the residual function.
    """

    def __init__(self, backend, params: PyTree, plan: Plan, order: np.ndarray | None, loss):
        self._backend = backend
        self.loss = loss
        self._leaves, self._treedef = jax.tree.flatten(params)
        self._order = order
        self._inverse = None if order is None else np.argsort(order)
        self.plan = plan
        w = backend.whitening
        self.value = w.value
        self.r = self._to_user(w.rw)
        self.n_residuals = int(self.r.shape[0])
        self.n_params = _tree.num_params(params)
        self.n_examples = plan.n_examples if plan.source in ("per_example", "separable") else None
        self._shape = w.rw.shape
        # What the objective is a function of: (N, m) outputs for an OutputLoss, else the
        # residuals (R,) in the user's order (see trial_outputs).
        output_loss = kind(loss) == "output"
        self.outputs = backend.z if output_loss else self._to_user(backend.z)
        self.targets = getattr(backend, "targets", None)
        # The rounding of L as evaluated: changes of L below it cannot be measured. Each term of
        # L moves by about eps |dL/dz_k| |z_k| when z_k is recomputed (eps of z's dtype).
        grad_z = self._grad_z()
        eps = jnp.finfo(w.rw.dtype).eps
        self.noise = 8 * eps * (jnp.abs(self.value) + jnp.sum(jnp.abs(grad_z * backend.z)))

    def trial_outputs(self, out: Any) -> jax.Array:
        """``residual_fn(trial, batch)`` laid out like :attr:`outputs`."""
        if kind(self.loss) == "output":
            return out[0]
        return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(out)])

    def decrease(self, trial_out: Any) -> tuple[jax.Array, jax.Array]:
        """(L - L_trial, L_trial) for ``trial_out = residual_fn(trial, batch)``, computed
        without cancellation (see ``paribus._linearize._whiten.decrease``)."""
        from paribus._linearize._whiten import decrease

        z1 = self.trial_outputs(trial_out).astype(self.outputs.dtype)
        return decrease(self.loss, self.outputs, z1, self.targets, self.value)

    # Row order: the backends work in (N, m), example-major; users see their own order.
    def _to_user(self, rows_nm: jax.Array) -> jax.Array:
        flat = rows_nm.reshape(-1)
        return flat if self._order is None else flat[self._order]

    def _from_user(self, u: jax.Array) -> jax.Array:
        u = jnp.asarray(u)
        if u.shape != (self.n_residuals,):
            raise ValueError(
                f"Linearization.vjp: expected a cotangent of shape ({self.n_residuals},) (one "
                f"entry per residual); got {u.shape}."
            )
        flat = u if self._inverse is None else u[self._inverse]
        return flat.reshape(self._shape)

    def _unflatten(self, leaves: list) -> PyTree:
        return jax.tree.unflatten(self._treedef, leaves)

    def jvp(self, tangent: PyTree) -> jax.Array:
        """J v (R,) for a tangent v shaped like ``params``."""
        leaves = _leaves_like(tangent, self._treedef, self._leaves, where="Linearization.jvp")
        return self._to_user(self._backend.jvp(leaves))

    def vjp(self, cotangent: jax.Array) -> PyTree:
        """J^T u, shaped like ``params``, for u (R,)."""
        return self._unflatten(self._backend.vjp(self._from_user(cotangent)))

    def grad(self) -> PyTree:
        """grad L = J^T dL/dz, shaped like ``params``: J^T r for 1/2 ||r||^2.

        With a loss this is the true gradient, taken through the loss's own derivative at the
        outputs, not J'^T rw of the whitened model: the two differ where a whitening floors a
        vanishing curvature (softmax cross-entropy on saturated logits).
        """
        return self._unflatten(self._backend.vjp_outputs(self._grad_z()))

    def grad_flat(self) -> jax.Array:
        return jnp.concatenate([jnp.ravel(g) for g in self._backend.vjp_outputs(self._grad_z())])

    def _grad_z(self) -> jax.Array:
        """dL/dz (N, m) in the backend's layout."""
        w = self._backend.whitening
        if kind(self.loss) != "output":
            return w.backward(w.rw)  # exact: S^T rw = z, or rho'(z) z for a robust loss
        loss, targets = self.loss, self.targets
        return jax.grad(lambda z: jnp.sum(jax.vmap(loss.value)(z, targets)))(self._backend.z)

    def ntk(self, *, memory_budget: int | None = None) -> jax.Array:
        """K = J J^T (R, R), the empirical neural tangent kernel of the (whitened) rows."""
        if isinstance(self._backend, Opaque):
            kernel = self._backend.ntk(self._chunk(memory_budget))
        else:
            kernel = self._backend.ntk()
        if self._order is None:
            return kernel
        return kernel[self._order][:, self._order]

    def kernel(self, *, memory_budget: int | None = None) -> KernelOps:
        """K = J J^T with the products that reuse what built it (see :class:`KernelOps`)."""
        if isinstance(self._backend, Opaque):
            jac = self._backend.dense(self._chunk(memory_budget))
            jac = jac.reshape(-1, jac.shape[-1])
            return KernelOps(self, jac @ jac.T, lambda u: jac.T @ u, lambda v: jac @ v)
        kern = self._backend.kernel()

        def vjp_flat(u):
            return _concat(kern.vjp(self._from_user(u)))

        def jvp_flat(v):
            return self._to_user(kern.jvp(jax.tree.leaves(self._unravel(v))))

        matrix = kern.matrix()
        if self._order is not None:
            matrix = matrix[self._order][:, self._order]
        return KernelOps(self, matrix, vjp_flat, jvp_flat)

    def jtj_diag(self, *, memory_budget: int | None = None) -> PyTree:
        """diag(J^T J) shaped like ``params``: the squared column norms of J."""
        if isinstance(self._backend, Opaque):
            return self._unflatten(self._backend.jtj_diag(self._chunk(memory_budget)))
        return self._unflatten(self._backend.jtj_diag())

    def per_example_grad_norms(self) -> jax.Array:
        """||g_i|| (N,): the norm of the gradient of example i's loss, for every example."""
        if isinstance(self._backend, Opaque):
            raise ValueError(
                "per_example_grad_norms: this residual function is not per example ("
                f"{self.plan.note or self.plan.source}); per-example gradients are not "
                "defined. Mark it with pb.per_example(example_fn) if its rows are independent."
            )
        return jnp.sqrt(self._backend.per_example_sq_norms())

    def dense(self, *, memory_budget: int | None = None, structured: bool = False) -> jax.Array:
        """J (R, P), built per example (or from chunked products) within ``memory_budget``
        bytes (default: half the device's free memory). ``structured=True`` assembles the
        rows of each placed leaf from its layer's inputs and output cotangents instead of
        per-example reverse mode (the same numbers: a twin for tests)."""
        if structured and isinstance(self._backend, Structured):
            jac = self._backend.dense_structured()
        else:
            jac = self._backend.dense(self._chunk(memory_budget))
        jac = jac.reshape(-1, jac.shape[-1])
        return jac if self._order is None else jac[self._order]

    def _chunk(self, budget: int | None) -> int | None:
        from paribus import memory

        n, m = self._shape
        dtype = self._backend.z.dtype
        if isinstance(self._backend, Opaque):
            # Chunks of products: each holds one row (or column) of J at a time.
            per = max(self.n_params, self.n_residuals) * np.dtype(dtype).itemsize
            return memory.chunk_size(
                min(self.n_params, self.n_residuals), 4 * per,
                fixed_bytes=self.n_residuals * self.n_params * np.dtype(dtype).itemsize,
                budget=budget, what="the Jacobian",
            )  # fmt: skip
        return memory.jacobian_chunk_size(n, m, self.n_params, dtype, budget=budget)

    # Flat views for the solvers (the linear-algebra boundary).
    def jvp_flat(self, v: jax.Array) -> jax.Array:
        return self.jvp(self._unravel(v))

    def vjp_flat(self, u: jax.Array) -> jax.Array:
        return _concat(self._backend.vjp(self._from_user(u)))

    def jtj_diag_flat(self) -> jax.Array:
        return jnp.concatenate([jnp.ravel(d) for d in jax.tree.leaves(self.jtj_diag())])

    def _unravel(self, v: jax.Array) -> PyTree:
        sizes = [int(np.size(leaf)) for leaf in self._leaves]
        parts = jnp.split(v, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [v]
        leaves = [p.reshape(np.shape(leaf)) for p, leaf in zip(parts, self._leaves, strict=True)]
        return self._unflatten(leaves)

    def __repr__(self) -> str:
        return (
            f"Linearization(R={self.n_residuals}, P={self.n_params}, source={self.plan.source!r})"
        )


class KernelOps(NamedTuple):
    """K = J J^T (R, R) and flat products J^T u (P,) and J v (R,) computed from the same
    factors (dense layers' inputs and output cotangents, per-example rows of the others): for
    the dual form of LM, which needs K, then J^T alpha, and to refine J J^T p, without another
    pass through the network for each."""

    linearization: Any
    matrix: jax.Array
    vjp_flat: Callable[[jax.Array], jax.Array]
    jvp_flat: Callable[[jax.Array], jax.Array]


def _concat(leaves: list) -> jax.Array:
    return jnp.concatenate([jnp.ravel(g) for g in leaves])


def _leaves_like(tree: PyTree, treedef, leaves: list, *, where: str) -> list:
    """The leaves of ``tree``, checked to have the structure and shapes of ``params``."""
    got = jax.tree.structure(tree)
    if got != treedef:
        raise ValueError(f"{where}: expected a pytree shaped like params ({treedef}); got {got}.")
    out = []
    for a, b in zip(jax.tree.leaves(tree), leaves, strict=True):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"{where}: expected leaves shaped like params; got {np.shape(a)} where params "
                f"has {np.shape(b)}."
            )
        out.append(jnp.asarray(a).astype(jnp.result_type(b)))
    return out


def cross_ntk(lin: Linearization, other: Linearization) -> jax.Array:
    """J(batch) J(other batch)^T (R, R') for two linearisations of one per-example function."""
    if not (isinstance(lin._backend, Structured) and isinstance(other._backend, Structured)):
        raise ValueError("a kernel between two batches needs a per-example function.")
    kernel = lin._backend.ntk(other._backend)
    if lin._order is not None:
        kernel = kernel[lin._order]
    if other._order is not None:
        kernel = kernel[:, other._order]
    return kernel
