"""``pb.fit`` itself: check the arguments, build the loop's configuration, run it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paribus import _tree
from paribus._fit import _checks, _compile
from paribus._fit._checks import is_traced
from paribus._fit._hooks import Hook, progress_bar
from paribus._fit._host import (
    CHUNK,
    ITERATOR_CHUNK,
    composition_error,
    confirm,
    finish_host,
    finish_traced,
    host_loop,
    point_batch,
)
from paribus._fit._loop import run, run_chunk, start
from paribus._fit._opt_state import chained, find_step_info
from paribus._fit._rows import empty_rows
from paribus._fit._rules import RUNNING, Tols
from paribus._fit._static import Config, Same
from paribus._fit._stream import Stream
from paribus._fit.records import CODE, FitProgress, FitResult, FitState

PyTree = Any


def fit(
    residual_fn: Callable[[PyTree, PyTree], Any],
    params: PyTree,
    opt: optax.GradientTransformation,
    batch: PyTree | Iterator[PyTree] = None,
    *,
    max_steps: int,
    target_loss: float | None = None,
    grad_tol: float = 0.0,
    grad_rtol: float | None = None,
    step_tol: float | None = None,
    diverge_factor: float | None = None,
    loss: Any = None,
    batch_indices: jax.Array | None = None,
    state: FitState | PyTree | None = None,
    callback: Callable[[FitProgress], bool | None] | None = None,
    callback_every: int = 1,
    callback_params: bool = False,
    progress: bool = False,
    compile_mode: str = "auto",
) -> FitResult:
    """Minimise the loss of ``residual_fn`` with ``opt``, for at most ``max_steps`` steps.

    The loss is L = 1/2 ||r||^2 with r = ``residual_fn(params, batch)`` (R residuals, any
    pytree), or with ``loss`` (an ``OutputLoss``) L = sum_i loss.value(z_i, t_i) with
    ``(z (N, m), t) = residual_fn(params, batch)``. Each iteration k evaluates theta_k (L_k and
    g_k = dL/dtheta), applies the stopping rules below, and otherwise takes the step
    theta_(k+1) = theta_k + delta_k from ``opt``.

    Which optimisers: the protocol is :class:`pb.StepInfo`. A transformation whose state holds
    one StepInfo (anywhere: ``optax.tree.get_all_with_path(state, "StepInfo")``) is
    Jacobian-based: it receives zeros as updates and the extras ``residual_fn``, ``batch`` and
    ``value_fn``, forms its own step, and reports in its StepInfo the loss and gradient norm
    at theta_k (``loss``, ``grad_norm``) and its trial (``damping``, ``gain_ratio``,
    ``accepted``, ``step_norm``, ``trial_loss``, ``form``, ``at_damping_limit``); when
    ``accepted`` is False it must return zero updates. :func:`pb.gauss_newton`,
    :func:`pb.levenberg_marquardt`, or yours, built with ``pb.solvers.step_info(...)``. Any
    other transformation is first-order: it receives the gradient g_k and the extras
    ``value``, ``grad``, ``value_fn`` (for optax's line searches), ``residual_fn`` and
    ``batch``. A Jacobian-based transformation runs alone or as the first member of an
    ``optax.chain`` whose later members leave its steps unchanged; compositions that change
    or drop its steps (members before it, ``MultiSteps``, ``multi_transform``, ``masked``, a
    chained clip or scale) raise ``ValueError``.

    Stopping, at theta_k, from L_k, g_k and what step k left; the first rule that holds wins
    (``FitResult.converged`` is True for "target_loss", "gradient" and "step" only):

    - "non_finite": L_k or ||g_k|| is NaN or inf. theta_k is not returned: theta_(k-1) is
      (the last finite iterate), with the optimiser state after the step that failed (whose
      StepInfo describes that step).
    - "target_loss": L_k <= ``target_loss``. "gradient": ||g_k|| <= ``grad_tol``.
    - "diverged": L_k > ``diverge_factor`` min_(i<k) L_i; or, 50 steps in a row, ||theta||
      grew by more than sqrt(eps) at a small gradient while L fell by less than sqrt(eps) L (a
      minimum at infinity, approached for ever).
    - "step" if the gradient is small, else "stalled": no further progress is possible in this
      dtype. Step k was accepted, non-zero, and left theta unchanged: theta + delta == theta
      in every entry (a Jacobian-based step also when ||delta|| <= eps ||theta||; with
      ``step_tol``, also when ||delta|| <= step_tol (||theta|| + step_tol)); or it was a
      rejected non-zero trial whose loss equals L to 2 eps L (more damping only shrinks the
      next one); or L_k <= eps^2 L_0 (the residuals at rounding level); or 50 accepted
      Jacobian-based steps found no lower loss (Gauss-Newton wandering at the rounding floor,
      or bouncing far from a minimum). "Small": ||g_k|| <= max(grad_tol, grad_rtol G), G the
      largest ||g_i|| seen at a loss <= L_0 (an excursion above the start does not count).
    - "damping_limit": LM rejected step k at its largest damping, the gradient not small
      (with a small gradient: "step").
    - "composition" (raised as ``ValueError`` outside ``jit``): a transformation chained after
      a Jacobian-based one changed its step. "callback": ``callback`` returned True.
      "max_steps": ``max_steps`` steps were taken (an iterator that ran out ends so too).
    - "underflow" (outside ``jit``): a convergence stop with L_0 == 0 while a residual is not:
      1/2 ||r||^2 underflowed (residuals near 1e-20 in float32) and nothing was tested;
      rescale r. L computed to avoid it would underflow just the same in the loss's dtype.

    A zero update is a declined step (a rejected trial, or a failed factorisation zeroed as
    one), never convergence. With a Jacobian-based optimiser the loop tests the L and ||g||
    its StepInfo reports (J^T r: the true gradient for 1/2 ||r||^2); outside ``jit``, with a
    ``loss``, a "gradient" or "step" stop is confirmed with the true gradient at the returned
    params (a whitened model's can vanish where the loss saturates), else "stalled".

    Args:
      residual_fn: ``residual_fn(params, batch)`` -> residuals (a float array or pytree of
        them), or ``(outputs (N, m), targets)`` with ``loss``. Called on the whole batch.
      params: initial parameters, a pytree of float arrays.
      opt: any optax transformation (see above).
      batch: a pytree of arrays (or None); an iterator of minibatches, streamed in chunks
        (at most ``ITERATOR_CHUNK`` (32) batches are drawn beyond those used; an iterator that
        runs out ends the run as ``max_steps`` would); or, with ``batch_indices``, the full
        data set.
      max_steps: at most this many steps in this call (LM trials count, accepted or not);
        >= 1. Not a compile-time constant outside ``jit``: a new value reuses the loop.
      target_loss: stop ("target_loss") when L <= this.
      grad_tol: stop ("gradient") when ||g|| <= this; the floor of "a small gradient".
      grad_rtol: "a small gradient" relative to the largest seen (see "step"); default
        sqrt(eps) of the parameters' dtype.
      step_tol: also count accepted steps with ||delta|| <= step_tol (||theta|| + step_tol)
        as not moving theta; default None: only theta + delta == theta.
      diverge_factor: "diverged" when L exceeds this multiple of the lowest loss seen.
        Default: 1e12 with one batch (Gauss-Newton's first step on a badly scaled problem can
        raise the loss 1e10-fold and recover); no test with minibatches (their losses are not
        comparable), unless given. ``float("inf")`` switches it off.
      loss: None for 1/2 ||r||^2 (or the loss ``residual_fn`` carries, e.g.
        ``pb.losses.network_outputs(apply, loss)``), or a loss object with ``value`` and
        ``whiten`` such as ``pb.losses.softmax_cross_entropy()``. A paribus solver built with
        another loss is refused: one run minimises one objective.
      batch_indices: (S, B) integer array in [0, N): step k uses the examples
        ``batch_indices[k % S]`` of ``batch`` (k counts from the first run when resuming).
      state: ``result.state`` of an earlier run (or an optimiser state): continue from it.
        ``fit(..., max_steps=k, state=fit(..., max_steps=k).state)`` from that run's params
        takes the same steps as ``fit(..., max_steps=2 k)``.
      callback: ``callback(FitProgress) -> bool | None``, called on the host at theta_0 and
        every ``callback_every`` steps after it and at the last point, in order; returning
        True stops the run ("callback"). An exception in it ends the run and is re-raised.
        Outside ``jit``/``vmap`` only.
      callback_every: steps between callback calls.
      callback_params: send ``params`` (host arrays) in the ``FitProgress`` record.
      progress: draw a tqdm progress bar (needs tqdm, in the ``experiments`` extra).
      compile_mode: how XLA compiles the loop on the CPU. ``"auto"`` (default): with XLA's
        quick settings (no MLIR fusion emitters, backend optimisation level 0) when the run is
        small work, where compiling is most of the first call (about 3x shorter; each step
        up to a few times slower, milliseconds in all there): an estimated step of at most
        2e3 flops, or at most 3e8 flops over ``max_steps`` steps (a curve fit, a classic
        least-squares problem, a tiny network for a few hundred steps); with XLA's defaults
        otherwise. A ``max_steps`` that moves a run across that line compiles the other loop
        once. ``"quick"`` or ``"full"`` (XLA's defaults) pins one. No effect on other
        platforms or under ``jit``.

    Returns:
      :class:`FitResult`: params, :class:`History` (``steps + 1`` entries; with a callback or
      progress bar, ``history.time`` holds wall-clock seconds), steps, :class:`StopReason`,
      :class:`FitState` and ``converged``. Under ``jit``/``vmap`` (traced params, batch or
      state), ``steps`` and ``converged`` are arrays and the history has ``max_steps + 1``
      entries, blank past ``steps``.

    Example:
      >>> import jax.numpy as jnp, paribus as pb
      >>> result = pb.fit(lambda p, b: jnp.sqrt(p) - 1.0, jnp.array([100.0]),
      ...                 pb.levenberg_marquardt(), None, max_steps=50, target_loss=1e-12)
      >>> round(float(result.params[0]), 5), result.stop_reason.name, result.converged
      (1.0, 'target_loss', True)
    """
    if isinstance(batch_indices, Iterator):
        raise TypeError(
            "pb.fit: batch_indices must be an (S, B) integer array; got an iterator. To "
            "stream minibatches, pass the iterator as batch."
        )
    _checks.check_config(
        residual_fn, opt, max_steps, loss, callback, callback_every, progress, compile_mode
    )
    _tree.check_float_params(params, where="pb.fit")
    _check_tolerances(grad_tol, grad_rtol, step_tol, diverge_factor, target_loss)
    opt = optax.with_extra_args_support(opt)
    loss = _checks.resolve_loss(residual_fn, loss)
    dtype = _tree.param_dtype(params)
    traced = is_traced((params, batch_indices, state, target_loss, grad_tol, diverge_factor))
    traced = traced or (not isinstance(batch, Iterator) and is_traced(batch))
    size = max_steps + 1 if traced else ITERATOR_CHUNK
    schedule, data, stream, first = _schedule(batch, batch_indices, size)
    n_resid = _checks.check_outputs(residual_fn, params, first, loss)
    _checks.check_loss_agrees(opt, loss, residual_fn)
    shape_state = jax.eval_shape(opt.init, params)
    info_path = find_step_info(shape_state)
    fs, fresh = _checks.start_state(state, opt, params, shape_state, dtype)
    if diverge_factor is None:
        diverge_factor = np.inf if schedule else 1e12
    rtol = np.sqrt(float(jnp.finfo(dtype).eps)) if grad_rtol is None else grad_rtol
    tols = _tolerances(dtype, grad_tol, rtol, step_tol, target_loss, diverge_factor)
    hooks = callback is not None or bool(progress)
    if traced and hooks:
        raise ValueError(
            "pb.fit: callback= and progress= run on the host between steps; call pb.fit "
            "outside jax.jit / jax.vmap to use them."
        )
    rows = (max_steps + 1) if traced else (ITERATOR_CHUNK if stream else CHUNK)
    send = bool(callback_params) and callback is not None
    same = Same(residual_fn), Same(opt), Same(loss)
    cfg = Config(*same, schedule, rows, info_path, chained(shape_state, info_path), hooks, send)
    if not traced:  # under jit the caller's compile settings hold
        if compile_mode == "auto":
            quick = _compile.choose(_compile.loop_key(cfg, params), residual_fn, params, first,
                                    n_resid, info_path is not None, max_steps)  # fmt: skip
        else:
            quick = compile_mode == "quick" and _compile.on_cpu(params)
        cfg = cfg._replace(quick=quick)
    if traced:
        return _run_traced(cfg, params, fs, fresh, data, stream, max_steps, tols)
    hook = None
    if hooks:
        bar = progress_bar(max_steps) if progress else None
        hook = Hook(callback, int(callback_every), bar, int(fs.step), jnp.result_type(float))
    return _run_host(cfg, params, fs, fresh, data, stream, max_steps, tols, hook, callback_every)


def _check_tolerances(grad_tol, grad_rtol, step_tol, diverge_factor, target_loss) -> None:
    for name, value in (("grad_tol", grad_tol), ("grad_rtol", grad_rtol), ("step_tol", step_tol)):
        _checks.check_number(name, value)
    _checks.check_number("diverge_factor", diverge_factor, allow_inf=True)
    _checks.check_target(target_loss)


def _schedule(batch, batch_indices, size: int) -> tuple:
    """(schedule, the loop's data, the iterator's Stream or None, a batch like theta_0's)."""
    if batch_indices is not None:
        indices = _checks.check_indices(batch_indices, batch)
        # Shapes only (check_outputs reads nothing else): a gather here compiles ten kernels.
        first = jax.eval_shape(lambda b, i: jax.tree.map(lambda a: a[i[0]], b), batch, indices)
        return "indices", (batch, indices), None, first
    if isinstance(batch, Iterator):
        stream = Stream(batch, size)
        return "stacked", batch, stream, stream.first()
    return None, batch, None, batch


def _tolerances(dtype, grad_tol, grad_rtol, step_tol, target_loss, diverge_factor) -> Tols:
    values = (
        grad_tol,
        grad_rtol,
        0.0 if step_tol is None else step_tol,
        -np.inf if target_loss is None else target_loss,
        diverge_factor,
    )
    return Tols(*(_as_tol(v, dtype) for v in values))


def _as_tol(value, dtype):
    # numpy on the host: an eager jnp conversion would compile a kernel on the first call.
    return jnp.asarray(value, dtype) if is_traced(value) else np.asarray(value, dtype)


TRACED_CHUNK = 128
"""Points per inner loop of a traced run longer than this (see :func:`_run_traced`)."""


def _run_traced(cfg, params, fs: FitState, fresh, data, stream, max_steps, tols) -> FitResult:
    """``max_steps + 1`` points inside the caller's trace.

    Under ``vmap`` a ``while_loop`` whose predicate is batched selects every leaf of its carry
    at every iteration, so a history of ``max_steps + 1`` rows carried through one loop costs
    O(max_steps^2) (measured: 11 us a seed-step at 1,000 steps, 49 us at 8,000). A longer run
    is a ``scan`` over loops of ``TRACED_CHUNK`` points each, whose rows the scan stacks:
    O(max_steps TRACED_CHUNK). Chunks after the stop run no iteration. (An iterator's stacked
    batches are indexed by point within the one loop: that schedule keeps one loop.)
    """
    limit = max_steps
    if stream is not None:
        data, limit = stream.chunk(0, max_steps)
    args = (data, fs.step + limit, tols, np.int32(0), np.int32(1))
    n_rows = max_steps + 1
    if stream is not None or n_rows <= TRACED_CHUNK:
        carry, rows, _ = run(cfg, start(params, fs), fresh, *args)
        return finish_traced(cfg, carry, rows, fs.step)
    chunk_cfg = cfg._replace(rows=TRACED_CHUNK)
    blank = empty_rows(TRACED_CHUNK, _tree.param_dtype(params))

    def chunk(c, _):
        carry, first = c

        def go(carry):
            carry, rows, _ = run_chunk(chunk_cfg, carry, first, *args)
            return carry, rows

        # run_chunk starts RUNNING (the host calls it only then): a stopped run skips the rest.
        carry, rows = jax.lax.cond(carry.code == RUNNING, go, lambda c: (c, blank), carry)
        return (carry, jnp.zeros((), bool)), rows

    n_chunks = -(-n_rows // TRACED_CHUNK)
    first = jnp.asarray(fresh, bool)
    carry = jax.tree.map(jnp.asarray, start(params, fs))
    (carry, _), blocks = jax.lax.scan(chunk, (carry, first), None, length=n_chunks)
    rows = blocks.reshape(n_chunks * TRACED_CHUNK, blocks.shape[-1])[:n_rows]
    return finish_traced(cfg, carry, rows, fs.step)


def _run_host(cfg, params, fs: FitState, fresh, data, stream, max_steps, tols, hook, every):
    """Chunks on the host until a stop; raise a changed step, confirm a convergence stop."""
    k0 = int(fs.step)
    carry, chunks, (last_data, k_chunk) = host_loop(
        cfg, start(params, fs), fresh, data, stream, k0 + max_steps, tols, hook, int(every)
    )
    result, code = finish_host(cfg, carry, chunks, k0)
    if code == CODE["composition"]:
        raise composition_error(result, cfg.info_path)
    last = functools.partial(point_batch, cfg, last_data, int(result.state.step), k_chunk)
    return confirm(result, cfg, tols, last)
