"""What Gauss-Newton and Levenberg-Marquardt share: construction checks and setup.

Both states carry a :class:`paribus.solvers._info.StepInfo`, the one protocol ``pb.fit`` reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from paribus import _tree
from paribus.solvers import _cg, _cost, _model

PyTree = Any
DEFAULT_MEMORY_BUDGET = None
"""Bytes that "auto" lets a dense solve use (J and J^T J, or J J^T) before it picks cg; None:
``pb.memory.default_budget()`` (half the device's free memory), read at trace time."""


def require_extras(residual_fn, *, where: str) -> None:
    if residual_fn is None or not callable(residual_fn):
        raise TypeError(
            f"{where}.update needs the keyword extras residual_fn=... and batch=...: "
            "opt.update(grads, state, params, residual_fn=residual_fn, batch=batch). "
            f"Got residual_fn={residual_fn!r}."
        )


def check_loss(loss: Any, *, where: str) -> None:
    if loss is not None and not all(hasattr(loss, a) for a in ("name", "value", "whiten")):
        raise TypeError(
            f"{where}: loss must be None (1/2 ||r||^2) or an OutputLoss with name, value and "
            f"whiten, e.g. pb.losses.softmax_cross_entropy(); got {loss!r}."
        )


def check_cg(cg_max_steps: int, cg_tol: float, *, where: str) -> _cg.CGOptions:
    if int(cg_max_steps) < 1 or not float(cg_tol) >= 0:
        raise ValueError(
            f"{where}: need cg_max_steps >= 1 and cg_tol >= 0; got {cg_max_steps}, {cg_tol}."
        )
    return _cg.CGOptions(int(cg_max_steps), float(cg_tol))


def check_params(params: PyTree, *, where: str) -> None:
    _tree.check_float_params(params, where=where)


class Setup(NamedTuple):
    """What ``update`` works with: the model at params (in the working dtype), its form, the
    flat parameters, ``unravel`` (flat work-dtype vector -> update pytree in the parameters'
    own dtypes) and ``lift`` (parameters -> the working dtype the model was built in)."""

    model: _model.Model
    form: str
    flat: jax.Array
    unravel: Callable[[jax.Array], PyTree]
    lift: Callable[[PyTree], PyTree]


def lift_fn(params: PyTree) -> Callable[[PyTree], PyTree]:
    """Parameters -> the working dtype: float16 and bfloat16 leaves to float32, since LAPACK has
    no factorisations in them (the step is then computed in float32 and rounded back)."""
    low = [jnp.finfo(leaf.dtype).bits < 32 for leaf in jax.tree.leaves(params)]
    if not any(low):
        return lambda tree: tree

    def lift(tree: PyTree) -> PyTree:
        leaves, treedef = jax.tree.flatten(tree)
        up = [x.astype(_model.work_dtype(x.dtype)) if lo else x
              for x, lo in zip(leaves, low, strict=True)]  # fmt: skip
        return jax.tree.unflatten(treedef, up)

    return lift


def setup(
    residual_fn,
    params,
    batch,
    loss,
    solve,
    budget,
    *,
    where: str,
    cg_max_steps: int = 50,
    state=None,
    state_type: type | None = None,
    dense_only: bool = False,
) -> Setup:
    """The model at params and the solve form for its sizes (see :class:`Setup`);
    ``dense_only``: "auto" goes matrix-free only where no dense form fits (see
    ``_cost.choose``)."""
    if budget is None:
        from paribus import memory

        budget = memory.default_budget()
    require_extras(residual_fn, where=where)
    check_params(params, where=where)
    flat, unravel_own = ravel_pytree(params)
    lift = lift_fn(params)
    model = _model.build(residual_fn, lift(params), batch, loss, where=where)
    work = model.r.dtype

    def unravel(v: jax.Array) -> PyTree:
        return unravel_own(v.astype(flat.dtype))

    itemsize = np.dtype(work).itemsize
    form = _cost.choose(solve, int(model.r.shape[0]), flat.size, itemsize, budget,
                        model.linearization.plan, cg_max_steps=cg_max_steps,
                        dense_only=dense_only)  # fmt: skip
    if state_type is not None:
        check_state(state, state_type, n_params=flat.size, dtype=work, where=where)
    return Setup(model, form, flat.astype(work), unravel, lift)


def check_state(state, expected: type, *, n_params: int, dtype, where: str) -> None:
    """Trace-time: ``state`` is this optimiser's, built for parameters like these."""
    if not isinstance(state, expected):
        raise TypeError(
            f"{where}.update: expected the {expected.__name__} that this optimiser's init "
            f"returns; got {type(state).__name__}. A state belongs to the optimiser that built "
            "it: call opt.init(params) with this optimiser."
        )
    scale = getattr(state, "scale", None)
    if scale is not None and scale.shape != (n_params,):
        raise ValueError(
            f"{where}.update: the state was built for {scale.shape[0]} parameters; these params "
            f"have {n_params}. Call opt.init(params) for these parameters."
        )
    held = state.step_info.loss.dtype
    if held != dtype:
        raise ValueError(
            f"{where}.update: the state holds {held} numbers but these params compute in "
            f"{dtype}. Call opt.init(params) for these parameters."
        )


def scaled_norm(v: jax.Array, d: jax.Array | None) -> jax.Array:
    """||D^1/2 v|| (||v|| where D = I, ``d`` None): LM's step length in its scaling."""
    return jnp.linalg.norm(v if d is None else jnp.sqrt(d) * v)


def finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


def trial_structure_check(residual_fn, params, trial, batch, *, where: str) -> None:
    """Trace-time: the residuals at the trial point must have the structure they had at params."""
    before = jax.eval_shape(residual_fn, params, batch)
    after = jax.eval_shape(residual_fn, trial, batch)
    if jax.tree.structure(before) != jax.tree.structure(after) or jax.tree.leaves(
        before
    ) != jax.tree.leaves(after):
        raise ValueError(
            f"{where}: residual_fn changed its output structure between two parameter values: "
            f"{before} at params, {after} at the trial point. It must return the same pytree "
            "of arrays for every parameter value."
        )
