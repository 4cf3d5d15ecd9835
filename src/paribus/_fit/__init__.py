"""One jit-compiled training loop for any optax transformation, with per-step history.

``pb.fit(residual_fn, params, opt, batch, max_steps=...)`` runs ``opt`` (Gauss-Newton,
Levenberg-Marquardt, any first-order optax optimiser, or a transformation of your own) in a
``lax.while_loop``. Outside ``jit``/``vmap`` the loop runs in chunks of ``CHUNK`` steps: the host
collects each chunk's history, streams minibatches from an iterator and checks for a stop
between chunks, so the compiled loop does not depend on ``max_steps`` and a run can resume from
``FitResult.state``. Under ``jit``/``vmap`` one chunk of ``max_steps + 1`` points runs inside
the caller's trace.

Each iteration evaluates the point theta_k (loss L_k, gradient norm ||g_k||), decides whether to
stop there, and otherwise takes step k + 1. A stopped run returns the point it stopped at, so
``history.loss[-1]`` is always the loss at ``result.params`` and no loss is computed twice.

The modules, in the order a call meets them:

- ``records``: StopReason, History, FitState, FitProgress, FitResult (the public records).
- ``fitting``: ``fit`` itself; ``_checks``: its arguments, checked at the call.
- ``least_squares``: ``least_squares``, a classic fit (MINPACK's algorithm) through ``fit``.
- ``_opt_state``: where the optimiser's StepInfo sits; the compositions refused.
- ``_static``: the loop's static configuration and when two are equal (no recompilation);
  ``_compile``: XLA's quick settings for a small run on the CPU.
- ``_loop``: the compiled ``lax.while_loop``; ``_step``: one evaluation and step inside it;
  ``_rules``: the stopping rules; ``_rows``: the history rows it writes.
- ``_host``: the chunks on the host and the result; ``_stream``: minibatches from an
  iterator; ``_hooks``: the host callback and progress bar.
"""

# Private, for the tests: the chunk sizes.
from paribus._fit._host import CHUNK as CHUNK
from paribus._fit._host import ITERATOR_CHUNK as ITERATOR_CHUNK
from paribus._fit.fitting import fit
from paribus._fit.least_squares import least_squares
from paribus._fit.records import (
    CONVERGED,
    STOP_REASONS,
    FitProgress,
    FitResult,
    FitState,
    History,
    StopReason,
)

__all__ = [
    "CONVERGED",
    "STOP_REASONS",
    "FitProgress",
    "FitResult",
    "FitState",
    "History",
    "StopReason",
    "fit",
    "least_squares",
]
