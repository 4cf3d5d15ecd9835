"""Losses beyond 1/2 ||r||^2: GGN losses of network outputs, and robust losses of residuals.

Two kinds of record, for two kinds of problem:

- :class:`OutputLoss` (``squared``, ``softmax_cross_entropy``, ``sigmoid_binary_cross_entropy``):
  a loss ``ell(z, t)`` of ONE example's whole output vector z (m,) and its target t (a class
  label, probabilities, ...). The outputs of an example are coupled (softmax), so the whitening
  is a full (m, m) factor per example. Use it with ``loss=`` when the residual function returns
  ``(outputs, targets)``, as :func:`network_outputs` does: classification by the generalised
  Gauss-Newton method.
- :class:`ResidualLoss` (``linear``, ``huber``, ``soft_l1``, ``cauchy``, ``arctan``): a robust
  loss applied to each residual separately, exactly as ``scipy.optimize.least_squares`` defines
  it, with a scale C. The residual function returns residuals as usual (targets already
  subtracted); the whitening is diagonal. Use it to fit curves or networks to data with
  outliers (M-estimation by iteratively reweighted Gauss-Newton / Levenberg-Marquardt).

``squared()`` and ``linear()`` are the same least-squares problem seen by each kind.

**GGN losses.** For a per-example loss ``ell(z, t)`` of the network outputs z = f(theta, x) in
R^m and a target t, the Newton matrix of L(theta) = sum_i ell(f(theta, x_i), t_i) is

    sum_i J_i^T H_i J_i  +  sum_i sum_j (d ell / d z_j) d^2 f_j / d theta^2,

with J_i = dz_i / dtheta (m, P) and H_i = d^2 ell / dz^2 (m, m). The generalised Gauss-Newton
matrix keeps the first term, G = sum_i J_i^T H_i J_i, which is positive semi-definite whenever
ell is convex in z (Schraudolph 2002; Martens 2020, "New insights and perspectives on the
natural gradient method", section 8).

Each such loss comes with a whitening ``whiten(z, t) -> (rw, S)``: a factor S (m, m) with
S^T S = H and whitened residuals rw (m,) with S^T rw = grad_z ell(z, t). Then, with the
per-example whitened Jacobian J'_i = S_i J_i,

    G = J'^T J'        and        grad L = J'^T rw,

so Gauss-Newton and Levenberg-Marquardt for a convex loss are the least-squares methods applied
to the whitened problem: the same primal, dual and matrix-free solves, unchanged.

Why rw exists: grad_z ell lies in the range of H for these losses (for softmax cross-entropy
both are orthogonal to the all-ones vector), so S^T rw = grad has a solution.

Each GGN loss checks its targets (:func:`check_targets`): an invalid target (a label out of
range, probabilities that do not sum to one, a binary target outside [0, 1]) makes the value
and the whitened residuals NaN inside jit, so ``pb.fit`` stops with "non_finite" instead of
fitting a different problem; where the targets are concrete it raises ``ValueError`` at once.

**Robust losses** are documented at :class:`ResidualLoss`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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
    "Targets",
    "arctan",
    "cauchy",
    "check_targets",
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


class Targets(NamedTuple):
    """The targets an :class:`OutputLoss` accepts.

    Attributes:
      expected: a valid target of one example, in words, for error messages.
      valid: ``valid(t, m) -> bool array``: True where an example's target is valid, for the
        target of one example or a batch of them (leading axes), with m outputs per example.
        Traceable; raises ``ValueError`` for targets of the wrong shape or dtype.
    """

    expected: str
    valid: Callable[[Any, int], jax.Array]


class OutputLoss(NamedTuple):
    """A per-example loss of the network outputs and its GGN whitening.

    Attributes:
      name: a short name, e.g. ``"softmax_cross_entropy"``.
      value: ``value(z, t) -> ()``: the loss of ONE example; z (m,) outputs, t its target.
      whiten: ``whiten(z, t) -> (rw (m,), S (m, m))`` with S^T S = d^2 value / dz^2 and
        S^T rw = d value / dz. The GGN is J'^T J' with J' = S J per example; the gradient is
        J'^T rw.
      targets: what ``value`` and ``whiten`` accept as t (:class:`Targets`); None accepts
        anything. Both give NaN for an invalid target (and raise where t is concrete).
    """

    name: str
    value: Callable[[jax.Array, Any], jax.Array]
    whiten: Callable[[jax.Array, Any], tuple[jax.Array, jax.Array]]
    targets: Targets | None = None


def check_targets(loss: OutputLoss, targets: Any, m: int) -> None:
    """Raise ``ValueError`` unless every target is valid for ``loss`` with m outputs.

    Targets that are traced (inside ``jit`` or ``vmap``) cannot be read on the host and are
    left alone: there the loss itself gives NaN for an invalid target, so ``pb.fit`` reports
    "non_finite". Concrete targets are checked here, before any computation, with a message
    that names the first invalid examples.

    Args:
      loss: an :class:`OutputLoss` (one without ``targets`` accepts anything).
      targets: the target of one example, or a batch of them with leading example axes.
      m: the number of outputs of one example (classes for cross-entropy).

    Example:
      >>> import jax.numpy as jnp, paribus as pb
      >>> ce = pb.losses.softmax_cross_entropy()
      >>> pb.losses.check_targets(ce, jnp.array([0, 3]), 3)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: softmax_cross_entropy with m = 3 outputs: expected ...: example 1: 3.
    """
    _check_concrete(loss.name, getattr(loss, "targets", None), targets, int(m))


def _check_concrete(name: str, spec: Targets | None, targets: Any, m: int) -> None:
    if spec is None or _is_traced(targets):
        return
    # Concrete targets inside someone's jit trace (a batch closed over): evaluate now, on the
    # host, rather than stage the check into the trace.
    with jax.ensure_compile_time_eval():
        ok = np.asarray(spec.valid(targets, m))
    if ok.all():
        return
    t = np.asarray(targets)
    bad = np.argwhere(~ok) if ok.ndim else np.zeros((1, 0), int)
    shown = "; ".join(
        ("example " + ",".join(str(i) for i in idx) + ": " if ok.ndim else "")
        + np.array2string(t[tuple(idx)], precision=6, separator=", ")
        for idx in bad[:3]
    )
    more = ", ..." if len(bad) > 3 else ""
    raise ValueError(
        f"{name} with m = {m} outputs: expected {spec.expected}; got {len(bad)} invalid "
        f"target{'s' if len(bad) > 1 else ''} of {ok.size}: {shown}{more}."
    )


def _is_traced(tree: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _nan_factor(ok: jax.Array, dtype: Any) -> jax.Array:
    """1 where the target is valid, NaN where not.

    The loss multiplies both its input z and its result by it: the value is then NaN, and so
    is its gradient. Neither alone is enough: jnp.where(ok, value, nan) gives an invalid
    example a zero gradient (a first-order fit would carry on), and a NaN cotangent entering
    -sum(onehot * log_softmax(z)) is zeroed by XLA, which turns a product with a 0/1 mask
    into a select.
    """
    return jnp.where(ok, jnp.ones((), dtype), jnp.asarray(jnp.nan, dtype))


def _checked(loss_name: str, spec: Targets, z: jax.Array, t: Any) -> jax.Array:
    """The validity of one example's target (traced), after a host check when t is concrete."""
    _check_concrete(loss_name, spec, t, z.shape[0])
    return spec.valid(t, z.shape[0])


