"""The stopping rules, judged at theta_k from L_k, ||g_k|| and what step k left behind.

Every rule is stated in :func:`paribus.fit`'s docstring; this module implements them as scalar
array arithmetic inside the compiled loop (no host round trip, no ``lax.cond``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from paribus._fit._step import Step
from paribus._fit.records import CODE, FitState

RUNNING = -1  # the loop's code while no rule has stopped it ("max_steps" is code 0)
# Accepted Jacobian-based steps without a new lowest loss before "no progress" is judged:
# Gauss-Newton wanders at the rounding floor (or bounces far from a minimum) without ever
# leaving theta unchanged; the longest wait before real progress on the MGH problems was 21.
_STALL_STEPS = 50
# What the previous step leaves for the next point to judge (FitState.pending).
NOTHING, _STILL, _LIMIT = 0, 1, 2


class Tols(NamedTuple):
    """Stopping thresholds: arrays, so that new values do not recompile."""

    grad: jax.Array  # "gradient": ||g|| <= grad
    small_rel: jax.Array  # "a small gradient": ||g|| <= max(grad, small_rel * grad_scale)
    step: jax.Array  # accepted ||delta|| <= step (||theta|| + step): no progress possible
    target: jax.Array  # L <= target: "target_loss"
    diverge: jax.Array  # L > diverge * best_loss: "diverged"


class Trend(NamedTuple):
    """Counters at theta_k (see FitState)."""

    stale: jax.Array
    drift: jax.Array
    norm: jax.Array  # ||theta_k||
    small: jax.Array  # ||g_k|| is small


def trend_at(step: Step, fs: FitState, params, tols: Tols, eps, *, first_order: bool) -> Trend:
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
    return Trend(stale, drift.astype(jnp.int32), norm, small)


def judge(value, gnorm, fs: FitState, trend: Trend, tols: Tols, at_limit):
    """The stop code at theta_k (RUNNING: go on), from L_k, ||g_k|| and what step k left."""
    small = trend.small
    code = jnp.full((), RUNNING, jnp.int32)
    # Residuals at rounding level relative to their largest: no decrease is measurable on the
    # problem's scale (zero-residual problems with a singular J converge linearly, forever).
    eps = jnp.finfo(value.dtype).eps
    floor = value <= eps * eps * jnp.where(fs.step == 0, value, fs.start_loss)
    still = (fs.pending == _STILL) | (trend.stale >= _STALL_STEPS) | floor
    code = jnp.where(still, jnp.where(small, CODE["step"], CODE["stalled"]), code)
    limit = jnp.where(small, CODE["step"], CODE["damping_limit"])
    code = jnp.where(fs.pending == _LIMIT, limit, code)
    grown = (value > tols.diverge * fs.best_loss) & (fs.best_loss > 0)
    diverged = grown | (trend.drift >= _STALL_STEPS)
    code = jnp.where(diverged, CODE["diverged"], code)
    code = jnp.where(gnorm <= tols.grad, CODE["gradient"], code)
    code = jnp.where(value <= tols.target, CODE["target_loss"], code)
    finite = jnp.isfinite(value) & jnp.isfinite(gnorm)
    code = jnp.where(finite, code, CODE["non_finite"])
    return jnp.where((code == RUNNING) & at_limit, CODE["max_steps"], code).astype(jnp.int32)


def pending_after(params, new_params, step: Step, tols: Tols, eps):
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
        return jnp.where(still, _STILL, NOTHING).astype(jnp.int32)
    # A Jacobian-based step below theta's resolution as a vector also counts: at the rounding
    # floor Gauss-Newton's steps still flip the last bit of a few entries, forever.
    still = accepted & (applied > 0) & (tiny | (applied <= eps * size))
    info = step.info
    flat = jnp.abs(info.trial_loss - info.loss) <= 2 * eps * jnp.abs(info.loss)
    still = still | (~info.accepted & (info.step_norm > 0) & flat)
    # The step's predicted and measured changes were below L's rounding (MINPACK's ftol test
    # at machine precision): it was taken, and nothing later can be judged by L either.
    still = still | (info.accepted & info.at_noise_floor)
    code = jnp.where(still, _STILL, NOTHING)
    return jnp.where(info.at_damping_limit, _LIMIT, code).astype(jnp.int32)


def mismatch(step: Step, dtype) -> jax.Array:
    """The applied update is not the step the Jacobian-based transformation reports (an
    ``optax.chain`` member after it changed it): compared by norm, to the norms' rounding."""
    if step.info is None:
        return jnp.zeros((), bool)
    applied = optax.tree.norm(step.updates).astype(dtype)
    expected = jnp.where(step.info.accepted, step.info.step_norm.astype(dtype), 0)
    tol = jnp.sqrt(jnp.finfo(dtype).eps) * expected
    return jnp.abs(applied - expected) > tol


def advance(fs: FitState, step: Step, trend: Trend, pending) -> FitState:
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
