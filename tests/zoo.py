"""Least-squares test problems of Moré, Garbow & Hillstrom (1981), with their known minima.

J. J. Moré, B. S. Garbow, K. E. Hillstrom, "Testing unconstrained optimization software",
ACM TOMS 7(1), 17-41 (1981). Each problem gives residuals r(x) (m,) with f(x) = ||r(x)||^2 (the
paper's f: twice paribus's loss 1/2 ||r||^2), the standard starting point x0, and the minimum
value f* reached from x0 (more digits than the paper prints, from the MINPACK-1 test results and
confirmed here with scipy's MINPACK ``lm`` at xtol = ftol = 1e-15). Where a problem has several
minima, ``minima`` lists every value LM can reach from x0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Problem(NamedTuple):
    name: str
    residuals: Callable  # residuals(x (n,)) -> (m,)
    x0: tuple[float, ...]
    minima: tuple[float, ...]  # values of f = ||r||^2


def _rosenbrock(x):
    return jnp.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def _freudenstein_roth(x):
    x1, x2 = x
    return jnp.stack([-13 + x1 + ((5 - x2) * x2 - 2) * x2, -29 + x1 + ((x2 + 1) * x2 - 14) * x2])


def _powell_badly_scaled(x):
    return jnp.stack([1e4 * x[0] * x[1] - 1, jnp.exp(-x[0]) + jnp.exp(-x[1]) - 1.0001])


def _brown_badly_scaled(x):
    return jnp.stack([x[0] - 1e6, x[1] - 2e-6, x[0] * x[1] - 2])


def _beale(x):
    i = jnp.arange(1, 4)
    y = jnp.array([1.5, 2.25, 2.625])
    return y - x[0] * (1 - x[1] ** i)


def _jennrich_sampson(x):
    i = jnp.arange(1, 11)
    return 2 + 2 * i - (jnp.exp(i * x[0]) + jnp.exp(i * x[1]))


def _helical_valley(x):
    theta = jnp.arctan2(x[1], x[0]) / (2 * jnp.pi)
    # The paper's branch: arctan(x2/x1)/2pi for x1 > 0, + 1/2 for x1 < 0, i.e. theta in
    # (-1/4, 3/4]; arctan2 gives (-1/2, 1/2].
    theta = jnp.where(theta < -0.25, theta + 1, theta)
    return jnp.stack([10 * (x[2] - 10 * theta), 10 * (jnp.sqrt(x[0] ** 2 + x[1] ** 2) - 1), x[2]])


_BARD_Y = [0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96, 1.34, 2.10]


def _bard(x):
    u = jnp.arange(1.0, 16.0)
    v = 16 - u
    w = jnp.minimum(u, v)
    y = jnp.array([*_BARD_Y, 4.39])
    return y - (x[0] + u / (v * x[1] + w * x[2]))


_GAUSS_Y = [0.0009, 0.0044, 0.0175, 0.0540, 0.1295, 0.2420, 0.3521, 0.3989]


def _gaussian(x):
    t = (8 - jnp.arange(1.0, 16.0)) / 2
    y = jnp.array(_GAUSS_Y + _GAUSS_Y[-2::-1])
    return x[0] * jnp.exp(-x[1] * (t - x[2]) ** 2 / 2) - y


_MEYER_Y = [34780, 28610, 23650, 19630, 16370, 13720, 11540, 9744, 8261, 7030, 6005, 5147,
            4427, 3820, 3307, 2872]  # fmt: skip


def _meyer(x):
    t = 45 + 5 * jnp.arange(1.0, 17.0)
    return x[0] * jnp.exp(x[1] / (t + x[2])) - jnp.array(_MEYER_Y, float)


def _box_3d(x):
    t = 0.1 * jnp.arange(1.0, 11.0)
    return jnp.exp(-t * x[0]) - jnp.exp(-t * x[1]) - x[2] * (jnp.exp(-t) - jnp.exp(-10 * t))


def _powell_singular(x):
    return jnp.stack(
        [
            x[0] + 10 * x[1],
            np.sqrt(5) * (x[2] - x[3]),
            (x[1] - 2 * x[2]) ** 2,
            np.sqrt(10) * (x[0] - x[3]) ** 2,
        ]
    )


def _wood(x):
    return jnp.stack(
        [
            10 * (x[1] - x[0] ** 2),
            1 - x[0],
            np.sqrt(90) * (x[3] - x[2] ** 2),
            1 - x[2],
            np.sqrt(10) * (x[1] + x[3] - 2),
            (x[1] - x[3]) / np.sqrt(10),
        ]
    )


_KO_Y = [0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235, 0.0246]
_KO_U = [4, 2, 1, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625]


def _kowalik_osborne(x):
    u, y = jnp.array(_KO_U), jnp.array(_KO_Y)
    return y - x[0] * (u**2 + u * x[1]) / (u**2 + u * x[2] + x[3])


def _brown_dennis(x):
    t = jnp.arange(1.0, 21.0) / 5
    return (x[0] + t * x[1] - jnp.exp(t)) ** 2 + (x[2] + x[3] * jnp.sin(t) - jnp.cos(t)) ** 2


# fmt: off
_OSBORNE1_Y = [0.844, 0.908, 0.932, 0.936, 0.925, 0.908, 0.881, 0.850, 0.818, 0.784, 0.751,
               0.718, 0.685, 0.658, 0.628, 0.603, 0.580, 0.558, 0.538, 0.522, 0.506, 0.490,
               0.478, 0.467, 0.457, 0.448, 0.438, 0.431, 0.424, 0.420, 0.414, 0.411, 0.406]
# fmt: on


def _osborne1(x):
    t = 10 * jnp.arange(33.0)
    model = x[0] + x[1] * jnp.exp(-t * x[3]) + x[2] * jnp.exp(-t * x[4])
    return jnp.array(_OSBORNE1_Y) - model


def _biggs_exp6(x):
    t = 0.1 * jnp.arange(1.0, 14.0)
    y = jnp.exp(-t) - 5 * jnp.exp(-10 * t) + 3 * jnp.exp(-4 * t)
    return x[2] * jnp.exp(-t * x[0]) - x[3] * jnp.exp(-t * x[1]) + x[5] * jnp.exp(-t * x[4]) - y


def _watson(x):
    n = x.shape[0]
    t = jnp.arange(1.0, 30.0) / 29
    j = jnp.arange(n, dtype=x.dtype)
    powers = t[:, None] ** j[None, :]  # (29, n): t^(j-1) for j = 1..n
    slope = powers[:, :-1] @ (j[1:] * x[1:])
    value = powers @ x
    return jnp.concatenate([slope - value**2 - 1, x[:1], (x[1] - x[0] ** 2 - 1)[None]])


def _penalty1(x):
    return jnp.concatenate([np.sqrt(1e-5) * (x - 1), (jnp.sum(x**2) - 0.25)[None]])


def _linear_full_rank(x):
    m = 10
    total = jnp.sum(x)
    head = x - 2 * total / m - 1
    tail = jnp.full((m - x.shape[0],), -2 * total / m - 1)
    return jnp.concatenate([head, tail])


PROBLEMS = (
    Problem("rosenbrock", _rosenbrock, (-1.2, 1.0), (0.0,)),
    Problem("freudenstein_roth", _freudenstein_roth, (0.5, -2.0), (48.9842536792400, 0.0)),
    Problem("powell_badly_scaled", _powell_badly_scaled, (0.0, 1.0), (0.0,)),
    Problem("brown_badly_scaled", _brown_badly_scaled, (1.0, 1.0), (0.0,)),
    Problem("beale", _beale, (1.0, 1.0), (0.0,)),
    Problem("jennrich_sampson", _jennrich_sampson, (0.3, 0.4), (124.362182355,)),
    Problem("helical_valley", _helical_valley, (-1.0, 0.0, 0.0), (0.0,)),
    Problem("bard", _bard, (1.0, 1.0, 1.0), (8.21487730657897e-3,)),
    Problem("gaussian", _gaussian, (0.4, 1.0, 0.0), (1.12793276961815e-8,)),
    Problem("meyer", _meyer, (0.02, 4000.0, 250.0), (87.9458551718,)),
    Problem("box_3d", _box_3d, (0.0, 10.0, 20.0), (0.0,)),
    Problem("powell_singular", _powell_singular, (3.0, -1.0, 0.0, 1.0), (0.0,)),
    Problem("wood", _wood, (-3.0, -1.0, -3.0, -1.0), (0.0,)),
    Problem("kowalik_osborne", _kowalik_osborne, (0.25, 0.39, 0.415, 0.39), (3.07505603849238e-4,)),
    Problem("brown_dennis", _brown_dennis, (25.0, 5.0, -5.0, -1.0), (85822.2016263563,)),
    Problem("osborne1", _osborne1, (0.5, 1.5, -1.0, 0.01, 0.02), (5.46489469748e-5,)),
    Problem("biggs_exp6", _biggs_exp6, (1.0, 2.0, 1.0, 1.0, 1.0, 1.0), (5.65565e-3, 0.0)),
    Problem("watson6", _watson, (0.0,) * 6, (2.28767005355e-3,)),
    Problem("penalty1", _penalty1, (1.0, 2.0, 3.0, 4.0), (2.24997750e-5,)),
    Problem("linear_full_rank", _linear_full_rank, (1.0,) * 5, (5.0,)),
)