_CE, _BCE = "softmax_cross_entropy", "sigmoid_binary_cross_entropy"


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


# Factories are cached: the same loss is then the same (hashable) object, so a jitted function
# that takes it as a static argument (pb.fit does) does not recompile for a new but equal loss.
@functools.cache
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


def _probability_sum_tol(dtype: Any) -> float:
    # sqrt(eps) of float32, or of a coarser dtype: probabilities made in float32 (a teacher's
    # softmax, label smoothing) and stored in float64 sum to one only to float32 rounding, and
    # the GGN of targets summing to 1 + d is off by the factor 1 + d, negligible at 3.5e-4.
    return float(np.sqrt(max(np.finfo(dtype).eps, np.finfo(np.float32).eps)))


def _class_targets_valid(t: Any, m: int) -> jax.Array:
    t = jnp.asarray(t)
    if jnp.issubdtype(t.dtype, jnp.integer):
        return (t >= 0) & (t < m)
    if jnp.issubdtype(t.dtype, jnp.floating) and t.shape[-1:] == (m,):
        tol = _probability_sum_tol(t.dtype)
        # NaN fails both comparisons, so a NaN target is invalid too.
        return jnp.all(t >= 0, axis=-1) & (jnp.abs(jnp.sum(t, axis=-1) - 1) <= tol)
    raise ValueError(
        f"softmax cross-entropy: expected integer class labels, or class probabilities with a "
        f"last axis of m = {m}; got {t.dtype}{t.shape}."
    )


