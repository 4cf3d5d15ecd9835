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
"""

from __future__ import annotations

import functools
import itertools
import time
import types
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import io_callback

from paribus import _tree
from paribus.solvers._info import StepInfo
from paribus.solvers._model import objective as _objective

PyTree = Any

__all__ = [
    "CONVERGED",
    "STOP_REASONS",
    "FitProgress",
    "FitResult",
    "FitState",
    "History",
    "StopReason",
    "fit",
]

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

_CODE = {name: code for code, name in enumerate(STOP_REASONS)}
CHUNK = 256
"""Steps per compiled chunk outside ``jit``: one host round trip per chunk."""
ITERATOR_CHUNK = 32
"""Batches drawn from an iterator per chunk: at most this many beyond the steps run."""

_RUNNING = -1  # the loop's code while no rule has stopped it ("max_steps" is code 0)
# Accepted Jacobian-based steps without a new lowest loss before "no progress" is judged:
# Gauss-Newton wanders at the rounding floor (or bounces far from a minimum) without ever
# leaving theta unchanged; the longest wait before real progress on the MGH problems was 21.
_STALL_STEPS = 50
# What the previous step leaves for the next point to judge (FitState.pending).
_NOTHING, _STILL, _LIMIT = 0, 1, 2

# optax wrappers that change or drop the steps of what they wrap: a Jacobian-based
# transformation under one of them would record diagnostics of steps that are not applied.
_WRAPPERS = {
    "MultiStepsState": "optax.MultiSteps (it applies zeros on all but every k-th step)",
    "PartitionState": "optax.multi_transform (it applies it to a part of the parameters)",
    "MaskedState": "optax.masked (it applies it to a part of the parameters)",
    "ConditionallyTransformState": "optax.conditionally_transform (it skips steps)",
    "ConditionallyMaskState": "optax.conditionally_mask (it zeroes steps)",
    "LookaheadState": "optax.lookahead (it applies interpolated steps)",
}


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
        codes = [_CODE[name] for name in CONVERGED]
        return (self.code == codes[0]) | (self.code == codes[1]) | (self.code == codes[2])

    def _code_of(self, other: Any) -> Any:
        if isinstance(other, StopReason):
            return other.code
        if isinstance(other, str):
            if other not in _CODE:
                raise ValueError(f"unknown stop reason {other!r}; expected one of {STOP_REASONS}.")
            return _CODE[other]
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


class _Tols(NamedTuple):
    """Stopping thresholds: arrays, so that new values do not recompile."""

    grad: jax.Array  # "gradient": ||g|| <= grad
    small_rel: jax.Array  # "a small gradient": ||g|| <= max(grad, small_rel * grad_scale)
    step: jax.Array  # accepted ||delta|| <= step (||theta|| + step): no progress possible
    target: jax.Array  # L <= target: "target_loss"
    diverge: jax.Array  # L > diverge * best_loss: "diverged"


class _Same:
    """A static argument that equals another built the same way.

    Functions compare by code and, recursively, by the values their closures hold; tuples,
    lists and dicts by content; other hashable values by equality; anything else (arrays)
    by identity. So ``pb.levenberg_marquardt()`` called twice with the same settings, or a
    residual function rebuilt from the same data, reuses the compiled loop instead of
    compiling it again (jit compares static arguments with ``==``).
    """

    __slots__ = ("key", "value")

    def __init__(self, value: Any):
        self.value, self.key = value, _structure(value, set())

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Same) and self.key == other.key


class _Identity:
    """Compares by identity and keeps the object alive (so its id is never reused)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj


def _globals_read(fn: types.FunctionType) -> tuple:
    """The module globals ``fn``'s code reads, by identity (scalars by value): two functions
    from the same code that read a global array rebound in between are not the same."""
    names, codes = set(), [fn.__code__]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    scalar = bool | int | float | complex | str | bytes | type(None)
    return tuple(
        (name, (type(v), v) if isinstance(v, scalar) else _Identity(v))
        for name in sorted(names)
        if name in fn.__globals__ and not isinstance(v := fn.__globals__[name], types.ModuleType)
    )


def _structure(obj: Any, seen: set) -> Any:
    if id(obj) in seen:
        return _Identity(obj)
    if isinstance(obj, types.FunctionType):
        seen = seen | {id(obj)}
        cells = tuple(_structure(c.cell_contents, seen) for c in obj.__closure__ or ())
        defaults = _structure(obj.__defaults__, seen), _structure(obj.__kwdefaults__, seen)
        return ("fn", obj.__code__, cells, defaults, _globals_read(obj))
    if isinstance(obj, functools.partial):
        seen = seen | {id(obj)}
        return ("partial", *(_structure(x, seen) for x in (obj.func, obj.args, obj.keywords)))
    if type(obj) in (tuple, list) or (isinstance(obj, tuple) and hasattr(obj, "_fields")):
        return (type(obj), tuple(_structure(x, seen | {id(obj)}) for x in obj))
    if type(obj) is dict:
        return (dict, tuple((k, _structure(v, seen | {id(obj)})) for k, v in obj.items()))
    if isinstance(obj, bool | int | float | complex | str | bytes | type(None) | type):
        return (type(obj), obj)
    return _Identity(obj)


class _Config(NamedTuple):
    """What the compiled loop is specialised on (static, hashable)."""

    same_fn: _Same  # residual_fn
    same_opt: _Same  # opt
    same_loss: _Same  # loss
    schedule: str | None  # None, "indices" or "stacked"
    rows: int  # points one call of the loop may evaluate
    info_path: tuple | None  # where the StepInfo sits in the optimiser state; None: first-order
    chained: bool  # optax.chain members follow it: check that they leave its steps alone
    hooks: bool  # a host callback at every point (callback / progress)
    send_params: bool  # the callback receives params every callback_every steps

    @property
    def residual_fn(self) -> Callable:
        return self.same_fn.value

    @property
    def opt(self) -> Any:
        return self.same_opt.value

    @property
    def loss(self) -> Any:
        return self.same_loss.value


