"""The records of a ``pb.fit`` run: why it ended, its history, its state, its result."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

PyTree = Any

STOP_REASONS = (
    "max_steps",
    "gradient",
    "step",
    "target_loss",
    "non_finite",
    "damping_limit",
    "diverged",
    "stalled",
    "callback",
    "composition",
    "underflow",
)
"""Why a run ended; ``FitResult.stop_reason.code`` indexes this tuple (codes never change)."""

CONVERGED = ("gradient", "step", "target_loss")
"""The stop reasons that are convergence tests: ``FitResult.converged`` is True for these."""

CODE = {name: code for code, name in enumerate(STOP_REASONS)}


@jax.tree_util.register_pytree_node_class
class StopReason:
    """Why a run ended: an int32 code into ``STOP_REASONS``, one type under jit and outside.

    ``reason == "gradient"`` compares by name (an unknown name raises ``ValueError``) and gives a
    bool, or a bool array under ``vmap``/``jit``; ``reason.name`` is the name (an array of names
    for a batch of runs); ``int(reason)`` and ``STOP_REASONS[reason]`` work on a concrete scalar;
    ``reason.code`` is the array. A pytree, so it passes through ``jit`` and ``vmap``.
    """

    __slots__ = ("code",)

    def __init__(self, code: Any):
        self.code = code

    def tree_flatten(self):
        return (self.code,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(*children)

    @property
    def name(self) -> Any:
        """The name (str), or an array of names; raises under tracing."""
        names = np.asarray(STOP_REASONS)[np.asarray(self.code)]
        return str(names) if names.ndim == 0 else names

    @property
    def converged(self) -> Any:
        """True where the reason is a convergence test (``CONVERGED``)."""
        codes = [CODE[name] for name in CONVERGED]
        return (self.code == codes[0]) | (self.code == codes[1]) | (self.code == codes[2])

    def _code_of(self, other: Any) -> Any:
        if isinstance(other, StopReason):
            return other.code
        if isinstance(other, str):
            if other not in CODE:
                raise ValueError(f"unknown stop reason {other!r}; expected one of {STOP_REASONS}.")
            return CODE[other]
        return other

    def __eq__(self, other: Any) -> Any:
        return self.code == self._code_of(other)

    def __ne__(self, other: Any) -> Any:
        return self.code != self._code_of(other)

    def __hash__(self) -> int:
        return hash(self.name)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        del copy
        return np.asarray(self.code, dtype)

    def __getitem__(self, index: Any) -> StopReason:
        return StopReason(self.code[index])

    def __int__(self) -> int:
        return int(self.code)

    __index__ = __int__

    def __str__(self) -> str:
        try:
            return str(self.name)
        except Exception:  # traced: no name to show
            return f"StopReason({self.code})"

    def __repr__(self) -> str:
        return f"StopReason({str(self)!r})"


class History(NamedTuple):
    """Per-step arrays of one run; ``steps + 1`` entries (host) or ``max_steps + 1`` (traced).

    Entry k of ``loss``, ``grad_norm`` and ``time`` is at theta_k, after k steps (``loss[0]`` at
    the start, ``loss[-1]`` at ``result.params``); entry k of the others describes step k, from
    theta_(k-1) to theta_k (entry 0: NaN, False, -1). ``step_norm`` is ||delta|| of the trial
    (LM: accepted or not), ``solve_form`` indexes ``pb.solvers.FORMS`` (-1 for first-order
    optimisers, which record ``accepted`` True). ``time``: wall-clock seconds since theta_0 was
    evaluated (compilation excluded), only with a ``callback`` or ``progress`` (else None).
    Traced runs (under ``jit``/``vmap``) hold NaN, False, -1 past ``steps``.
    """

    loss: Any
    grad_norm: Any
    damping: Any
    gain_ratio: Any
    accepted: Any
    step_norm: Any
    solve_form: Any
    time: Any = None


class FitState(NamedTuple):
    """Everything a run needs to continue exactly: ``pb.fit(..., state=result.state)``.

    Attributes:
      opt_state: the optimiser's state.
      step: steps taken since the first run (drives ``batch_indices`` schedules).
      start_loss: L_0, the loss at the start of the first run.
      best_loss: the lowest finite loss seen (the reference of the divergence test).
      grad_scale: the largest gradient norm seen at a loss <= L_0 (the scale of "a small
        gradient"; an excursion above the start does not inflate it).
      theta_norm: ||theta|| at the last point.
      pending: what the last step left to judge at the next point (0 nothing, 1 it could not
        move theta, 2 LM rejected it at its largest damping).
      stale: accepted steps since the lowest loss last fell (Jacobian-based optimisers).
      drift: consecutive steps that raised ||theta|| at a small gradient without a gain.
    """

    opt_state: PyTree
    step: jax.Array
    start_loss: jax.Array
    best_loss: jax.Array
    grad_scale: jax.Array
    theta_norm: jax.Array
    pending: jax.Array
    stale: jax.Array
    drift: jax.Array


class FitProgress(NamedTuple):
    """What a ``callback`` receives at theta_k (host scalars; the step is the one into it)."""

    step: int
    loss: float
    grad_norm: float
    damping: float
    accepted: bool
    seconds: float
    params: PyTree = None


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      params: the parameters at which the run stopped (the last finite iterate).
      history: :class:`History`.
      steps: steps taken in this call (LM trials count, accepted or not); an int, or an int32
        array under ``jit``/``vmap``.
      stop_reason: :class:`StopReason` (see :func:`fit` for each reason).
      state: :class:`FitState`, to resume with ``pb.fit(..., state=result.state)``.
      converged: True only when a convergence test ("gradient", "target_loss", "step") ended
        the run; a bool, or a bool array under ``jit``/``vmap``.
    """

    params: PyTree
    history: History
    steps: Any
    stop_reason: StopReason
    state: FitState
    converged: Any
