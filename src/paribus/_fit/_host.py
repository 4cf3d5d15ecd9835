"""The host side of a run: chunks of the compiled loop, the history they write, the result.

Outside ``jit``/``vmap`` the loop runs ``CHUNK`` points per call; between calls the host
collects the rows, draws the next minibatches and checks for a stop, so ``max_steps`` is not
a compile-time constant. Under ``jit``/``vmap`` one chunk of ``max_steps + 1`` points runs in
the caller's trace and :func:`finish_traced` reads its result as arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paribus import _tree
from paribus._fit import _rules
from paribus._fit._hooks import registered
from paribus._fit._loop import Carry, batch_at, run, stopped
from paribus._fit._opt_state import path_name
from paribus._fit._rows import empty_rows, to_history
from paribus._fit._static import Config
from paribus._fit.records import CODE, CONVERGED, FitResult, StopReason
from paribus._linearize._whiten import objective

PyTree = Any

CHUNK = 256
"""Steps per compiled chunk outside ``jit``: one host round trip per chunk."""
ITERATOR_CHUNK = 32
"""Batches drawn from an iterator per chunk: at most this many beyond the steps run."""


def host_loop(cfg, carry, fresh, data, stream, limit, tols, hook, every):
    """Chunks until a stop; returns the final carry, the rows of every point, and the last
    chunk's data with the step it started at (for :func:`point_batch`)."""
    chunks = []
    with registered(hook) as hook_id:
        while True:
            k0 = int(carry.cur.state.step)
            chunk_limit = limit
            if stream is not None:
                data, chunk_limit = stream.chunk(k0, limit)
            args = (carry, fresh, data, np.int32(chunk_limit), tols, hook_id, np.int32(every))
            carry, rows, n = run(cfg, *args)
            code, n = (int(v) for v in jax.device_get((carry.code, n)))
            if hook is not None and hook.error is not None:
                raise hook.error
            chunks.append(np.asarray(jax.device_get(rows))[:n])
            if code != _rules.RUNNING:
                return carry, chunks, (data, k0)
            fresh = False


def finish_traced(cfg, carry: Carry, rows, k0) -> FitResult:
    end = stopped(carry, jnp)
    steps = end.state.step - k0
    dtype = _tree.param_dtype(end.params)
    hist = to_history(rows, dtype, cfg.hooks, jnp)
    past = jnp.arange(cfg.rows) > steps
    blank = to_history(empty_rows(cfg.rows, dtype), dtype, cfg.hooks, jnp)
    hist = jax.tree.map(lambda a, b: jnp.where(past, b, a), hist, blank)
    reason = StopReason(carry.code)
    return FitResult(end.params, hist, steps, reason, end.state, reason.converged)


def finish_host(cfg, carry: Carry, chunks, k0: int) -> tuple[FitResult, int]:
    end = stopped(carry, np)
    steps = int(end.state.step) - k0
    rows = np.concatenate(chunks)[: steps + 1]
    dtype = _tree.param_dtype(end.params)
    hist = to_history(rows, dtype, cfg.hooks, np)
    code = int(carry.code)
    reason = StopReason(np.int32(code))
    return FitResult(end.params, hist, steps, reason, end.state, bool(reason.converged)), code


# --- what only the host can confirm ----------------------------------------------------------


def _grad_norm_fn(cfg: Config, params, batch):
    grad = jax.grad(lambda p: objective(cfg.residual_fn, p, batch, cfg.loss))(params)
    return optax.tree.norm(grad)


_grad_norm = jax.jit(_grad_norm_fn, static_argnames="cfg")


def point_batch(cfg: Config, data, k: int, k_chunk: int) -> PyTree:
    """The batch theta_k was evaluated on, from the data of the chunk that started at k_chunk."""
    if cfg.schedule == "stacked":
        return data[k - k_chunk]
    return batch_at(cfg, data, k, 0)


def confirm(result: FitResult, cfg: Config, tols: _rules.Tols, batch_fn) -> FitResult:
    """Re-judge a convergence stop where the loop could not see everything.

    ``batch_fn()`` gives the batch of the returned point, called only here where it is needed
    (selecting a minibatch on the host compiles kernels).

    - A loss that is exactly 0 at the start while a residual is not: 1/2 ||r||^2 underflowed
      (residuals near 1e-20 in float32), so the gradient and loss tests mean nothing:
      "underflow", not converged.
    - With an OutputLoss the loop tests the gradient of the whitened model, which a saturated
      loss can lose: the true gradient at the returned params must pass the test too, else
      "stalled".
    """
    reason = result.stop_reason.name
    if reason not in CONVERGED:
        return result
    new = reason
    if cfg.loss is None and result.history.loss[0] == 0:
        r = cfg.residual_fn(result.params, batch_fn())
        if any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(r)):
            new = "underflow"
    elif cfg.loss is not None and reason in ("gradient", "step"):
        g = float(_grad_norm(cfg, result.params, batch_fn()))
        scale = max(float(result.state.grad_scale), g)
        small = g <= max(float(tols.grad), float(tols.small_rel) * scale)
        ok = g <= float(tols.grad) if reason == "gradient" else small
        new = reason if ok else "stalled"
    if new == reason:
        return result
    return result._replace(stop_reason=StopReason(np.int32(CODE[new])), converged=False)


def composition_error(result: FitResult, info_path) -> ValueError:
    k = result.steps
    return ValueError(
        f"pb.fit: at step {k + 1} the update the optimiser returned is not the step its "
        f"Jacobian-based transformation (StepInfo at {path_name(info_path)}) reported: a "
        "transformation chained after it (optax.chain) changes its steps, so its "
        "damping, gain ratio and acceptance would describe steps that are not applied. Use "
        "the Jacobian-based transformation alone."
    )
