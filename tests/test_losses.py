"""GGN losses: S^T S is the loss Hessian and S^T rw its gradient (float64, against jax)."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import paribus as pb
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


# ------------------------------------------------------------------ targets are checked (issue 12)

CE, BCE = losses.softmax_cross_entropy(), losses.sigmoid_binary_cross_entropy()
BAD_TARGETS = [
    (CE, jnp.array(3), r"integer class label in \[0, m\)"),
    (CE, jnp.array(-1), "got 1 invalid target of 1: -1"),
    (CE, jnp.array(100), "m = 3 outputs"),
    (CE, jnp.array([0.5, 0.6, 0.0]), "sum to 1"),  # sums to 1.1: the GGN would be off by 1.1
    (CE, jnp.array([1.5, -0.5, 0.0]), ">= 0"),  # sums to 1, but not probabilities
    (CE, jnp.array([jnp.nan, 0.5, 0.5]), "probabilities"),
    (BCE, jnp.array([-1.0, 1.0, 1.0]), r"in \[0, 1\]"),
    (BCE, jnp.array([0.0, 2.0, 1.0]), "not -1/\\+1"),
]


@pytest.mark.parametrize(("loss", "t", "match"), BAD_TARGETS)
def test_invalid_targets_raise_where_concrete_and_give_nan_under_jit(loss, t, match):
    z = jnp.array([0.3, -1.2, 2.0])
    for fn in (loss.value, loss.whiten):
        with pytest.raises(ValueError, match=match):
            fn(z, t)
    with pytest.raises(ValueError, match=match):
        losses.check_targets(loss, t, 3)
    value = jax.jit(loss.value)(z, t)
    grad = jax.jit(jax.grad(loss.value))(z, t)
    rw, s = jax.jit(loss.whiten)(z, t)
    assert jnp.isnan(value) and jnp.all(jnp.isnan(grad)) and jnp.all(jnp.isnan(rw))
    chex.assert_tree_all_finite(s)  # the curvature does not depend on the target


@pytest.mark.parametrize(("loss", "t"), [(CE, jnp.array(2)), (CE, jnp.array([0.2, 0.3, 0.5]))])
def test_valid_targets_are_untouched_under_jit(loss, t):
    z = jnp.array([0.3, -1.2, 2.0])
    chex.assert_trees_all_close(jax.jit(loss.whiten)(z, t), loss.whiten(z, t), rtol=1e-15)
    np.testing.assert_allclose(jax.jit(loss.value)(z, t), loss.value(z, t), rtol=1e-15)
    chex.assert_tree_all_finite(jax.jit(jax.grad(loss.value))(z, t))


def test_probabilities_within_float32_rounding_of_one_are_accepted():
    logits = jax.random.normal(jax.random.key(0), (4, 1000), jnp.float32)
    t = jax.nn.softmax(logits).astype(jnp.float64)  # a float32 teacher's probabilities
    losses.check_targets(CE, t, 1000)
    losses.check_targets(CE, jnp.full((2, 3), (1 + 2e-4) / 3), 3)
    with pytest.raises(ValueError, match="sum to 1"):
        losses.check_targets(CE, jnp.full((2, 3), (1 + 1e-3) / 3), 3)


def test_a_batch_check_names_the_examples():
    labels = jnp.array([0, 3, 1, -1, 2, 100, 7])
    with pytest.raises(ValueError, match=r"got 4 invalid targets of 7: example 1: 3; example 3"):
        losses.whiten_batch(CE, jnp.zeros((7, 3)), labels)
    with pytest.raises(ValueError, match=r"example 1: \[ 0.,  1., -1.\]"):
        losses.check_targets(BCE, jnp.array([[0.0, 1.0, 1.0], [0.0, 1.0, -1.0]]), 3)
    losses.check_targets(losses.squared(), jnp.full((2, 3), 7.0), 3)  # anything goes
    # Traced targets cannot be read on the host: no error, the loss gives NaN instead.
    jax.jit(lambda t: losses.check_targets(CE, t, 3))(labels)
    values = jax.jit(lambda t: losses.whiten_batch(CE, jnp.zeros((7, 3)), t)[0])(labels)
    np.testing.assert_array_equal(jnp.isnan(values), [False, True, False, True, False, True, True])


def test_network_outputs_carries_its_loss_and_checks_concrete_targets():
    init, apply = pb.nets.mlp([2, 4, 3])
    params = init(jax.random.key(0))
    xs, labels = jnp.ones((5, 2)), jnp.array([0, 1, 2, 1, 3])
    plain = losses.network_outputs(apply)
    assert plain.loss is None
    z, t = plain(params, (xs, labels))  # no loss: nothing to check the labels against
    chex.assert_shape(z, (5, 3))
    fn = losses.network_outputs(apply, CE)
    assert fn.loss is CE and isinstance(fn, pb.PerExample) and fn.apply is apply
    with pytest.raises(ValueError, match="example 4: 3"):
        fn(params, (xs, labels))
    with pytest.raises(TypeError, match="network_outputs: loss must be an OutputLoss"):
        losses.network_outputs(apply, losses.huber())  # a residual loss: not of (z, t)
    z, t = jax.jit(fn)(params, (xs, labels))  # traced: checked by the loss, as NaN
    values = jax.vmap(CE.value)(z, t)
    np.testing.assert_array_equal(jnp.isnan(values), [False] * 4 + [True])


def test_fit_with_invalid_labels_does_not_report_success():
    init, apply = pb.nets.mlp([2, 4, 3])
    batch = (jax.random.normal(jax.random.key(1), (6, 2)), jnp.array([0, 1, 2, 1, 0, 5]))
    try:
        result = pb.fit(
            losses.network_outputs(apply),
            init(jax.random.key(0)),
            pb.gauss_newton(loss=CE),
            batch,
            max_steps=5,
            loss=CE,
        )
    except ValueError as error:  # a host-side check at fit's boundary is as good
        assert "class label" in str(error)
    else:
        assert result.stop_reason == "non_finite"
        assert not getattr(result, "converged", False)