_CLASS_TARGETS = Targets(
    "an integer class label in [0, m), or class probabilities (m,) that are >= 0 and sum to 1 "
    "(within sqrt(eps) of float32)",
    _class_targets_valid,
)


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


@functools.cache
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

    Args of ``value`` / ``whiten``: z (m,) logits; t an integer class label in [0, m)
    (shape ()) or class probabilities (m,), >= 0 and summing to one. Any other target gives
    NaN (the H above assumes sum_j t_j = 1; a label out of range would silently drop the
    example), and ``ValueError`` where t is concrete.
    """

    def value(z: jax.Array, t: Any) -> jax.Array:
        _check_outputs(z, where="softmax cross-entropy")
        probs = _class_probabilities(z, t, where="softmax cross-entropy")
        nan_if_invalid = _nan_factor(_checked(_CE, _CLASS_TARGETS, z, t), z.dtype)
        z = z * nan_if_invalid
        return -jnp.sum(probs * jax.nn.log_softmax(z)) * nan_if_invalid

    def whiten(z: jax.Array, t: Any) -> tuple[jax.Array, jax.Array]:
        _check_outputs(z, where="softmax cross-entropy")
        probs = _class_probabilities(z, t, where="softmax cross-entropy")
        nan_if_invalid = _nan_factor(_checked(_CE, _CLASS_TARGETS, z, t), z.dtype)
        log_p = jax.nn.log_softmax(z)
        p, q = jnp.exp(log_p), jnp.exp(0.5 * log_p)
        inv_q = jnp.exp(-0.5 * jnp.maximum(log_p, _log_floor(z.dtype)))
        rw = q - probs * inv_q
        s = jnp.diag(q) - q[:, None] * p[None, :]
        return rw * nan_if_invalid, s  # S is the curvature, which does not depend on t

    return OutputLoss(_CE, value, whiten, _CLASS_TARGETS)


def _binary_targets_valid(t: Any, m: int) -> jax.Array:
    t = jnp.asarray(t)
    if t.shape[-1:] != (m,) or not (
        jnp.issubdtype(t.dtype, jnp.floating) or jnp.issubdtype(t.dtype, jnp.integer)
    ):
        raise ValueError(
            f"sigmoid binary cross-entropy: expected targets of shape (..., {m}) (one per "
            f"logit, in [0, 1]); got {t.dtype}{t.shape}."
        )
    return jnp.all((t >= 0) & (t <= 1), axis=-1)


_BINARY_TARGETS = Targets(
    "targets (m,) in [0, 1], one per logit (0/1 labels or probabilities; not -1/+1)",
    _binary_targets_valid,
)


@functools.cache
def sigmoid_binary_cross_entropy() -> OutputLoss:
    """Independent binary cross-entropies of logits z (m,) against targets t in [0, 1] (m,).

    With s = sigmoid(z):

        ell(z, t) = sum_j softplus(z_j) - t_j z_j,   grad = s - t,   H = diag(s (1 - s)).

    The factor is S = diag(sqrt(s (1 - s))) and rw = (s - t) / sqrt(s (1 - s)), which simplifies
    exactly to rw = (1 - t) exp(z / 2) - t exp(-z / 2) (no cancellation, no division). Since
    s (1 - s) ~ exp(-|z|), z is clipped to |z| <= 2 log(1 / eps) in rw only, which floors the
    curvature divided by at about eps^2, as for softmax cross-entropy.

    A target outside [0, 1] (e.g. -1/+1 labels) gives NaN, and ``ValueError`` where t is
    concrete: ell is then unbounded below (t = -1 drives z to -inf).
    """

    def value(z: jax.Array, t: jax.Array) -> jax.Array:
        _check_outputs(z, where="sigmoid binary cross-entropy")
        _check_binary_targets(z, t)
        nan_if_invalid = _nan_factor(_checked(_BCE, _BINARY_TARGETS, z, t), z.dtype)
        z = z * nan_if_invalid
        return jnp.sum(jax.nn.softplus(z) - t * z) * nan_if_invalid

    def whiten(z: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        _check_outputs(z, where="sigmoid binary cross-entropy")
        _check_binary_targets(z, t)
        nan_if_invalid = _nan_factor(_checked(_BCE, _BINARY_TARGETS, z, t), z.dtype)
        t = jnp.asarray(t, z.dtype)
        bound = -_log_floor(z.dtype)
        zc = jnp.clip(z, -bound, bound)
        rw = (1 - t) * jnp.exp(0.5 * zc) - t * jnp.exp(-0.5 * zc)
        # log(s (1 - s)) = log sigmoid(z) + log sigmoid(-z), exact in both tails.
        root_h = jnp.exp(0.5 * (jax.nn.log_sigmoid(z) + jax.nn.log_sigmoid(-z)))
        return rw * nan_if_invalid, jnp.diag(root_h)

    return OutputLoss(_BCE, value, whiten, _BINARY_TARGETS)


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

    Concrete targets are checked first (:func:`check_targets`), so an invalid one is named
    by its example index.

    Args:
      loss: an :class:`OutputLoss`.
      outputs: (N, m) network outputs.
      targets: a pytree with a leading N axis (labels (N,), probabilities (N, m), ...).
    """
    if jnp.ndim(outputs) != 2:
        raise ValueError(
            f"pb.losses.whiten_batch: expected outputs (N, m); got shape {jnp.shape(outputs)}."
        )
    check_targets(loss, targets, jnp.shape(outputs)[1])
    values = jax.vmap(loss.value)(outputs, targets)
    rw, s = jax.vmap(loss.whiten)(outputs, targets)
    return values, rw, s


