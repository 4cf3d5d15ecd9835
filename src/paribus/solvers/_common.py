"""What Gauss-Newton and Levenberg-Marquardt share: construction checks and setup.

Both states carry a :class:`paribus.solvers._info.StepInfo`, the one protocol ``pb.fit`` reads.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from paribus import _tree
from paribus.solvers import _linear, _model

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


def check_cg(cg_max_steps: int, cg_tol: float, *, where: str) -> _linear.CGOptions:
    if int(cg_max_steps) < 1 or not float(cg_tol) >= 0:
        raise ValueError(
            f"{where}: need cg_max_steps >= 1 and cg_tol >= 0; got {cg_max_steps}, {cg_tol}."
        )
    return _linear.CGOptions(int(cg_max_steps), float(cg_tol))


def check_params(params: PyTree, *, where: str) -> None:
    _tree.check_float_params(params, where=where)


def setup(residual_fn, params, batch, loss, solve, budget, *, where: str):
    """(model, form, flat, unravel): the model at params and the solve form for its sizes."""
    if budget is None:
        from paribus import memory

        budget = memory.default_budget()
    require_extras(residual_fn, where=where)
    check_params(params, where=where)
    flat, unravel = ravel_pytree(params)
    model = _model.build(residual_fn, params, batch, loss, where=where)
    itemsize = np.dtype(flat.dtype).itemsize
    form = _linear.choose(solve, int(model.r.shape[0]), flat.size, itemsize, budget)
    return model, form, flat, unravel


def true_grad_norm(model, gnorm: jax.Array) -> jax.Array:
    """||grad L||: the solve's ||J'^T rw||, except with an OutputLoss, whose whitening floors
    vanishing curvatures (saturated logits) so that J'^T rw can be far smaller than the true
    gradient: there one more VJP of the loss's own derivative (``Linearization.grad``)."""
    from paribus._linearize._whiten import kind

    lin = model.linearization
    if kind(lin.loss) != "output":
        return gnorm
    return jnp.linalg.norm(lin.grad_flat()).astype(gnorm.dtype)


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
