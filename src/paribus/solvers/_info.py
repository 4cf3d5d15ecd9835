"""``StepInfo``: what a step did, in one record that any optax transformation may carry.

``pb.fit`` reads a step's diagnostics from the one ``StepInfo`` it finds in the optimiser's
state (``optax.tree.get_all_with_path(state, "StepInfo")``); a transformation that keeps one
must be used alone (or followed in an ``optax.chain`` only by members that leave its steps
unchanged), since its diagnostics describe the step it returns. The contract: ``accepted``
False means the returned update is zeros; when accepted, ``step_norm`` is the norm of the
returned update; ``grad_norm`` is the true ||grad L|| at the parameters the step was computed
from. Gauss-Newton, Levenberg-Marquardt and the Hessian-free step keep one; a
transformation of your own that wants its damping, gain ratio and acceptance in ``pb.fit``'s
history keeps one too (field ``step_info`` of its state, built with :func:`step_info`).
Transformations without one are first-order: ``pb.fit`` records their update norm and counts
every step accepted.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

REPAIRS = ("none", "refined", "qr", "svd", "shifted")
"""How a solve was repaired when its first factorisation failed or was not to be trusted;
``StepInfo.repair`` indexes this tuple (``paribus.solvers._linear`` says when each happens):

- "none": the form's own factorisation (or none: "qr", "cg");
- "refined": a "dual" step refined by preconditioned CG with backward-stable J products (lam
  near the rounding floor of J J^T; Gauss-Newton: a kernel too ill-conditioned for the dtype);
- "qr": a "primal" LM step taken from a QR of [J; sqrt(lam D)] (Cholesky failed, or lam D below
  the rounding floor of J^T J);
- "svd": a "primal" Gauss-Newton step taken from an SVD least-squares solve of J (J^T J too
  ill-conditioned for the dtype);
- "shifted": the "dual" kernel's Cholesky failed even at the rounding floor; it was factorised
  at a larger shift and the step refined.
"""


class StepInfo(NamedTuple):
    """Diagnostics of one step, all scalar arrays (jit-, vmap- and scan-friendly).

    Attributes:
      loss: L(theta) at the parameters the step was computed from.
      grad_norm: ||g|| = ||J^T r|| there.
      damping: lam of the trial (0 for Gauss-Newton; NaN when the step has none).
      gain_ratio: rho = (L - L_trial) / (predicted decrease); NaN when no trial was evaluated,
        -inf when the trial was not finite.
      accepted: the update returned is the trial step (False: zeros were returned).
      step_norm: ||delta|| of the trial, accepted or not.
      trial_loss: L(theta + delta), NaN when not evaluated.
      form: index into ``pb.solvers.FORMS`` of the solve that gave delta (-1: none).
      repair: index into ``REPAIRS``: how the solve was repaired (0: it was not).
      at_damping_limit: the trial was rejected with lam already at its upper bound: no larger
        damping is left to try.
      at_noise_floor: the step's predicted decrease and its measured change of L were both
        below the rounding of L as evaluated (MINPACK's ftol test at machine precision): it
        was taken on the model's word, and no later step can be judged by L either.
    """

    loss: jax.Array
    grad_norm: jax.Array
    damping: jax.Array
    gain_ratio: jax.Array
    accepted: jax.Array
    step_norm: jax.Array
    trial_loss: jax.Array
    form: jax.Array
    repair: jax.Array
    at_damping_limit: jax.Array
    at_noise_floor: jax.Array


def empty_step_info(dtype) -> StepInfo:
    """The record before any step: NaN numbers, False flags, form -1."""
    nan = jnp.full((), jnp.nan, dtype)
    false = jnp.zeros((), bool)
    return StepInfo(
        loss=nan,
        grad_norm=nan,
        damping=nan,
        gain_ratio=nan,
        accepted=false,
        step_norm=nan,
        trial_loss=nan,
        form=jnp.full((), -1, jnp.int32),
        repair=jnp.zeros((), jnp.int32),
        at_damping_limit=false,
        at_noise_floor=false,
    )


def step_info(
    *,
    loss,
    grad_norm,
    step_norm,
    accepted=True,
    damping=jnp.nan,
    gain_ratio=jnp.nan,
    trial_loss=jnp.nan,
    form: int | jax.Array = -1,
    repair: int | jax.Array = 0,
    at_damping_limit=False,
    at_noise_floor=False,
) -> StepInfo:
    """A :class:`StepInfo`, every number cast to the dtype of ``loss``."""
    dtype = jnp.result_type(loss)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)

    def num(x):
        return jnp.asarray(x).astype(dtype).reshape(())

    return StepInfo(
        loss=num(loss),
        grad_norm=num(grad_norm),
        damping=num(damping),
        gain_ratio=num(gain_ratio),
        accepted=jnp.asarray(accepted, bool).reshape(()),
        step_norm=num(step_norm),
        trial_loss=num(trial_loss),
        form=jnp.asarray(form, jnp.int32).reshape(()),
        repair=jnp.asarray(repair, jnp.int32).reshape(()),
        at_damping_limit=jnp.asarray(at_damping_limit, bool).reshape(()),
        at_noise_floor=jnp.asarray(at_noise_floor, bool).reshape(()),
    )