# --- the optimiser's state: where its StepInfo sits ---------------------------------------


def _path_name(path: tuple) -> str:
    parts = ["state"]
    for key in path:
        if isinstance(key, jax.tree_util.SequenceKey):
            parts.append(f"[{key.idx}]")
        elif isinstance(key, jax.tree_util.DictKey):
            parts.append(f"[{key.key!r}]")
        else:
            parts.append(f".{getattr(key, 'name', key)}")
    return "".join(parts)


def _child(node: Any, key: Any) -> Any:
    if isinstance(key, jax.tree_util.SequenceKey):
        return node[key.idx]
    if isinstance(key, jax.tree_util.DictKey):
        return node[key.key]
    return getattr(node, key.name)


def _find_step_info(state: PyTree) -> tuple | None:
    """The path of the one :class:`StepInfo` in ``state``; None for a first-order optimiser.

    Raises ``ValueError`` for compositions in which the recorded step is not the applied one:
    several StepInfos, an optax wrapper that changes or drops steps, or ``optax.chain`` members
    before the Jacobian-based transformation (they transform the zeros it is given, and it
    ignores their output). Members after it are checked at run time (``_mismatch``).
    """
    found = optax.tree.get_all_with_path(state, "StepInfo")
    if not found:
        return None
    if len(found) > 1:
        where = ", ".join(_path_name(path) for path, _ in found)
        raise ValueError(
            f"pb.fit: the optimiser's state holds {len(found)} StepInfo records ({where}): "
            "several Jacobian-based transformations in one optax.chain, whose diagnostics "
            "would describe steps that are not applied. Use one of them alone."
        )
    path = found[0][0]
    node = state
    for depth, key in enumerate(path):
        name = getattr(key, "tuple_name", None)
        if name in _WRAPPERS:
            raise ValueError(
                f"pb.fit: the Jacobian-based transformation (StepInfo at {_path_name(path)}) "
                f"sits inside {_WRAPPERS[name]}, which changes or drops its steps while its "
                "diagnostics would be recorded. Use it alone."
            )
        if type(node) is tuple and isinstance(key, jax.tree_util.SequenceKey) and key.idx > 0:
            before = ", ".join(type(s).__name__ for s in node[: key.idx])
            raise ValueError(
                f"pb.fit: optax.chain member(s) before the Jacobian-based transformation "
                f"(StepInfo at {_path_name(path[: depth + 1])}..., earlier states: {before}) "
                "transform the zero updates it receives, and it ignores their output. Use the "
                "Jacobian-based transformation alone."
            )
        node = _child(node, key)
    return path


def _chained(state: PyTree, path: tuple | None) -> bool:
    """Whether ``optax.chain`` members follow the StepInfo's transformation."""
    node = state
    for key in path or ():
        if type(node) is tuple and isinstance(key, jax.tree_util.SequenceKey):
            if key.idx + 1 < len(node):
                return True
        node = _child(node, key)
    return False


def _info_at(state: PyTree, path: tuple) -> StepInfo:
    for key in path:
        state = _child(state, key)
    return state


# --- one step --------------------------------------------------------------------------------


class _Step(NamedTuple):
    updates: PyTree
    opt_state: PyTree
    value: jax.Array  # L_k
    grad_norm: jax.Array  # ||g_k||
    diag: tuple  # damping, gain_ratio, accepted, step_norm, form of the step from theta_k
    info: StepInfo | None


def _value_fn(cfg: _Config, batch: PyTree) -> Callable:
    # residual_fn and batch as keywords: optax's line searches hand every extra they do not
    # use themselves on to value_fn and refuse names it does not take.
    def value_fn(p, residual_fn=cfg.residual_fn, batch=batch):
        return _objective(residual_fn, p, batch, cfg.loss)

    return value_fn


def _step(cfg: _Config, params: PyTree, opt_state: PyTree, batch: PyTree, dtype) -> _Step:
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
        return _Step(updates, new_state, value.astype(dtype), gnorm, diag, None)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, new_state = cfg.opt.update(zeros, opt_state, params, **extras)
    info = _info_at(new_state, cfg.info_path)
    diag = (info.damping, info.gain_ratio, info.accepted, info.step_norm, info.form)
    diag = tuple(d.astype(dtype) if jnp.issubdtype(d.dtype, jnp.floating) else d for d in diag)
    return _Step(
        updates, new_state, info.loss.astype(dtype), info.grad_norm.astype(dtype), diag, info
    )


# --- the stopping rules ----------------------------------------------------------------------


def _judge(value, gnorm, fs: FitState, trend, tols: _Tols, at_limit):
    """The stop code at theta_k (_RUNNING: go on), from L_k, ||g_k|| and what step k left."""
    small = trend.small
    code = jnp.full((), _RUNNING, jnp.int32)
    # Residuals at rounding level relative to their largest: no decrease is measurable on the
    # problem's scale (zero-residual problems with a singular J converge linearly, forever).
    eps = jnp.finfo(value.dtype).eps
    floor = value <= eps * eps * jnp.where(fs.step == 0, value, fs.start_loss)
    still = (fs.pending == _STILL) | (trend.stale >= _STALL_STEPS) | floor
    code = jnp.where(still, jnp.where(small, _CODE["step"], _CODE["stalled"]), code)
    limit = jnp.where(small, _CODE["step"], _CODE["damping_limit"])
    code = jnp.where(fs.pending == _LIMIT, limit, code)
    grown = (value > tols.diverge * fs.best_loss) & (fs.best_loss > 0)
    diverged = grown | (trend.drift >= _STALL_STEPS)
    code = jnp.where(diverged, _CODE["diverged"], code)
    code = jnp.where(gnorm <= tols.grad, _CODE["gradient"], code)
    code = jnp.where(value <= tols.target, _CODE["target_loss"], code)
    finite = jnp.isfinite(value) & jnp.isfinite(gnorm)
    code = jnp.where(finite, code, _CODE["non_finite"])
    return jnp.where((code == _RUNNING) & at_limit, _CODE["max_steps"], code).astype(jnp.int32)


