"""Robust losses of residuals, as ``scipy.optimize.least_squares`` defines them.

Public through :mod:`paribus.losses` (``pb.losses.huber``, ...); kept in their own module
because they are a different kind of loss from the GGN losses there (see that module).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = ["ResidualLoss", "arctan", "cauchy", "huber", "linear", "robust", "soft_l1"]


class ResidualLoss(NamedTuple):
    """A robust loss of residuals r, elementwise, with a scale C (scipy's ``f_scale``).

    With z_k = (r_k / C)^2 and a function rho with rho(z) ~ z near 0 that grows more slowly
    than z for z > 1, the cost of a residual array r (any shape) is

        cost(r) = 1/2 sum_k C^2 rho(z_k),

    exactly ``scipy.optimize.least_squares(..., loss=name, f_scale=C)``'s cost: residuals
    well inside C count as in least squares, those far beyond it count less (``huber`` and
    ``soft_l1`` linearly, ``cauchy`` logarithmically, ``arctan`` not beyond pi / 4 C^2 each):

    =========  ======================  =====================  ======================
    name       rho(z)                  rho'(z)                rho'(z) + 2 z rho''(z)
    =========  ======================  =====================  ======================
    linear     z                       1                      1
    huber      z if z <= 1,            1, or z^(-1/2)         1, or 0
               else 2 sqrt(z) - 1
    soft_l1    2 (sqrt(1 + z) - 1)     (1 + z)^(-1/2)         (1 + z)^(-3/2)
    cauchy     log(1 + z)              1 / (1 + z)            (1 - z) / (1 + z)^2
    arctan     arctan(z)               1 / (1 + z^2)          (1 - 3 z^2) / (1 + z^2)^2
    =========  ======================  =====================  ======================

    **Iteratively reweighted Gauss-Newton** (scipy's ``scale_for_robust_loss_function``; Triggs
    et al., "Bundle adjustment: a modern synthesis", 2000, section 4.3): per residual,

        s_k = sqrt(max(rho'_k + 2 z_k rho''_k, eps)),      rw_k = rho'_k r_k / s_k,

    with eps the machine epsilon of r's dtype (scipy's ``EPS`` in float64). The Gauss-Newton
    model of the cost at r + J delta is 1/2 ||rw + diag(s) J delta||^2: its gradient
    J^T (s * rw) = sum_k rho'_k r_k J_k is exactly the gradient of the cost, and its curvature
    J^T diag(s^2) J is the cost's Hessian less the second derivatives of r, where that is
    positive (s^2 is clamped at eps where rho'' makes it negative). So GN and LM with a robust
    loss are the least-squares methods applied to (rw, diag(s) J), unchanged; ``linear`` has
    s = 1 and rw = r.

    When to use which loss record: a :class:`ResidualLoss` acts on each residual separately
    (regression with outliers: curve fitting, robust regression of a network's outputs); a
    :class:`paribus.losses.OutputLoss` acts on an example's whole output vector and its target
    (classification by the generalised Gauss-Newton method).

    Attributes:
      name: ``"linear"``, ``"huber"``, ``"soft_l1"``, ``"cauchy"`` or ``"arctan"``.
      scale: C > 0, the residual size beyond which the loss counts less than least squares.
      value: ``value(r) -> ()``, the cost of r: a float array of any shape, or a pytree of
        them (summed over every leaf).
      whiten: ``whiten(r) -> (rw, s)``, each shaped like r (a pytree like r).

    Example:
      >>> import jax.numpy as jnp, paribus as pb
      >>> loss = pb.losses.huber(scale=1.0)
      >>> r = jnp.array([0.5, 3.0])
      >>> float(loss.value(r))  # 1/2 (0.5^2 + (2 * 3 - 1))
      2.625
      >>> rw, s = loss.whiten(r)
      >>> [round(float(g), 6) for g in rw * s]  # rho' r: the gradient of the cost in r
      [0.5, 1.0]
    """

    name: str
    scale: float
    value: Callable[[PyTree], jax.Array]
    whiten: Callable[[PyTree], tuple[PyTree, PyTree]]


# Each loss as u = r / C -> (rho(u^2), rho'(u^2) u, rho' + 2 u^2 rho''), in closed forms
# chosen so that nothing overflows or underflows where the true value is representable (u^2 is
# never formed where it could overflow and then be divided or subtracted; rho' u rather than
# rho', since rho' = 1 / |u| underflows for huge u where rho' u = sign(u) does not), and so that
# jax.grad of rho is finite everywhere, r = 0 included (an unused jnp.where branch is fed a safe
# argument: its NaN derivative would otherwise leak through the zero cotangent). The last
# column is written through rho' itself (e.g. cauchy: (1 - z) / (1 + z)^2 = rho' (2 rho' - 1)),
# which is exact algebra and avoids z^2 overflowing in arctan.


@jax.custom_jvp
def _sqrt_1p_square(u: jax.Array) -> jax.Array:
    """sqrt(1 + u^2) without overflow, and with the derivative u / sqrt(1 + u^2) written out:
    autodiff of any overflow-safe form (jnp.hypot's included) multiplies a cotangent ~ |u| by
    a factor ~ 1 / u^2, which overflows and underflows near the top of float32 and gives NaN."""
    big = jnp.abs(u) > 1
    a = jnp.where(big, jnp.abs(u), jnp.ones_like(u))
    v = jnp.where(big, jnp.zeros_like(u), u)
    return jnp.where(big, a * jnp.sqrt(1 + jnp.square(1 / a)), jnp.sqrt(1 + v * v))


@_sqrt_1p_square.defjvp
def _sqrt_1p_square_jvp(primals, tangents):
    (u,), (du,) = primals, tangents
    root = _sqrt_1p_square(u)
    return root, u / root * du


def _linear(u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return u * u, u, jnp.ones_like(u)


def _huber(u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    z = u * u
    inside = z <= 1  # scipy's mask, on z rather than |u|, so both split a tie the same way
    rho = jnp.where(inside, z, 2 * jnp.abs(u) - 1)
    # Beyond the scale rho' + 2 z rho'' = z^(-1/2) - z^(-1/2) is exactly 0; scipy evaluates it
    # in floating point and gets rounding noise of either sign (|.| <= 2 eps), which its clamp
    # mostly turns into eps. We use the exact 0, clamped to eps the same way.
    curvature = jnp.where(inside, jnp.ones_like(u), jnp.zeros_like(u))
    return rho, jnp.where(inside, u, jnp.sign(u)), curvature


def _soft_l1(u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    root = _sqrt_1p_square(u)  # sqrt(1 + z), without forming z
    # 2 (sqrt(1 + z) - 1) = 2 z / (1 + sqrt(1 + z)) for |u| <= 1: no cancellation for small z
    # (scipy's form loses about log10(1 / z) digits there); beyond, the plain form, whose
    # derivative does not overflow.
    small = jnp.abs(u) <= 1
    us = jnp.where(small, u, jnp.zeros_like(u))
    rho = jnp.where(small, 2 * us * us / (1 + _sqrt_1p_square(us)), 2 * (root - 1))
    rho1 = 1 / root
    return rho, u / root, rho1 * rho1 * rho1


def _cauchy(u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    z = u * u
    small = jnp.abs(u) <= 1
    # log1p(z) is accurate for small z but z overflows for |u| > 1e154 (float64), 1.8e19
    # (float32); beyond |u| = 1, log(1 + z) = 2 log(sqrt(1 + u^2)) has neither problem.
    ub = jnp.where(small, jnp.ones_like(u), u)
    rho = jnp.where(
        small,
        jnp.log1p(jnp.where(small, z, jnp.zeros_like(z))),
        2 * jnp.log(_sqrt_1p_square(ub)),
    )
    rho1 = 1 / (1 + z)
    rho1_u = jnp.where(small, u * rho1, 1 / (ub + 1 / ub))  # u / (1 + u^2)
    return rho, rho1_u, rho1 * (2 * rho1 - 1)


def _arctan(u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    z = u * u
    rho1 = 1 / (1 + z * z)
    small = jnp.abs(u) <= 1
    ub = jnp.where(small, jnp.ones_like(u), u)
    rho1_u = jnp.where(small, u * rho1, 1 / (1 / ub + ub * (ub * ub)))  # u / (1 + u^4)
    return jnp.arctan(z), rho1_u, rho1 * (4 * rho1 - 3)


_RHOS: dict[str, Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]] = {
    "linear": _linear,
    "huber": _huber,
    "soft_l1": _soft_l1,
    "cauchy": _cauchy,
    "arctan": _arctan,
}
NAMES = tuple(_RHOS)


def _float_leaves(r: PyTree, *, where: str) -> list[jax.Array]:
    leaves = jax.tree.leaves(r)
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(
                f"{where}: expected float residuals; got {jnp.result_type(leaf)}{jnp.shape(leaf)}."
            )
    return [jnp.asarray(leaf) for leaf in leaves]


def _check_scale(scale: Any, name: str) -> float:
    if isinstance(scale, jax.core.Tracer):
        raise ValueError(
            f"pb.losses.{name}: scale must be a concrete number (it is configuration, fixed "
            f"when the loss is made); got a traced value {scale!r}."
        )
    is_number = isinstance(scale, numbers.Real | np.ndarray | np.generic | jax.Array) and (
        np.ndim(scale) == 0 and np.issubdtype(np.result_type(scale), np.number)
    )
    value = float(scale) if is_number else math.nan
    if isinstance(scale, bool | np.bool_) or not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"pb.losses.{name}: scale must be a finite number > 0 (the residual size C where "
            f"the loss starts to count less than least squares); got {scale!r}."
        )
    return value


def robust(name: str, scale: float = 1.0) -> ResidualLoss:
    """The robust loss called ``name`` with scale C = ``scale`` (see :class:`ResidualLoss`).

    Args:
      name: ``"linear"``, ``"huber"``, ``"soft_l1"``, ``"cauchy"`` or ``"arctan"``, as
        ``scipy.optimize.least_squares``'s ``loss``.
      scale: C > 0, as scipy's ``f_scale``.

    Raises:
      ValueError: for an unknown name, or a scale that is not a finite number > 0.
    """
    if name not in _RHOS:
        raise ValueError(f"pb.losses.robust: unknown loss {name!r}; expected one of {NAMES}.")
    return _make(name, _check_scale(scale, name))


# Cached: equal losses are then one (hashable) object, so a jitted function taking the loss as
# a static argument (pb.fit does) does not recompile for a new but equal loss.
@functools.lru_cache(maxsize=128)
def _make(name: str, scale: float) -> ResidualLoss:
    rho_fn = _RHOS[name]

    def elementwise_value(r: jax.Array) -> jax.Array:
        if name == "linear":  # no round trip through C: r^2, bit for bit
            return 0.5 * jnp.sum(r * r)
        c = jnp.asarray(scale, r.dtype)
        return 0.5 * jnp.sum(c * c * rho_fn(r / c)[0])

    def value(r: PyTree) -> jax.Array:
        leaves = _float_leaves(r, where=f"{name} loss")
        return sum((elementwise_value(leaf) for leaf in leaves[1:]), elementwise_value(leaves[0]))

    def whiten_leaf(r: jax.Array) -> tuple[jax.Array, jax.Array]:
        if name == "linear":
            return r, jnp.ones_like(r)
        c = jnp.asarray(scale, r.dtype)
        _, rho1_u, curvature = rho_fn(r / c)
        eps = jnp.asarray(jnp.finfo(r.dtype).eps, r.dtype)
        s = jnp.sqrt(jnp.maximum(curvature, eps))
        return c * rho1_u / s, s

    def whiten(r: PyTree) -> tuple[PyTree, PyTree]:
        leaves, treedef = jax.tree.flatten(r)
        _float_leaves(r, where=f"{name} loss")
        pairs = [whiten_leaf(jnp.asarray(leaf)) for leaf in leaves]
        return treedef.unflatten([p[0] for p in pairs]), treedef.unflatten([p[1] for p in pairs])

    return ResidualLoss(name, scale, value, whiten)


def linear(scale: float = 1.0) -> ResidualLoss:
    """Least squares, rho(z) = z: cost 1/2 ||r||^2 whatever the scale; s = 1 and rw = r."""
    return robust("linear", scale)


def huber(scale: float = 1.0) -> ResidualLoss:
    """Huber: quadratic for |r| <= C, linear beyond, C^2 rho = r^2 or 2 C |r| - C^2."""
    return robust("huber", scale)


def soft_l1(scale: float = 1.0) -> ResidualLoss:
    """Soft L1 (pseudo-Huber): C^2 rho = 2 C^2 (sqrt(1 + (r / C)^2) - 1), smooth everywhere."""
    return robust("soft_l1", scale)


def cauchy(scale: float = 1.0) -> ResidualLoss:
    """Cauchy (Lorentzian): C^2 rho = C^2 log(1 + (r / C)^2); outliers weigh ~ log |r|."""
    return robust("cauchy", scale)


def arctan(scale: float = 1.0) -> ResidualLoss:
    """Arctan: C^2 rho = C^2 arctan((r / C)^2), bounded by pi / 2 C^2 per residual."""
    return robust("arctan", scale)
