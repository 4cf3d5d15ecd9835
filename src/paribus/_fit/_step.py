"""One step of the loop: evaluate theta_k and ask the optimiser for the step from it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from paribus._fit._opt_state import info_at
from paribus._fit._static import Config
from paribus._linearize._whiten import objective
from paribus.solvers._info import StepInfo

PyTree = Any


class Step(NamedTuple):
    updates: PyTree
    opt_state: PyTree
    value: jax.Array  # L_k
    grad_norm: jax.Array  # ||g_k||
    diag: tuple  # damping, gain_ratio, accepted, step_norm, form of the step from theta_k
    info: StepInfo | None


def _value_fn(cfg: Config, batch: PyTree) -> Callable:
    # residual_fn and batch as keywords: optax's line searches hand every extra they do not
    # use themselves on to value_fn and refuse names it does not take.
    def value_fn(p, residual_fn=cfg.residual_fn, batch=batch):
        return objective(residual_fn, p, batch, cfg.loss)

    return value_fn


def step_from(cfg: Config, params: PyTree, opt_state: PyTree, batch: PyTree, dtype) -> Step:
    """Evaluate theta_k and compute the step from it (applied only if the run goes on).

    A first-order optimiser gets the gradient of L and the extras ``value``, ``grad``,
    ``value_fn``, ``residual_fn``, ``batch``; a Jacobian-based one (its state holds a
    StepInfo) gets zeros and ``value_fn``, ``residual_fn``, ``batch``, and reports L and ||g||
    in its StepInfo: no second evaluation of the loss.
    """
    value_fn = _value_fn(cfg, batch)
    extras = dict(residual_fn=cfg.residual_fn, batch=batch, value_fn=value_fn)
    if cfg.info_path is None:
        value, grad = jax.value_and_grad(value_fn)(params)
        updates, new_state = cfg.opt.update(
            grad, opt_state, params, value=value, grad=grad, **extras
        )
        nan = jnp.full((), jnp.nan, dtype)
        snorm = optax.tree.norm(updates).astype(dtype)
        diag = (nan, nan, jnp.ones((), bool), snorm, jnp.full((), -1, jnp.int32))
        gnorm = optax.tree.norm(grad).astype(dtype)
        return Step(updates, new_state, value.astype(dtype), gnorm, diag, None)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, new_state = cfg.opt.update(zeros, opt_state, params, **extras)
    info = info_at(new_state, cfg.info_path)
    diag = (info.damping, info.gain_ratio, info.accepted, info.step_norm, info.form)
    diag = tuple(d.astype(dtype) if jnp.issubdtype(d.dtype, jnp.floating) else d for d in diag)
    return Step(
        updates, new_state, info.loss.astype(dtype), info.grad_norm.astype(dtype), diag, info
    )