class _NetworkOutputs(PerExample):
    """:class:`PerExample` outputs and targets that carry their loss and check the targets
    on the host when they are concrete (inside jit the loss gives NaN instead)."""

    loss: OutputLoss | None = None

    def __call__(self, params: Any, batch: Any) -> Any:
        outputs, targets = super().__call__(params, batch)
        if self.loss is not None and jnp.ndim(outputs) == 2:
            check_targets(self.loss, targets, jnp.shape(outputs)[1])
        return outputs, targets


def network_outputs(
    apply: Callable[[Any, jax.Array], jax.Array], loss: OutputLoss | None = None
) -> PerExample:
    """``residual_fn(params, (xs, ts)) -> (outputs (N, m), targets ts)`` for a loss.

    The residual function that ``loss=`` expects from a network: outputs
    ``z_i = apply(params, x_i)`` and the targets passed through, for any network ``apply`` of
    one example. Like ``pb.regression_residuals``, it tells paribus the function is per
    example, so its Jacobian rows come from the layers' inputs and output cotangents.

    Args:
      apply: ``apply(params, x) -> (m,)`` for one example.
      loss: the :class:`OutputLoss` of these outputs, carried by the residual function as its
        ``.loss`` attribute, so that the loss is given once. With a loss, concrete targets are
        checked on every call (:func:`check_targets`).

    Example:
      >>> import jax, jax.numpy as jnp, paribus as pb
      >>> init, apply = pb.nets.mlp([2, 4, 3])
      >>> residual_fn = pb.losses.network_outputs(apply, pb.losses.softmax_cross_entropy())
      >>> z, t = residual_fn(init(jax.random.key(0)), (jnp.ones((5, 2)), jnp.zeros(5, int)))
      >>> z.shape, t.shape, residual_fn.loss.name
      ((5, 3), (5,), 'softmax_cross_entropy')
    """
    is_output_loss = all(hasattr(loss, a) for a in ("name", "value", "whiten"))
    if loss is not None and (isinstance(loss, ResidualLoss) or not is_output_loss):
        raise TypeError(
            "pb.losses.network_outputs: loss must be an OutputLoss of the outputs and targets, "
            f"e.g. pb.losses.softmax_cross_entropy(); got {loss!r}. A robust ResidualLoss "
            "acts on residuals: use it with pb.regression_residuals."
        )

    def example_fn(params: Any, example: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
        x, t = example
        return apply(params, x), t

    # needs_loss: (outputs, targets) mean nothing without a loss, here or at the solver.
    return _NetworkOutputs(example_fn, apply=apply, loss=loss, needs_loss=True)
