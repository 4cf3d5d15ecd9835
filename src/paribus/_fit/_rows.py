"""The history as rows: one (8,) row per point, written in the loop, read into a History.

One array written once per step: eight separate histories cost XLA 0.3 s more to compile
(one dynamic-update-slice each) for nothing at run time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from paribus._fit._step import Step
from paribus._fit.records import History


def _rows_dtype(dtype):
    # bool and int32 fields and the clock ride along exactly in the loss's dtype, at least
    # float32 (bfloat16 holds integers only to 256).
    return jnp.promote_types(dtype, jnp.float32)


def empty_rows(n: int, dtype) -> jax.Array:
    """(n, 8) rows: loss, grad_norm, damping, gain_ratio, accepted, step_norm, form, time."""
    return jnp.full((n, len(History._fields)), jnp.nan, _rows_dtype(dtype))


def record(rows: jax.Array, j, step: Step, seconds) -> jax.Array:
    """Write point j's row: L_k, ||g_k||, the diagnostics of the step from theta_k, the clock."""
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


def unpack(rows, dtype, hooks: bool, xp) -> History:
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


def history(rows: History, steps, xp) -> History:
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
