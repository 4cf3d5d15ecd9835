"""The compiled loop: a ``lax.while_loop`` over points theta_k, one chunk of rows at a time.

Each iteration evaluates theta_k and the step from it (``_step``), judges whether to stop
there (``_rules``), writes the point's row (``_rows``) and, with a callback, calls the host
(``_hooks``). The loop depends on ``max_steps``, the tolerances, the start and the optimiser
state only through arrays, so one compiled loop serves every run of an equal configuration.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paribus import _tree
from paribus._fit import _rules
from paribus._fit._compile import QUICK_OPTIONS
from paribus._fit._hooks import hook
from paribus._fit._rows import empty_rows, record
from paribus._fit._static import Config
from paribus._fit._step import step_from
from paribus._fit.records import CODE, FitState

PyTree = Any


class Point(NamedTuple):
    params: PyTree
    state: FitState


class Carry(NamedTuple):
    """What a chunk of the loop hands the next one, and the result.

    The loop advances unconditionally, so a stopped run ends at ``prev``, not ``cur``: no
    select per leaf of the parameters and the optimiser state at every step (a kernel each,
    a tenth of the loop's compile time), and no ``lax.cond`` (on a GPU a cond in the loop body
    reads its predicate on the host at every step).
    """

    cur: Point  # the next point to evaluate
    prev: Point  # the last point evaluated: where a stopped run ends
    back: PyTree  # the params before prev: where a non-finite prev rolls back to
    has_prev: jax.Array  # prev exists (cur is not the first point of the run)
    undo: jax.Array  # roll back: prev was not finite
    code: jax.Array


class _Loop(NamedTuple):
    carry: Carry
    last: tuple  # the diagnostics of the step into theta_k (for the callback)
    j: jax.Array  # rows written
    rows: jax.Array  # (rows, 8): see _rows.empty_rows


def batch_at(cfg: Config, data: PyTree, k, j) -> PyTree:
    """The batch of theta_k, the j-th point of the chunk."""
    if cfg.schedule is None:
        return data
    if cfg.schedule == "stacked":  # stacked by run_chunk
        return jax.tree.map(lambda a: a[j], data)
    batch, indices = data
    rows = indices[k % indices.shape[0]]
    return jax.tree.map(lambda a: a[rows], batch)


def _body(cfg: Config, data, limit, tols: _rules.Tols, hook_id, every, dtype):
    eps = jnp.finfo(dtype).eps

    def body(loop: _Loop) -> _Loop:
        params, fs = loop.carry.cur
        k = fs.step
        step = step_from(cfg, params, fs.opt_state, batch_at(cfg, data, k, loop.j), dtype)
        trend = _rules.trend_at(step, fs, params, tols, eps, first_order=cfg.info_path is None)
        code = _rules.judge(step.value, step.grad_norm, fs, trend, tols, k >= limit)
        if cfg.chained:
            mismatch = (code == _rules.RUNNING) & _rules.mismatch(step, dtype)
            code = jnp.where(mismatch, CODE["composition"], code)
        seconds = None
        if cfg.hooks:
            done = code != _rules.RUNNING
            args = (k, step.value, step.grad_norm, loop.last, done, params)
            stop, seconds = hook(cfg, hook_id, every, *args)
            code = jnp.where((code == _rules.RUNNING) & stop, CODE["callback"], code)
        new_params = optax.apply_updates(params, step.updates)
        pending = _rules.pending_after(params, new_params, step, tols, eps)
        going = _rules.advance(fs, step, trend, pending)
        carry = Carry(
            cur=Point(new_params, going),
            prev=loop.carry.cur,
            back=loop.carry.prev.params,
            has_prev=jnp.ones((), bool),
            undo=(code == CODE["non_finite"]) & loop.carry.has_prev,
            code=code,
        )
        last = step.diag if cfg.hooks else ()
        return _Loop(carry, last, loop.j + 1, record(loop.rows, loop.j, step, seconds))

    return body


def run_chunk(cfg: Config, carry: Carry, fresh, data, limit, tols: _rules.Tols, hook_id, every):
    """Run from ``carry.cur`` until a stop or ``cfg.rows`` points; returns (carry, rows, n).

    ``fresh``: the optimiser state is ``opt.init(params)`` (the carried one is a placeholder of
    the same structure), so one compiled loop serves a first call and a resumed one.
    """
    params, fs = carry.cur
    dtype = _tree.param_dtype(params)
    if cfg.schedule == "stacked":
        # The chunk's batches arrive as a tuple: stacked here, not by an eager jnp.stack (a
        # kernel compiled on the first call).
        data = jax.tree.map(lambda *batches: jnp.stack(batches), *data)
    # A cond, not a select per leaf: each scalar select is a kernel of its own on the CPU.
    opt_state = jax.lax.cond(fresh, lambda: cfg.opt.init(params), lambda: fs.opt_state)
    cur = Point(params, fs._replace(opt_state=opt_state))
    prev = Point(carry.prev.params, cur.state)
    nan = jnp.full((), jnp.nan, dtype)
    last = (nan, nan, jnp.zeros((), bool), nan, jnp.full((), -1, jnp.int32))
    running = jnp.full((), _rules.RUNNING, jnp.int32)
    loop = _Loop(
        carry=carry._replace(cur=cur, prev=prev, undo=jnp.zeros((), bool), code=running),
        last=last if cfg.hooks else (),
        j=jnp.zeros((), jnp.int32),
        rows=empty_rows(cfg.rows, dtype),
    )

    def cond(loop: _Loop):
        return (loop.carry.code == _rules.RUNNING) & (loop.j < cfg.rows)

    body = _body(cfg, data, limit, tols, hook_id, every, dtype)
    loop = jax.lax.while_loop(cond, body, loop)
    return loop.carry, loop.rows, loop.j


_run = jax.jit(run_chunk, static_argnames="cfg")
_run_quick = jax.jit(run_chunk, static_argnames="cfg", compiler_options=QUICK_OPTIONS)


def run(cfg: Config, *args):
    """``run_chunk`` compiled, with XLA's quick settings when ``cfg.quick``."""
    return (_run_quick if cfg.quick else _run)(cfg, *args)


def start(params, fs: FitState) -> Carry:
    """The carry of a run that starts (or resumes) at ``params`` with ``fs``."""
    point = Point(params, fs)
    false = np.zeros((), bool)
    return Carry(point, point, params, false, false, np.int32(_rules.RUNNING))


def stopped(carry: Carry, xp) -> Point:
    """Where a stopped run ends: ``prev``, or the point before it when prev was not finite
    (with the optimiser state after the step that failed, whose StepInfo describes it)."""
    params, state = carry.prev
    if xp is np:  # concrete: choose on the host, nothing to compile
        if not bool(carry.undo):
            return carry.prev
        return Point(carry.back, state._replace(step=np.int32(int(state.step) - 1),
                                                pending=np.int32(_rules.NOTHING)))  # fmt: skip
    undo = carry.undo
    params = jax.tree.map(lambda a, b: jnp.where(undo, a, b), carry.back, params)
    state = state._replace(
        step=state.step - undo.astype(state.step.dtype),
        pending=jnp.where(undo, _rules.NOTHING, state.pending).astype(jnp.int32),
    )
    return Point(params, state)