def _pending(params, new_params, step: _Step, tols: _Tols, eps):
    """What step k + 1 leaves for theta_(k+1) to judge.

    No progress is possible ("step" with a small gradient, else "stalled") after an accepted
    non-zero update that left theta unchanged in its dtype (or, with ``step_tol``, below it),
    or a rejected non-zero trial whose loss equals L to rounding: a larger damping only makes
    the next trial smaller; likewise after a step taken at the noise floor of L
    (``StepInfo.at_noise_floor``). A zero update is a declined step (a rejected trial, or a failed
    factorisation zeroed as one), never a reason to stop. LM rejecting at its largest damping
    is judged as such ("damping_limit" unless the gradient is small).
    """
    applied = optax.tree.norm(step.updates).astype(step.value.dtype)
    same = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.all(a == b), new_params, params))
    unmoved = jnp.all(jnp.stack(same))
    size = optax.tree.norm(params).astype(applied.dtype)
    tiny = unmoved | (applied <= tols.step * (size + tols.step))
    accepted = step.diag[2]
    if step.info is None:
        still = accepted & (applied > 0) & tiny
        return jnp.where(still, _STILL, _NOTHING).astype(jnp.int32)
    # A Jacobian-based step below theta's resolution as a vector also counts: at the rounding
    # floor Gauss-Newton's steps still flip the last bit of a few entries, forever.
    still = accepted & (applied > 0) & (tiny | (applied <= eps * size))
    info = step.info
    flat = jnp.abs(info.trial_loss - info.loss) <= 2 * eps * jnp.abs(info.loss)
    still = still | (~info.accepted & (info.step_norm > 0) & flat)
    # The step's predicted and measured changes were below L's rounding (MINPACK's ftol test
    # at machine precision): it was taken, and nothing later can be judged by L either.
    still = still | (info.accepted & info.at_noise_floor)
    code = jnp.where(still, _STILL, _NOTHING)
    return jnp.where(info.at_damping_limit, _LIMIT, code).astype(jnp.int32)


def _mismatch(step: _Step, dtype) -> jax.Array:
    """The applied update is not the step the Jacobian-based transformation reports (an
    ``optax.chain`` member after it changed it): compared by norm, to the norms' rounding."""
    if step.info is None:
        return jnp.zeros((), bool)
    applied = optax.tree.norm(step.updates).astype(dtype)
    expected = jnp.where(step.info.accepted, step.info.step_norm.astype(dtype), 0)
    tol = jnp.sqrt(jnp.finfo(dtype).eps) * expected
    return jnp.abs(applied - expected) > tol


# --- the loop --------------------------------------------------------------------------------


class _Point(NamedTuple):
    params: PyTree
    state: FitState


class _Carry(NamedTuple):
    """What a chunk of the loop hands the next one, and the result.

    The loop advances unconditionally, so a stopped run ends at ``prev``, not ``cur``: no
    select per leaf of the parameters and the optimiser state at every step (a kernel each,
    a tenth of the loop's compile time), and no ``lax.cond`` (on a GPU a cond in the loop body
    reads its predicate on the host at every step).
    """

    cur: _Point  # the next point to evaluate
    prev: _Point  # the last point evaluated: where a stopped run ends
    back: PyTree  # the params before prev: where a non-finite prev rolls back to
    has_prev: jax.Array  # prev exists (cur is not the first point of the run)
    undo: jax.Array  # roll back: prev was not finite
    code: jax.Array


class _Loop(NamedTuple):
    carry: _Carry
    last: tuple  # the diagnostics of the step into theta_k (for the callback)
    j: jax.Array  # rows written
    rows: jax.Array  # (rows, 8): see _empty_rows


def _rows_dtype(dtype):
    # bool and int32 fields and the clock ride along exactly in the loss's dtype, at least
    # float32 (bfloat16 holds integers only to 256).
    return jnp.promote_types(dtype, jnp.float32)


def _empty_rows(n: int, dtype) -> jax.Array:
    """(n, 8) rows: loss, grad_norm, damping, gain_ratio, accepted, step_norm, form, time.

    One array written once per step: eight separate histories cost XLA 0.3 s more to compile
    (one dynamic-update-slice each) for nothing at run time.
    """
    return jnp.full((n, len(History._fields)), jnp.nan, _rows_dtype(dtype))


def _unpack(rows, dtype, hooks: bool, xp) -> History:
    """Rows -> History of point rows (the step fields not yet moved to their step)."""
    col = [rows[:, i] for i in range(len(History._fields))]
    form = xp.where(xp.isnan(col[6]), -1, col[6]).astype(np.int32)
    return History(
        *(c.astype(dtype) for c in col[:4]),
        col[4] == 1,
        col[5].astype(dtype),
        form,
        col[7] if hooks else None,
    )


def _batch_at(cfg: _Config, data: PyTree, k, j) -> PyTree:
    if cfg.schedule is None:
        return data
    if cfg.schedule == "stacked":
        return jax.tree.map(lambda a: a[j], data)
    batch, indices = data
    rows = indices[k % indices.shape[0]]
    return jax.tree.map(lambda a: a[rows], batch)


def _hook(cfg: _Config, hook_id, every, k, value, gnorm, last, done, params):
    """The host callback at theta_k: (stop requested, seconds since theta_0)."""
    shapes = (jax.ShapeDtypeStruct((), bool), jax.ShapeDtypeStruct((), jnp.result_type(float)))
    args = (hook_id, k, value, gnorm, last[0], last[2], done)
    if not cfg.send_params:
        return io_callback(_dispatch, shapes, *args, None, ordered=True)
    # Parameters travel to the host only when the callback will see them.
    return jax.lax.cond(
        done | (k % every == 0),
        lambda: io_callback(_dispatch, shapes, *args, params, ordered=True),
        lambda: io_callback(_dispatch, shapes, *args, None, ordered=True),
    )


