"""Damping rules for Levenberg-Marquardt: how lambda follows the gain ratio rho.

Each rule maps (lam, nu, radius, rho, accepted, scaled step norm) to the next (lam, nu, radius).

- ``"nielsen"`` (Nielsen 1999; Madsen, Nielsen & Tingleff 2004, eq. 3.15): on accept
  lam *= max(1/3, 1 - (2 rho - 1)^3), nu = 2; on reject lam *= nu, nu *= 2. lam0 = 1e-3 max
  diag(J^T J) (relative). Accept when rho > 0.
- ``"marquardt"`` (Marquardt 1963, as MATLAB's trainlm): x0.1 on accept, x10 on reject,
  lam0 = 1e-3 (absolute). Accept when the loss decreases (rho > 0).
- ``"delayed"`` ("delayed gratification", Transtrum & Sethna 2012, sec. 4.1): lam /= 3 on
  accept, lam *= 2 on reject; lam0 = 1e-3 max diag(J^T J) (relative). Accept when rho > 0.
- ``"trust_region"`` (Moré 1978 radius rules, as MINPACK lmder with its factor 1/2): rho < 1/4
  -> radius = 1/2 min(radius, 10 ||D^1/2 delta||), lam *= 2; rho >= 3/4 -> radius =
  2 ||D^1/2 delta||, lam /= 2. Departure: MINPACK solves for the lam that puts the step on the
  radius by a secant iteration (several factorisations per step); here lam is then raised by
  ||D^1/2 delta|| / radius when the step overshoots the new radius (the large-lam law
  ||delta|| ~ ||g|| / lam), so every step costs one factorisation. Accept when rho > 1e-4
  (MINPACK).
- ``"minpack"`` (Moré 1978, MINPACK lmder): the radius is the state, and each trial is the
  step on its boundary, par solved from the secular equation through one decomposition of
  J per step (``paribus.solvers._minpack``); Gauss-Newton's step whenever it fits. Accept
  when rho > 1e-4. Its update needs the trial itself, so it lives in that module (``update``
  None).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp


class Rule(NamedTuple):
    name: str
    init_damping: float
    relative: bool
    threshold: float
    update: Callable


def _nielsen(lam, nu, radius, rho, accepted, snorm):
    del snorm
    rho_safe = jnp.where(accepted, rho, 1)
    shrink = jnp.maximum(1 / 3, 1 - (2 * rho_safe - 1) ** 3)
    new_lam = jnp.where(accepted, lam * shrink, lam * nu)
    # nu is capped: after ~50 rejections lam has hit its bound anyway; an inf nu would poison.
    new_nu = jnp.where(accepted, 2, jnp.minimum(2 * nu, 2.0**50))
    return new_lam, new_nu.astype(nu.dtype), radius


def _marquardt(lam, nu, radius, rho, accepted, snorm):
    del rho, snorm
    return jnp.where(accepted, lam * 0.1, lam * 10), nu, radius


def _delayed(lam, nu, radius, rho, accepted, snorm):
    del rho, snorm
    return jnp.where(accepted, lam / 3, lam * 2), nu, radius


def _trust_region(lam, nu, radius, rho, accepted, snorm):
    del accepted
    shrink = rho < 0.25
    grow = rho >= 0.75
    snorm = jnp.where(snorm > 0, snorm, radius)
    new_radius = jnp.where(shrink, 0.5 * jnp.minimum(radius, 10 * snorm), radius)
    new_radius = jnp.where(grow, 2 * snorm, new_radius)
    new_lam = jnp.where(shrink, 2 * lam, jnp.where(grow, 0.5 * lam, lam))
    # A step longer than the new radius needs lam larger in proportion (||delta|| ~ 1 / lam).
    return new_lam * jnp.maximum(1, snorm / new_radius), nu, new_radius


RULES = {
    "nielsen": Rule("nielsen", 1e-3, True, 0.0, _nielsen),
    "marquardt": Rule("marquardt", 1e-3, False, 0.0, _marquardt),
    "delayed": Rule("delayed", 1e-3, True, 0.0, _delayed),
    "trust_region": Rule("trust_region", 1e-3, True, 1e-4, _trust_region),
    "minpack": Rule("minpack", 1e-3, True, 1e-4, None),
}


def get_rule(name: str, *, where: str) -> Rule:
    if name not in RULES:
        raise ValueError(f"{where}: unknown damping={name!r}; expected one of {sorted(RULES)}.")
    return RULES[name]
