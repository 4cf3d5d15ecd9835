"""GGN losses: S^T S is the loss Hessian and S^T rw its gradient (float64, against jax)."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from paribus import losses

LOGITS = st.integers(1, 6).flatmap(
    lambda m: hnp.arrays(np.float64, (m,), elements=st.floats(-8.0, 8.0, width=64))
)


def _check_factor(loss, z, t):
    rw, s = loss.whiten(z, t)
    hess = jax.hessian(loss.value)(z, t)
    grad = jax.grad(loss.value)(z, t)
    chex.assert_shape(rw, z.shape)
    chex.assert_shape(s, (z.shape[0], z.shape[0]))
    np.testing.assert_allclose(s.T @ s, hess, atol=1e-12, rtol=1e-10)
    np.testing.assert_allclose(s.T @ rw, grad, atol=1e-12, rtol=1e-10)


@given(LOGITS, st.data())
def test_softmax_cross_entropy_label(z, data):
    label = data.draw(st.integers(0, z.shape[0] - 1))
    _check_factor(losses.softmax_cross_entropy(), jnp.asarray(z), jnp.asarray(label))


@given(LOGITS, st.data())
def test_softmax_cross_entropy_probabilities(z, data):
    w = data.draw(hnp.arrays(np.float64, z.shape, elements=st.floats(0.01, 1.0)))
    _check_factor(losses.softmax_cross_entropy(), jnp.asarray(z), jnp.asarray(w / w.sum()))


@given(LOGITS, st.data())
def test_sigmoid_binary_cross_entropy(z, data):
    t = data.draw(hnp.arrays(np.float64, z.shape, elements=st.floats(0.0, 1.0)))
    _check_factor(losses.sigmoid_binary_cross_entropy(), jnp.asarray(z), jnp.asarray(t))


@given(LOGITS, st.data())
def test_squared(z, data):
    t = data.draw(hnp.arrays(np.float64, z.shape, elements=st.floats(-3.0, 3.0)))
    _check_factor(losses.squared(), jnp.asarray(z), jnp.asarray(t))


def test_values_match_optax_style_formulas():
    z = jnp.array([2.0, -1.0, 0.5])
    p = jax.nn.softmax(z)
    assert losses.softmax_cross_entropy().value(z, jnp.asarray(1)) == pytest.approx(
        float(-jnp.log(p[1])), rel=1e-13
    )
    t = jnp.array([1.0, 0.0, 1.0])
    s = jax.nn.sigmoid(z)
    expected = -jnp.sum(t * jnp.log(s) + (1 - t) * jnp.log(1 - s))
    assert losses.sigmoid_binary_cross_entropy().value(z, t) == pytest.approx(
        float(expected), rel=1e-13
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_extreme_logits_stay_finite(dtype):
    """Examples wrong with extreme confidence: p underflows but rw and S stay finite. Below
    the floor the whitened gradient is shrunk but keeps its sign; fully saturated (p = 0 in
    the dtype) the curvature is zero and so is the whitened gradient, never inf or NaN."""
    ce = losses.softmax_cross_entropy()
    for z in ([300.0, -300.0, 0.0], [20.0, -20.0, 0.0]):
        rw, s = ce.whiten(jnp.array(z, dtype), jnp.asarray(1))
        chex.assert_tree_all_finite((rw, s))
        assert rw.dtype == dtype and float(jnp.sum(jnp.square(rw))) < 1e33
    grad = s.T @ rw  # z = [20, -20, 0]: p_1 = 4e-18 is below the float32 floor
    assert grad[1] < 0 and grad[0] > 0
    bce = losses.sigmoid_binary_cross_entropy()
    rw, s = bce.whiten(jnp.array([300.0, -300.0, 0.0], dtype), jnp.array([0.0, 1.0, 1.0], dtype))
    chex.assert_tree_all_finite((rw, s))
    assert rw[0] > 0 and rw[1] < 0 and rw[2] == pytest.approx(-1.0)


def test_whiten_batch_shapes_and_gradient():
    key = jax.random.key(0)
    outputs = jax.random.normal(key, (5, 3))
    labels = jnp.array([0, 1, 2, 1, 0])
    loss = losses.softmax_cross_entropy()
    values, rw, s = losses.whiten_batch(loss, outputs, labels)
    chex.assert_shape((values, rw, s), ((5,), (5, 3), (5, 3, 3)))
    total = lambda o: jnp.sum(jax.vmap(loss.value)(o, labels))  # noqa: E731
    np.testing.assert_allclose(
        jnp.einsum("nij,ni->nj", s, rw), jax.grad(total)(outputs), atol=1e-12
    )


def test_bad_targets_raise():
    z = jnp.zeros(3)
    with pytest.raises(ValueError, match="integer class label"):
        losses.softmax_cross_entropy().whiten(z, jnp.zeros(4))
    with pytest.raises(ValueError, match="targets of shape"):
        losses.sigmoid_binary_cross_entropy().value(z, jnp.zeros(2))
    with pytest.raises(ValueError, match="ONE example"):
        losses.squared().whiten(jnp.zeros((2, 3)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"outputs \(N, m\)"):
        losses.whiten_batch(losses.squared(), jnp.zeros(3), jnp.zeros(3))