def _body(cfg: _Config, data, limit, tols: _Tols, hook_id, every, dtype):
    eps = jnp.finfo(dtype).eps

    def body(loop: _Loop) -> _Loop:
        params, fs = loop.carry.cur
        k = fs.step
        step = _step(cfg, params, fs.opt_state, _batch_at(cfg, data, k, loop.j), dtype)
        trend = _trend(step, fs, params, tols, eps, first_order=cfg.info_path is None)
        code = _judge(step.value, step.grad_norm, fs, trend, tols, k >= limit)
        if cfg.chained:
            mismatch = (code == _RUNNING) & _mismatch(step, dtype)
            code = jnp.where(mismatch, _CODE["composition"], code)
        seconds = None
        if cfg.hooks:
            done = code != _RUNNING
            args = (k, step.value, step.grad_norm, loop.last, done, params)
            stop, seconds = _hook(cfg, hook_id, every, *args)
            code = jnp.where((code == _RUNNING) & stop, _CODE["callback"], code)
        new_params = optax.apply_updates(params, step.updates)
        going = _advance(fs, step, trend, _pending(params, new_params, step, tols, eps))
        carry = _Carry(
            cur=_Point(new_params, going),
            prev=loop.carry.cur,
            back=loop.carry.prev.params,
            has_prev=jnp.ones((), bool),
            undo=(code == _CODE["non_finite"]) & loop.carry.has_prev,
            code=code,
        )
        last = step.diag if cfg.hooks else ()
        return _Loop(carry, last, loop.j + 1, _record(loop.rows, loop.j, step, seconds))

    return body


class _Trend(NamedTuple):
    """Counters at theta_k (see FitState)."""

    stale: jax.Array
    drift: jax.Array
    norm: jax.Array  # ||theta_k||
    small: jax.Array  # ||g_k|| is small


def _trend(step: _Step, fs: FitState, params, tols: _Tols, eps, *, first_order: bool) -> _Trend:
    """Progress over the last steps: stalls (Jacobian-based steps without a new lowest loss)
    and drift (steps that push ||theta|| up at a small gradient and gain nothing: a minimum
    at infinity, such as Bard's, approached for ever)."""
    scale = jnp.where(fs.step == 0, step.grad_norm, fs.grad_scale)
    small = step.grad_norm <= jnp.maximum(tols.grad, tols.small_rel * scale)
    gain = fs.best_loss - step.value
    improved = jnp.isfinite(step.value) & (gain > 2 * eps * jnp.abs(fs.best_loss))
    stale = jnp.where(improved | (fs.best_loss == jnp.inf), 0, fs.stale)
    if first_order:
        stale = jnp.zeros_like(stale)  # first-order runs plateau legitimately (noise, lr)
    norm = optax.tree.norm(params).astype(step.value.dtype)
    rel = jnp.sqrt(eps)
    drifting = (norm > (1 + rel) * fs.theta_norm) & ~(gain > rel * jnp.abs(fs.best_loss)) & small
    # A rejected trial leaves theta where it was: it neither adds to the drift nor ends it.
    drift = jnp.where(norm == fs.theta_norm, fs.drift, jnp.where(drifting, fs.drift + 1, 0))
    return _Trend(stale, drift.astype(jnp.int32), norm, small)


def _advance(fs: FitState, step: _Step, trend: _Trend, pending) -> FitState:
    """The FitState after taking step k + 1 from theta_k."""
    k, finite = fs.step, jnp.isfinite(step.value)
    start = jnp.where(k == 0, step.value, fs.start_loss)
    return FitState(
        opt_state=step.opt_state,
        step=k + 1,
        start_loss=start,
        best_loss=jnp.where(finite, jnp.minimum(fs.best_loss, step.value), fs.best_loss),
        grad_scale=jnp.where(
            step.value <= start, jnp.maximum(fs.grad_scale, step.grad_norm), fs.grad_scale
        ),
        theta_norm=trend.norm,
        pending=pending,
        stale=(trend.stale + step.diag[2].astype(jnp.int32)).astype(jnp.int32),
        drift=trend.drift,
    )


def _record(rows: jax.Array, j, step: _Step, seconds) -> jax.Array:
    lam, rho, acc, snorm, form = step.diag
    nan = jnp.full((), jnp.nan, rows.dtype)
    values = (
        step.value,
        step.grad_norm,
        lam,
        rho,
        acc,
        snorm,
        form,
        nan if seconds is None else seconds,
    )
    row = jnp.stack([jnp.asarray(v).astype(rows.dtype) for v in values])
    return jax.lax.dynamic_update_slice(rows, row[None], (j, jnp.zeros_like(j)))


def _loop(cfg: _Config, carry: _Carry, fresh, data, limit, tols: _Tols, hook_id, every):
    """Run from ``carry.cur`` until a stop or ``cfg.rows`` points; returns (carry, rows, n).

    ``fresh``: the optimiser state is ``opt.init(params)`` (the carried one is a placeholder of
    the same structure), so one compiled loop serves a first call and a resumed one.
    """
    params, fs = carry.cur
    dtype = _tree.param_dtype(params)
    # A cond, not a select per leaf: each scalar select is a kernel of its own on the CPU.
    opt_state = jax.lax.cond(fresh, lambda: cfg.opt.init(params), lambda: fs.opt_state)
    cur = _Point(params, fs._replace(opt_state=opt_state))
    prev = _Point(carry.prev.params, cur.state)
    nan = jnp.full((), jnp.nan, dtype)
    last = (nan, nan, jnp.zeros((), bool), nan, jnp.full((), -1, jnp.int32))
    running = jnp.full((), _RUNNING, jnp.int32)
    loop = _Loop(
        carry=carry._replace(cur=cur, prev=prev, undo=jnp.zeros((), bool), code=running),
        last=last if cfg.hooks else (),
        j=jnp.zeros((), jnp.int32),
        rows=_empty_rows(cfg.rows, dtype),
    )

    def cond(loop: _Loop):
        return (loop.carry.code == _RUNNING) & (loop.j < cfg.rows)

    body = _body(cfg, data, limit, tols, hook_id, every, dtype)
    loop = jax.lax.while_loop(cond, body, loop)
    return loop.carry, loop.rows, loop.j


