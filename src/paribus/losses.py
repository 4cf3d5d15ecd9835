"""Losses for the generalised Gauss-Newton (GGN) method, with their Hessian square roots.

For a per-example loss ``ell(z, t)`` of the network outputs z = f(theta, x) in R^m and a target
t, the Newton matrix of L(theta) = sum_i ell(f(theta, x_i), t_i) is

    sum_i J_i^T H_i J_i  +  sum_i sum_j (d ell / d z_j) d^2 f_j / d theta^2,

with J_i = dz_i / dtheta (m, P) and H_i = d^2 ell / dz^2 (m, m). The generalised Gauss-Newton
matrix keeps the first term, G = sum_i J_i^T H_i J_i, which is positive semi-definite whenever
ell is convex in z (Schraudolph 2002; Martens 2020, "New insights and perspectives on the
natural gradient method", section 8).

Each loss here comes with a whitening ``whiten(z, t) -> (rw, S)``: a factor S (m, m) with
S^T S = H and whitened residuals rw (m,) with S^T rw = grad_z ell(z, t). Then, with the
per-example whitened Jacobian J'_i = S_i J_i,

    G = J'^T J'        and        grad L = J'^T rw,

so Gauss-Newton and Levenberg-Marquardt for a convex loss are the least-squares methods applied
to the whitened problem: the same primal, dual and matrix-free solves, unchanged.

Why rw exists: grad_z ell lies in the range of H for these losses (for softmax cross-entropy
both are orthogonal to the all-ones vector), so S^T rw = grad has a solution.

Robust losses of residuals (``huber``, ``soft_l1``, ``cauchy``, ``arctan``, ``linear``), as
``scipy.optimize.least_squares`` defines them, are the other kind: see :class:`ResidualLoss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from paribus._residual_losses import (
    ResidualLoss,
    arctan,
    cauchy,
    huber,
    linear,
    robust,
    soft_l1,
)
from paribus.residuals import PerExample

__all__ = [
    "OutputLoss",
    "ResidualLoss",
    "arctan",
    "cauchy",
    "huber",
    "linear",
    "network_outputs",
    "robust",
    "sigmoid_binary_cross_entropy",
    "soft_l1",
    "softmax_cross_entropy",
    "squared",
    "whiten_batch",
]


class OutputLoss(NamedTuple):
    """A per-example loss of the network outputs and its GGN whitening.

    Attributes:
      name: a short name, e.g. ``"softmax_cross_entropy"``.
      value: ``value(z, t) -> ()``: the loss of ONE example; z (m,) outputs, t its target.
      whiten: ``whiten(z, t) -> (rw (m,), S (m, m))`` with S^T S = d^2 value / dz^2 and
        S^T rw = d value / dz. The GGN is J'^T J' with J' = S J per example; the gradient is
        J'^T rw.
    """

    name: str
    value: Callable[[jax.Array, Any], jax.Array]
    whiten: Callable[[jax.Array, Any], tuple[jax.Array, jax.Array]]


def _check_outputs(z: jax.Array, *, where: str) -> None:
    if jnp.ndim(z) != 1 or not jnp.issubdtype(jnp.result_type(z), jnp.floating):
        raise ValueError(
            f"{where}: expected the outputs z of ONE example as a float vector (m,); got "
            f"{jnp.result_type(z)}{jnp.shape(z)}. Batch with jax.vmap or pb.losses.whiten_batch."
        )


def _log_floor(dtype: Any) -> jax.Array:
    # The smallest curvature we divide by: eps^2 of the dtype (about 1e-14 in float32, 5e-32 in
    # float64). Dividing by the true, possibly underflowed curvature would give inf residuals;
    # flooring at the smallest normal number instead would make ||rw||^2 ~ 1e38 in float32,
    # which overflows as soon as a few examples are summed. Below the floor the whitened
    # gradient S^T rw is shrunk by sqrt(curvature / floor): the example is so confidently wrong
    # that its quadratic model is meaningless anyway.
    return 2.0 * jnp.log(jnp.asarray(jnp.finfo(dtype).eps, dtype))


def squared() -> OutputLoss:
    """ell(z, t) = 1/2 ||z - t||^2: H = I, so S = I and rw = z - t (plain least squares).

    Example:
      >>> import jax.numpy as jnp, paribus as pb
      >>> loss = pb.losses.squared()
      >>> rw, S = loss.whiten(jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0]))
      >>> rw.tolist(), S.tolist()
      ([1.0, 2.0], [[1.0, 0.0], [0.0, 1.0]])
    """

    def value(z: jax.Array, t: jax.Array) -> jax.Array:
        _check_outputs(z, where="squared loss")
        return 0.5 * jnp.sum(jnp.square(z - t))

    def whiten(z: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        _check_outputs(z, where="squared loss")
        if jnp.shape(t) != jnp.shape(z):
            raise ValueError(
                f"squared loss: target shape {jnp.shape(t)} differs from outputs {jnp.shape(z)}."
            )
        return z - t, jnp.eye(z.shape[0], dtype=z.dtype)

    return OutputLoss("squared", value, whiten)


def _class_probabilities(z: jax.Array, t: Any, *, where: str) -> jax.Array:
    """Target probabilities (m,) from an integer label () or a probability vector (m,)."""
    t = jnp.asarray(t)
    m = z.shape[0]
    if jnp.issubdtype(t.dtype, jnp.integer) and t.shape == ():
        return jax.nn.one_hot(t, m, dtype=z.dtype)
    if jnp.issubdtype(t.dtype, jnp.floating) and t.shape == (m,):
        return t.astype(z.dtype)
    raise ValueError(
        f"{where}: expected the target of one example as an integer class label () or class "
        f"probabilities ({m},); got {t.dtype}{t.shape}."
    )


def softmax_cross_entropy() -> OutputLoss:
    """Softmax cross-entropy of logits z (m,) against a label or class probabilities t.

    With p = softmax(z) and t summing to one (a one-hot label, or probabilities):

        ell(z, t) = -sum_j t_j log p_j,   grad = p - t,   H = diag(p) - p p^T.

    The factor is S = diag(sqrt p) - sqrt(p) p^T: with q = sqrt(p) and q^T q = 1,
    S^T S = diag(p) - 2 p p^T + p (q^T q) p^T = H. The whitened residual is
    rw = (p - t) / sqrt(p), because S^T rw = (p - t) - p sum_j (p_j - t_j) = p - t.
    Everything is computed from log p = log_softmax(z), so sqrt(p) = exp(log p / 2) does not
    underflow where p would; in the division, p is floored at eps^2 of the dtype (see the
    comment in ``_log_floor``), so rw stays finite for examples that are wrong with extreme
    confidence.

    Args of ``value`` / ``whiten``: z (m,) logits; t an integer class label (shape ()) or
    class probabilities (m,) summing to one.
    """

    def value(z: jax.Array, t: Any) -> jax.Array:
        _check_outputs(z, where="softmax cross-entropy")
        probs = _class_probabilities(z, t, where="softmax cross-entropy")
        return -jnp.sum(probs * jax.nn.log_softmax(z))

    def whiten(z: jax.Array, t: Any) -> tuple[jax.Array, jax.Array]:
        _check_outputs(z, where="softmax cross-entropy")
        probs = _class_probabilities(z, t, where="softmax cross-entropy")
        log_p = jax.nn.log_softmax(z)
        p, q = jnp.exp(log_p), jnp.exp(0.5 * log_p)
        inv_q = jnp.exp(-0.5 * jnp.maximum(log_p, _log_floor(z.dtype)))
        rw = q - probs * inv_q
        s = jnp.diag(q) - q[:, None] * p[None, :]
        return rw, s

    return OutputLoss("softmax_cross_entropy", value, whiten)


def sigmoid_binary_cross_entropy() -> OutputLoss:
    """Independent binary cross-entropies of logits z (m,) against targets t in [0, 1] (m,).

    With s = sigmoid(z):

        ell(z, t) = sum_j softplus(z_j) - t_j z_j,   grad = s - t,   H = diag(s (1 - s)).

    The factor is S = diag(sqrt(s (1 - s))) and rw = (s - t) / sqrt(s (1 - s)), which simplifies
    exactly to rw = (1 - t) exp(z / 2) - t exp(-z / 2) (no cancellation, no division). Since
    s (1 - s) ~ exp(-|z|), z is clipped to |z| <= 2 log(1 / eps) in rw only, which floors the
    curvature divided by at about eps^2, as for softmax cross-entropy.
    """

    def value(z: jax.Array, t: jax.Array) -> jax.Array:
        _check_outputs(z, where="sigmoid binary cross-entropy")
        _check_binary_targets(z, t)
        return jnp.sum(jax.nn.softplus(z) - t * z)

    def whiten(z: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        _check_outputs(z, where="sigmoid binary cross-entropy")
        _check_binary_targets(z, t)
        t = jnp.asarray(t, z.dtype)
        bound = -_log_floor(z.dtype)
        zc = jnp.clip(z, -bound, bound)
        rw = (1 - t) * jnp.exp(0.5 * zc) - t * jnp.exp(-0.5 * zc)
        # log(s (1 - s)) = log sigmoid(z) + log sigmoid(-z), exact in both tails.
        root_h = jnp.exp(0.5 * (jax.nn.log_sigmoid(z) + jax.nn.log_sigmoid(-z)))
        return rw, jnp.diag(root_h)

    return OutputLoss("sigmoid_binary_cross_entropy", value, whiten)


def _check_binary_targets(z: jax.Array, t: Any) -> None:
    if jnp.shape(t) != jnp.shape(z):
        raise ValueError(
            f"sigmoid binary cross-entropy: expected targets of shape {jnp.shape(z)} (one per "
            f"logit, in [0, 1]); got shape {jnp.shape(t)}."
        )


def whiten_batch(
    loss: OutputLoss, outputs: jax.Array, targets: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(values (N,), rw (N, m), S (N, m, m))``: the loss and whitening of every example.

    Args:
      loss: an :class:`OutputLoss`.
      outputs: (N, m) network outputs.
      targets: a pytree with a leading N axis (labels (N,), probabilities (N, m), ...).
    """
    if jnp.ndim(outputs) != 2:
        raise ValueError(
            f"pb.losses.whiten_batch: expected outputs (N, m); got shape {jnp.shape(outputs)}."
        )
    values = jax.vmap(loss.value)(outputs, targets)
    rw, s = jax.vmap(loss.whiten)(outputs, targets)
    return values, rw, s


def network_outputs(apply: Callable[[Any, jax.Array], jax.Array]) -> PerExample:
    """``residual_fn(params, (xs, ts)) -> (outputs (N, m), targets ts)`` for a loss.

    The residual function that ``loss=`` expects from a network: outputs
    ``z_i = apply(params, x_i)`` and the targets passed through. Like
    ``pb.regression_residuals``, it tells paribus that the outputs are a ``pb.nets`` network's,
    which unlocks the structured NTK, diagonals and per-example norms.

    Example:
      >>> import jax, jax.numpy as jnp, paribus as pb
      >>> init, apply = pb.nets.mlp([2, 4, 3])
      >>> residual_fn = pb.losses.network_outputs(apply)
      >>> z, t = residual_fn(init(jax.random.key(0)), (jnp.ones((5, 2)), jnp.zeros(5, int)))
      >>> z.shape, t.shape
      ((5, 3), (5,))
    """

    def example_fn(params: Any, example: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
        x, t = example
        return apply(params, x), t

    return PerExample(example_fn, apply=apply)