def _start(params, fs: FitState) -> _Carry:
    point = _Point(params, fs)
    false = np.zeros((), bool)
    return _Carry(point, point, params, false, false, np.int32(_RUNNING))


def _stopped(carry: _Carry, xp) -> _Point:
    """Where a stopped run ends: ``prev``, or the point before it when prev was not finite
    (with the optimiser state after the step that failed, whose StepInfo describes it)."""
    params, state = carry.prev
    if xp is np:  # concrete: choose on the host, nothing to compile
        if not bool(carry.undo):
            return carry.prev
        return _Point(carry.back, state._replace(step=np.int32(int(state.step) - 1),
                                                 pending=np.int32(_NOTHING)))  # fmt: skip
    undo = carry.undo
    params = jax.tree.map(lambda a, b: jnp.where(undo, a, b), carry.back, params)
    state = state._replace(
        step=state.step - undo.astype(state.step.dtype),
        pending=jnp.where(undo, _NOTHING, state.pending).astype(jnp.int32),
    )
    return _Point(params, state)


_run = jax.jit(_loop, static_argnames="cfg")


# --- the host side: callbacks and the progress bar -------------------------------------------

_HOOKS: dict[int, _Hook] = {}
_HOOK_IDS = itertools.count(1)


def _dispatch(hook_id, k, value, gnorm, damping, accepted, done, params):
    return _HOOKS[int(hook_id)](int(k), value, gnorm, damping, accepted, bool(done), params)


class _Hook:
    """The host end of one run's ``callback`` and progress bar.

    An exception in the callback (``KeyboardInterrupt`` included) is kept, the run is told to
    stop, and :func:`fit` re-raises it once the device returns: the loop never hangs on a
    failed callback and an interrupt is never swallowed by the runtime.
    """

    def __init__(self, callback, every: int, bar, first: int, dtype):
        self.callback, self.every, self.bar, self.first = callback, every, bar, first
        self.dtype = dtype
        self.start: float | None = None
        self.error: BaseException | None = None

    def __call__(self, k, value, gnorm, damping, accepted, done, params):
        now = time.perf_counter()
        self.start = now if self.start is None else self.start
        seconds = now - self.start
        stop = self.error is not None
        if not stop:
            try:
                stop = self._report(k, value, gnorm, damping, accepted, done, params, seconds)
            except BaseException as error:  # noqa: BLE001 - re-raised by fit on the host
                self.error, stop = error, True
        return np.asarray(stop, bool), np.asarray(seconds, self.dtype)

    def _report(self, k, value, gnorm, damping, accepted, done, params, seconds) -> bool:
        if self.bar is not None:
            self.bar.update(k - self.first - self.bar.n)
            self.bar.set_postfix_str(f"loss {float(value):.4e}", refresh=False)
        if self.callback is None or not (done or (k - self.first) % self.every == 0):
            return False
        record = FitProgress(
            k, float(value), float(gnorm), float(damping), bool(accepted), seconds, params
        )
        return bool(self.callback(record)) and not done


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError as error:  # tqdm is in the "experiments" extra, not a core dependency
        raise ImportError(
            "pb.fit(progress=True) draws its bar with tqdm: pip install tqdm (or "
            "paribus[experiments]), or pass a callback= instead."
        ) from error
    return tqdm(total=total, desc="pb.fit", unit="step", leave=False)


# --- the host side: batches, chunks, the result ----------------------------------------------


class _Stream:
    """Minibatches from an iterator, stacked ``size`` at a time as the loop asks for them.

    One batch is read ahead, so the chunk that holds the iterator's last batch ends the run
    there (as ``max_steps`` would): at most one chunk's batches are drawn beyond those used.
    """

    def __init__(self, batches: Iterator, size: int):
        self.batches, self.size = batches, size
        self.ahead = [self._next()]
        if self.ahead[0] is None:
            raise ValueError("pb.fit: the batch iterator gave no batches.")
        first = self.ahead[0]
        self.signature = jax.tree.structure(first), [np.shape(a) for a in jax.tree.leaves(first)]
        self.drawn = 1

    def _next(self):
        try:
            return next(self.batches)
        except StopIteration:
            return None

    def first(self) -> PyTree:
        return self.ahead[0]

    def chunk(self, k: int, limit: int) -> tuple[PyTree, int]:
        """The stacked batches for theta_k, theta_(k+1), ... and the chunk's step limit."""
        want = min(self.size, limit - k + 1)
        items = self.ahead
        while len(items) < want + 1:
            item = self._next()
            if item is None:
                break
            self._check(item, self.drawn)
            self.drawn += 1
            items.append(item)
        used, self.ahead = items[:want], items[want:]
        if not self.ahead:  # the iterator ran out: the last batch ends the run
            limit = min(limit, k + len(used) - 1)
        used = used + [used[-1]] * (self.size - len(used))
        stack = (
            np.stack if all(isinstance(a, np.ndarray) for a in jax.tree.leaves(used)) else jnp.stack
        )
        return jax.tree.map(lambda *a: stack(a), *used), limit

    def _check(self, item, i: int) -> None:
        this = jax.tree.structure(item), [np.shape(a) for a in jax.tree.leaves(item)]
        if this != self.signature:
            raise ValueError(
                f"pb.fit: batch {i} from the iterator has structure/shapes {this}; batch 0 had "
                f"{self.signature}. Every minibatch must have the same structure and shapes."
            )


def _host_loop(cfg, carry, fresh, data, stream, limit, tols, hook, every):
    """Chunks until a stop; returns the final carry, the rows of every point and the batch
    the last point was evaluated on (stacked schedules)."""
    hook_id = np.int32(0)
    if hook is not None:
        hook_id = np.int32(next(_HOOK_IDS))
        _HOOKS[int(hook_id)] = hook
    chunks, last_data = [], data
    try:
        while True:
            k0 = int(carry.cur.state.step)
            chunk_limit = limit
            if stream is not None:
                data, chunk_limit = stream.chunk(k0, limit)
            args = (carry, fresh, data, np.int32(chunk_limit), tols, hook_id, np.int32(every))
            carry, rows, n = _run(cfg, *args)
            code, n = (int(v) for v in jax.device_get((carry.code, n)))
            if hook is not None and hook.error is not None:
                raise hook.error
            chunks.append(np.asarray(jax.device_get(rows))[:n])
            fresh, last_data = False, (data, k0)
            if code != _RUNNING:
                return carry, chunks, last_data
    finally:
        if hook is not None:
            _HOOKS.pop(int(hook_id), None)
            if hook.bar is not None:
                hook.bar.close()


def _history(rows: History, steps, xp) -> History:
    """Point rows -> History: step diagnostics move one entry later (entry k: step k)."""

    def shift(a, fill):
        return xp.concatenate([xp.full((1,), fill, a.dtype), a[:-1]])

    nan = np.nan
    return History(
        loss=rows.loss,
        grad_norm=rows.grad_norm,
        damping=shift(rows.damping, nan),
        gain_ratio=shift(rows.gain_ratio, nan),
        accepted=shift(rows.accepted, False),
        step_norm=shift(rows.step_norm, nan),
        solve_form=shift(rows.solve_form, -1),
        time=rows.time,
    )


def _as_tol(value, dtype):
    # numpy on the host: an eager jnp conversion would compile a kernel on the first call.
    return jnp.asarray(value, dtype) if _is_traced(value) else np.asarray(value, dtype)


def _is_traced(tree: PyTree) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(tree))


def _finish_traced(cfg, carry: _Carry, rows, k0) -> FitResult:
    end = _stopped(carry, jnp)
    steps = end.state.step - k0
    dtype = _tree.param_dtype(end.params)
    history = _history(_unpack(rows, dtype, cfg.hooks, jnp), steps, jnp)
    past = jnp.arange(cfg.rows) > steps
    blank = _unpack(_empty_rows(cfg.rows, dtype), dtype, cfg.hooks, jnp)
    history = jax.tree.map(lambda a, b: jnp.where(past, b, a), history, blank)
    reason = StopReason(carry.code)
    return FitResult(end.params, history, steps, reason, end.state, reason.converged)


def _finish_host(cfg, carry: _Carry, chunks, k0: int) -> tuple[FitResult, int]:
    end = _stopped(carry, np)
    steps = int(end.state.step) - k0
    rows = np.concatenate(chunks)[: steps + 1]
    dtype = _tree.param_dtype(end.params)
    history = _history(_unpack(rows, dtype, cfg.hooks, np), steps, np)
    code = int(carry.code)
    reason = StopReason(np.int32(code))
    return FitResult(end.params, history, steps, reason, end.state, bool(reason.converged)), code


# --- checks at the call ----------------------------------------------------------------------


def _check_config(residual_fn, opt, max_steps, loss, callback, callback_every, progress):
    if not isinstance(max_steps, int | np.integer) or max_steps < 1:
        raise ValueError(f"pb.fit: max_steps must be an int >= 1; got {max_steps!r}.")
    if not callable(residual_fn):
        raise TypeError(f"pb.fit: residual_fn must be callable; got {residual_fn!r}.")
    if not hasattr(opt, "init") or not hasattr(opt, "update"):
        raise TypeError(
            f"pb.fit: opt must be an optax GradientTransformation (e.g. optax.adam(1e-3) or "
            f"pb.levenberg_marquardt()); got {opt!r}."
        )
    if loss is not None and not _is_loss(loss):
        raise TypeError(
            "pb.fit: loss must be None (L = 1/2 ||r||^2) or an OutputLoss such as "
            f"pb.losses.softmax_cross_entropy(); got {loss!r}."
        )
    if callback is not None and not callable(callback):
        raise TypeError(f"pb.fit: callback must be callable or None; got {callback!r}.")
    if not isinstance(progress, bool | np.bool_):
        raise TypeError(
            f"pb.fit: progress is True (a tqdm bar) or False; got {progress!r}. To call a "
            "function as the run goes, pass callback=fn (and callback_every=)."
        )
    if not isinstance(callback_every, int | np.integer) or callback_every < 1:
        raise ValueError(f"pb.fit: callback_every must be an int >= 1; got {callback_every!r}.")


def _check_number(name: str, value, *, allow_inf: bool = False) -> None:
    if value is None or _is_traced(value):
        return
    v = np.asarray(value)
    if v.shape != () or not np.issubdtype(v.dtype, np.number) or np.isnan(v):
        raise ValueError(f"pb.fit: {name} must be a number; got {value!r}.")
    if v < 0 or (np.isinf(v) and not allow_inf):
        raise ValueError(f"pb.fit: {name} must be finite and >= 0; got {value!r}.")


def _check_target(target_loss) -> None:
    if target_loss is None or _is_traced(target_loss):
        return
    v = np.asarray(target_loss)
    if v.shape != () or not np.issubdtype(v.dtype, np.number) or np.isnan(v):
        raise ValueError(f"pb.fit: target_loss must be a number (or None); got {target_loss!r}.")


def _check_outputs(residual_fn, params, batch, loss) -> None:
    """What ``residual_fn(params, batch)`` returns, from shapes alone (``jax.eval_shape``)."""
    try:
        out = jax.eval_shape(residual_fn, params, batch)
    # DeprecationWarning: what jnp.shape of a tuple batch raises where warnings are errors.
    except (TypeError, jax.errors.JAXTypeError, DeprecationWarning) as error:
        raise TypeError(
            f"pb.fit: residual_fn(params, batch) failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}). pb.fit calls residual_fn(params, batch) once "
            "with the whole batch and expects the residuals r (or (outputs, targets) with "
            "loss=). A network's apply(params, x) of one example is not a residual function: "
            "pass pb.regression_residuals(apply), or pb.per_example(fn) of fn(params, example)."
        ) from error
    if loss is not None and isinstance(out, tuple | list) and len(out) == 2:
        z = out[0]
        if hasattr(z, "shape") and len(z.shape) >= 1 and z.shape[0] == 0:
            raise ValueError(
                "pb.fit: residual_fn returned outputs for 0 examples (an empty batch?)."
            )
        return  # the model checks the (outputs, targets) pair when it is traced
    leaves = jax.tree.leaves(out)
    if not leaves or not all(jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in leaves):
        raise TypeError(
            "pb.fit: residual_fn(params, batch) must return a float array or a pytree of "
            f"float arrays (the residuals r); got {out}."
        )
    if len(leaves) == 1 and leaves[0].shape == ():
        raise ValueError(
            "pb.fit: residual_fn(params, batch) returned a scalar. pb.fit minimises "
            "L = 1/2 ||r||^2 of the residuals it returns: return the residuals r, not the "
            "loss (shape (1,) for one residual)."
        )
    if sum(int(np.prod(leaf.shape)) for leaf in leaves) == 0:
        raise ValueError(
            "pb.fit: residual_fn(params, batch) returned no residuals (an empty batch?); "
            "expected at least one."
        )


def _solver_loss(opt) -> tuple[bool, Any]:
    """(found, loss) from the closure of a paribus solver's update (loss= of its factory).

    A stand-in until the solvers expose their loss: the factories keep it in their closure.
    """
    update = getattr(opt, "update", None)
    code, cells = getattr(update, "__code__", None), getattr(update, "__closure__", None)
    if code is None or not cells or not getattr(update, "__module__", "").startswith("paribus."):
        return False, None
    cells = dict(zip(code.co_freevars, cells, strict=True))
    if "loss" not in cells:
        return False, None
    loss = cells["loss"].cell_contents
    return loss is None or _is_loss(loss), loss


def _is_loss(x: Any) -> bool:
    return callable(getattr(x, "value", None)) and callable(getattr(x, "whiten", None))


def _same_loss(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # e.g. an array field compared elementwise
        return False


def _resolve_loss(residual_fn, loss):
    """``loss``, or the one ``residual_fn`` carries (``pb.losses.network_outputs(apply, loss)``)."""
    carried = getattr(residual_fn, "loss", None)
    if not _is_loss(carried):
        return loss
    if loss is None:
        return carried
    if not _same_loss(carried, loss):
        raise ValueError(
            f"pb.fit: residual_fn carries loss {getattr(carried, 'name', carried)!r} but "
            f"pb.fit got loss={getattr(loss, 'name', loss)!r}; give the loss once."
        )
    return loss


def _check_loss_agrees(opt, loss) -> None:
    found, solver_loss = _solver_loss(opt)
    if not found or _same_loss(solver_loss, loss):
        return
    name = lambda x: None if x is None else getattr(x, "name", repr(x))  # noqa: E731
    raise ValueError(
        f"pb.fit: the optimiser was built with loss={name(solver_loss)!r} but pb.fit "
        f"minimises loss={name(loss)!r}; one run minimises one objective: build the optimiser "
        "with the same loss (e.g. pb.levenberg_marquardt(loss=loss))."
    )


def _check_indices(batch_indices, batch) -> Any:
    if isinstance(batch, Iterator):
        raise ValueError(
            "pb.fit: batch is an iterator and batch_indices is given; batch_indices selects "
            "examples of one full batch: give one or the other."
        )
    if batch is None:
        raise ValueError("pb.fit: batch_indices needs the full data set as batch; got None.")
    indices = batch_indices if _is_traced(batch_indices) else np.asarray(batch_indices)
    if indices.ndim != 2 or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(
            "pb.fit: batch_indices must be an (S, B) integer array; got "
            f"{indices.dtype}{indices.shape}."
        )
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "pb.fit: with batch_indices every leaf of batch needs the same leading (example) "
            f"axis; got leading sizes {sorted(map(str, sizes))}."
        )
    (n,) = sizes
    if (
        isinstance(indices, np.ndarray)
        and indices.size
        and (indices.min() < 0 or indices.max() >= n)
    ):
        bad = indices[(indices < 0) | (indices >= n)]
        raise ValueError(
            f"pb.fit: batch_indices must lie in [0, {n}) for a batch of {n} examples; got "
            f"{bad[:5].tolist()}."
        )
    return jnp.asarray(indices)


def _fresh_state(opt_state, dtype) -> FitState:
    zero = np.int32(0)
    nan, inf, nought = (np.asarray(v, dtype) for v in (np.nan, np.inf, 0))
    return FitState(opt_state, zero, nan, inf, nought, inf, zero, zero, zero)


def _fit_state(state, opt, params, shape_state, dtype) -> tuple[FitState, bool]:
    """The FitState to start from and whether the optimiser state is still to be made."""
    if state is None:
        try:
            placeholder = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shape_state)
        except TypeError:  # e.g. a PRNG key in the state: no numpy placeholder
            placeholder = opt.init(params)
        return _fresh_state(placeholder, dtype), True
    fs = state if isinstance(state, FitState) else _fresh_state(state, dtype)
    given = (
        jax.tree.structure(fs.opt_state),
        [(np.shape(a), jnp.result_type(a)) for a in jax.tree.leaves(fs.opt_state)],
    )
    expected = (
        jax.tree.structure(shape_state),
        [(s.shape, s.dtype) for s in jax.tree.leaves(shape_state)],
    )
    if given != expected:
        raise ValueError(
            "pb.fit: state does not belong to this optimiser and these params: its structure "
            f"is {given[0]}, opt.init(params) gives {expected[0]}. Pass the state of a run "
            "with the same optimiser (result.state)."
        )
    return fs, False


# --- what only the host can confirm ----------------------------------------------------------


def _grad_norm_fn(cfg: _Config, params, batch):
    grad = jax.grad(lambda p: _objective(cfg.residual_fn, p, batch, cfg.loss))(params)
    return optax.tree.norm(grad)


_grad_norm = jax.jit(_grad_norm_fn, static_argnames="cfg")


def _point_batch(cfg: _Config, data, k: int, k_chunk: int) -> PyTree:
    if cfg.schedule == "stacked":
        return jax.tree.map(lambda a: a[k - k_chunk], data)
    return _batch_at(cfg, data, k, 0)


def _confirm(result: FitResult, cfg: _Config, tols: _Tols, batch: PyTree) -> FitResult:
    """Re-judge a convergence stop where the loop could not see everything.

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
        r = cfg.residual_fn(result.params, batch)
        if any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(r)):
            new = "underflow"
    elif cfg.loss is not None and reason in ("gradient", "step"):
        g = float(_grad_norm(cfg, result.params, batch))
        scale = max(float(result.state.grad_scale), g)
        small = g <= max(float(tols.grad), float(tols.small_rel) * scale)
        ok = g <= float(tols.grad) if reason == "gradient" else small
        new = reason if ok else "stalled"
    if new == reason:
        return result
    return result._replace(stop_reason=StopReason(np.int32(_CODE[new])), converged=False)


def _composition_error(result: FitResult, info_path) -> ValueError:
    k = result.steps
    return ValueError(
        f"pb.fit: at step {k + 1} the update the optimiser returned is not the step its "
        f"Jacobian-based transformation (StepInfo at {_path_name(info_path)}) reported: a "
        "transformation chained after it (optax.chain) changes its steps, so its "
        "damping, gain ratio and acceptance would describe steps that are not applied. Use "
        "the Jacobian-based transformation alone."
    )


# --- pb.fit ----------------------------------------------------------------------------------


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
    _check_config(residual_fn, opt, max_steps, loss, callback, callback_every, progress)
    _tree.check_float_params(params, where="pb.fit")
    for name, value in (("grad_tol", grad_tol), ("grad_rtol", grad_rtol), ("step_tol", step_tol)):
        _check_number(name, value)
    _check_number("diverge_factor", diverge_factor, allow_inf=True)
    _check_target(target_loss)
    opt = optax.with_extra_args_support(opt)
    loss = _resolve_loss(residual_fn, loss)
    dtype = _tree.param_dtype(params)
    traced = _is_traced((params, batch_indices, state, target_loss, grad_tol, diverge_factor))
    traced = traced or (not isinstance(batch, Iterator) and _is_traced(batch))

    schedule, data, stream, first = None, batch, None, batch
    if batch_indices is not None:
        indices = _check_indices(batch_indices, batch)
        schedule, data = "indices", (batch, indices)
        first = jax.tree.map(lambda a: a[indices[0]], batch)
    elif isinstance(batch, Iterator):
        schedule, stream = "stacked", _Stream(batch, max_steps + 1 if traced else ITERATOR_CHUNK)
        first = stream.first()
    _check_outputs(residual_fn, params, first, loss)
    _check_loss_agrees(opt, loss)
    shape_state = jax.eval_shape(opt.init, params)
    info_path = _find_step_info(shape_state)
    fs, fresh = _fit_state(state, opt, params, shape_state, dtype)

    eps = float(jnp.finfo(dtype).eps)
    if diverge_factor is None:
        diverge_factor = np.inf if schedule else 1e12
    tols = _Tols(
        *(
            _as_tol(v, dtype)
            for v in (
                grad_tol,
                np.sqrt(eps) if grad_rtol is None else grad_rtol,
                0.0 if step_tol is None else step_tol,
                -np.inf if target_loss is None else target_loss,
                diverge_factor,
            )
        )
    )
    hooks = callback is not None or bool(progress)
    if traced and hooks:
        raise ValueError(
            "pb.fit: callback= and progress= run on the host between steps; call pb.fit "
            "outside jax.jit / jax.vmap to use them."
        )
    rows = (max_steps + 1) if traced else (ITERATOR_CHUNK if stream else CHUNK)
    send = bool(callback_params) and callback is not None
    chained = _chained(shape_state, info_path)
    same = _Same(residual_fn), _Same(opt), _Same(loss)
    cfg = _Config(*same, schedule, rows, info_path, chained, hooks, send)
    carry = _start(params, fs)
    k0 = fs.step
    if traced:
        limit = max_steps
        if stream is not None:
            data, limit = stream.chunk(0, max_steps)
        limit = k0 + limit
        carry, rows_, _ = _run(cfg, carry, fresh, data, limit, tols, np.int32(0), np.int32(1))
        return _finish_traced(cfg, carry, rows_, k0)

    k0 = int(k0)
    hook = None
    if hooks:
        bar = _progress_bar(max_steps) if progress else None
        hook = _Hook(callback, int(callback_every), bar, k0, jnp.result_type(float))
    carry, chunks, (last_data, k_chunk) = _host_loop(
        cfg, carry, fresh, data, stream, k0 + max_steps, tols, hook, int(callback_every)
    )
    result, code = _finish_host(cfg, carry, chunks, k0)
    if code == _CODE["composition"]:
        raise _composition_error(result, info_path)
    last = _point_batch(cfg, last_data, int(result.state.step), k_chunk)
    return _confirm(result, cfg, tols, last)
