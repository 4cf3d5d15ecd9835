"""pb.partial, pb.nudge, pb.per_example_grads, pb.check_jacobian."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_compiles_once, count_compiles, random_mlp
from jax.flatten_util import ravel_pytree

import paribus as pb


def mlp_problem(dtype=jnp.float64, sizes=(2, 3, 2), n=6):
    params, apply = random_mlp(jax.random.key(0), list(sizes), dtype=dtype)
    xs = jax.random.normal(jax.random.key(1), (n, sizes[0]), dtype)
    ys = jax.random.normal(jax.random.key(2), (n, sizes[-1]), dtype)

    def loss(p):
        r = jax.vmap(apply, (None, 0))(p, xs) - ys
        return 0.5 * jnp.sum(r**2)

    return params, apply, xs, ys, loss


def test_partial_equals_nudge_equals_gradient_entry_by_index_and_label():
    params, _, _, _, loss = mlp_problem()
    grad = np.asarray(ravel_pytree(jax.grad(loss)(params))[0])
    labels = pb.jacobian(lambda p, x: jnp.sum(x), params, jnp.ones((1, 1))).labels
    for k, label in enumerate(labels):
        exact = pb.partial(loss, params, k)
        chex.assert_shape(exact, ())
        np.testing.assert_allclose(exact, grad[k], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(pb.partial(loss, params, label), grad[k], rtol=1e-12, atol=1e-14)
        # Central differences in float64: error ~ h^2 + eps / h ~ 1e-10 relative.
        np.testing.assert_allclose(pb.nudge(loss, params, k), grad[k], rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(pb.nudge(loss, params, label), grad[k], rtol=1e-7, atol=1e-9)
    assert np.min(np.abs(grad)) > 0  # every entry is exercised (random biases)


def test_partial_of_a_vector_function_is_a_jacobian_column():
    params, apply, xs, _, _ = mlp_problem()
    jac = pb.jacobian(apply, params, xs)

    def outputs(p):
        return jax.vmap(apply, (None, 0))(p, xs)  # (N, m)

    for k in [0, 5, jac.shape[1] - 1]:
        column = pb.partial(outputs, params, k)
        chex.assert_shape(column, (6, 2))
        np.testing.assert_allclose(column.reshape(-1), jac.matrix[:, k], rtol=1e-12)
        np.testing.assert_allclose(
            pb.nudge(outputs, params, k).reshape(-1), jac.matrix[:, k], rtol=1e-6, atol=1e-9
        )


def test_negative_index_and_traced_index_under_jit_and_vmap():
    params, _, _, _, loss = mlp_problem()
    grad = ravel_pytree(jax.grad(loss)(params))[0]
    np.testing.assert_allclose(pb.partial(loss, params, -1), grad[-1], rtol=1e-12)
    # A traced k: one compilation serves every parameter; vmap over k gives the gradient.
    jitted = jax.jit(lambda p, k: pb.partial(loss, p, k))
    assert_compiles_once(jitted, params, jnp.array(3))
    assert count_compiles(jitted, params, jnp.array(7)) == 0
    all_partials = jax.vmap(lambda k: pb.partial(loss, params, k))(jnp.arange(grad.size))
    np.testing.assert_allclose(all_partials, grad, rtol=1e-12, atol=1e-14)
    all_nudges = jax.jit(jax.vmap(lambda k: pb.nudge(loss, params, k)))(jnp.arange(grad.size))
    np.testing.assert_allclose(all_nudges, grad, rtol=1e-7, atol=1e-9)


def test_nudge_moves_only_one_parameter():
    params = {"a": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array(-0.5)}
    seen = []

    def f(p):
        seen.append(p)
        return p["a"][1] * p["b"]

    value = pb.nudge(f, params, "a[1]", step=1e-3)
    np.testing.assert_allclose(value, -0.5, rtol=1e-12)
    up, down = seen
    np.testing.assert_array_equal(up["a"][jnp.array([0, 2])], [1.0, 3.0])
    np.testing.assert_array_equal(down["b"], -0.5)
    np.testing.assert_allclose([up["a"][1], down["a"][1]], [2.001, 1.999], rtol=1e-14)


def test_nudge_on_pytree_outputs():
    params = {"a": jnp.array([1.0, 2.0])}
    out = pb.nudge(lambda p: {"sq": jnp.sum(p["a"] ** 2), "v": 3 * p["a"]}, params, 1)
    np.testing.assert_allclose(out["sq"], 4.0, rtol=1e-8)
    np.testing.assert_allclose(out["v"], [0.0, 3.0], atol=1e-8)


def test_float32_partial_and_nudge():
    params, _, _, _, loss = mlp_problem(jnp.float32)
    grad = np.asarray(ravel_pytree(jax.grad(loss)(params))[0])
    for k in range(0, grad.size, 3):
        exact = pb.partial(loss, params, k)
        assert exact.dtype == jnp.float32
        np.testing.assert_allclose(exact, grad[k], rtol=1e-5, atol=1e-6)
        # float32 central differences: h ~ 5e-3, error ~ 1e-4 relative to the loss scale.
        np.testing.assert_allclose(pb.nudge(loss, params, k), grad[k], rtol=2e-2, atol=2e-3)


def test_per_example_grads_sum_to_the_batch_gradient():
    params, apply, xs, ys, loss = mlp_problem()

    def example_loss(p, example):
        x, y = example
        return 0.5 * jnp.sum((apply(p, x) - y) ** 2)

    grads = pb.per_example_grads(example_loss, params, (xs, ys))
    chex.assert_shape(grads["layers"][0]["w"], (6, 2, 3))
    total = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)
    chex.assert_trees_all_close(total, jax.grad(loss)(params), rtol=1e-12, atol=1e-14)
    # Row i is the gradient of example i alone.
    first = jax.grad(example_loss)(params, (xs[0], ys[0]))
    chex.assert_trees_all_close(jax.tree.map(lambda g: g[0], grads), first, rtol=1e-13)


def test_check_jacobian_is_small_for_a_correct_function():
    params, apply, xs, _, _ = mlp_problem(jnp.float32)  # cast to float64 inside
    report = pb.check_jacobian(apply, params, xs)
    assert set(report.vs_finite_differences) == {"per_example", "fwd", "rev", "structured"}
    assert max(report.vs_finite_differences.values()) < 1e-8
    assert max(report.vs_per_example.values()) < 1e-13
    assert report.ok()


@jax.custom_jvp
def wrong_tanh(z):
    return jnp.tanh(z)


@wrong_tanh.defjvp
def _wrong_tanh_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    return jnp.tanh(z), 2.0 * dz  # wrong: the slope is 1 - tanh(z)^2, not 2


def test_check_jacobian_reports_a_wrong_custom_jvp():
    params = {"w": jnp.array([[0.5, -1.0], [0.3, 0.8]]), "c": jnp.array([1.0, 2.0])}
    xs = jax.random.normal(jax.random.key(3), (4, 2), jnp.float64)

    def fn(p, x):
        return p["c"] * wrong_tanh(x @ p["w"])

    report = pb.check_jacobian(fn, params, xs)
    # Every mode derives from the same (wrong) JVP: they agree with each other ...
    assert max(report.vs_per_example.values()) < 1e-13
    # ... and all disagree with finite differences, which only evaluate the function.
    assert min(report.vs_finite_differences.values()) > 0.1
    assert not report.ok()
    assert report.worst_entry[1].startswith("w[")  # c's columns are right; w's are not


def test_check_jacobian_on_nested_params_with_selected_modes():
    params = {"p": [jnp.array([0.2, 0.4]), (jnp.array(1.5),)]}
    xs = jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)
    report = pb.check_jacobian(
        lambda p, x: jnp.sin(p["p"][0] * x) * p["p"][1][0], params, xs, modes=["fwd", "rev"]
    )
    assert set(report.vs_finite_differences) == {"fwd", "rev"}
    assert report.ok(rtol=1e-8)


class TestBadInputs:
    def setup_method(self):
        self.params = {"a": jnp.ones(3), "b": {"c": jnp.ones((2, 2))}}

    def f(self, p):
        return jnp.sum(p["a"]) + jnp.sum(p["b"]["c"])

    def test_unknown_label_lists_the_leaves(self):
        with pytest.raises(KeyError, match=r"no parameter labelled 'b.c\[2,0\]'.*b.c \(2, 2\)"):
            pb.partial(self.f, self.params, "b.c[2,0]")
        with pytest.raises(KeyError, match=r"no parameter labelled 'x'.*a \(3,\)"):
            pb.nudge(self.f, self.params, "x")

    @pytest.mark.parametrize("k", [7, -8, 100])
    def test_index_out_of_range(self, k):
        with pytest.raises(IndexError, match=rf"index {k} out of range for P = 7 parameters"):
            pb.partial(self.f, self.params, k)

    @pytest.mark.parametrize("k", [1.0, True, jnp.array([1, 2]), jnp.array(1.0)])
    def test_bad_index_type(self, k):
        with pytest.raises(TypeError, match="k must be an int, an integer scalar array or a label"):
            pb.partial(self.f, self.params, k)

    def test_integer_params(self):
        params = {"a": jnp.arange(3)}
        with pytest.raises(TypeError, match=r"parameter 'a' has dtype int.*expected a floating"):
            pb.partial(lambda p: jnp.sum(p["a"]), params, 0)
        with pytest.raises(TypeError, match=r"parameter 'a' has dtype int"):
            pb.nudge(lambda p: jnp.sum(p["a"]), params, 0)

    def test_per_example_grads_needs_a_scalar_loss(self):
        with pytest.raises(ValueError, match="must return a scalar for one example"):
            pb.per_example_grads(lambda p, x: p["a"] * x, self.params, jnp.ones((4, 3)))


class TestIndexAndStep:
    """A partial derivative is never a plausible wrong number (issues 12, 13)."""

    params = {"a": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array(-0.5)}
    size = 4

    @staticmethod
    def f(p):
        return jnp.sum(p["a"] ** 2) * p["b"]

    def test_concrete_array_indices_are_checked_like_ints(self):
        grad = ravel_pytree(jax.grad(self.f)(self.params))[0]
        for k in (jnp.int32(2), np.int64(-1), jnp.array(0, jnp.int64)):
            np.testing.assert_allclose(pb.partial(self.f, self.params, k), grad[int(k)])
        for k in (jnp.int32(1000), jnp.int32(4), np.int64(-5)):
            with pytest.raises(IndexError, match=f"index {int(k)} out of range for P = 4"):
                pb.partial(self.f, self.params, k)
            with pytest.raises(IndexError, match="out of range"):
                pb.nudge(self.f, self.params, k)

    def test_traced_indices_out_of_range_give_nan(self):
        grad = ravel_pytree(jax.grad(self.f)(self.params))[0]
        ks = jnp.array([0, 3, -1, -4, 4, -5, 1000, jnp.iinfo(jnp.int32).min], jnp.int32)
        exact = jax.jit(jax.vmap(lambda k: pb.partial(self.f, self.params, k)))(ks)
        nudged = jax.jit(jax.vmap(lambda k: pb.nudge(self.f, self.params, k)))(ks)
        want = np.array([grad[0], grad[3], grad[3], grad[0]] + [np.nan] * 4)
        np.testing.assert_allclose(exact, want, rtol=1e-12)  # NaN only where NaN is wanted
        np.testing.assert_allclose(nudged, want, rtol=1e-7)
        # Pytree outputs: every float leaf is NaN.
        out = jax.jit(lambda k: pb.partial(lambda p: {"x": p["a"], "y": p["b"]}, self.params, k))
        assert all(jnp.all(jnp.isnan(leaf)) for leaf in jax.tree.leaves(out(jnp.int32(9))))

    def test_step_is_keyword_only_and_checked(self):
        np.testing.assert_allclose(
            pb.nudge(self.f, self.params, "a[1]", step=1e-4), 2 * 2.0 * -0.5, rtol=1e-7
        )
        with pytest.raises(TypeError):
            pb.nudge(self.f, self.params, 1, 1e-3)  # positional: ambiguous with k
        with pytest.raises(TypeError):
            pb.nudge(self.f, self.params, 1, eps=1e-3)  # the old name
        for step in (0.0, -1e-3, float("nan"), float("inf"), -float("inf")):
            with pytest.raises(ValueError, match="step must be a finite number > 0"):
                pb.nudge(self.f, self.params, 1, step=step)
        with pytest.raises(TypeError, match="step must be a positive number"):
            pb.nudge(self.f, self.params, 1, step=jnp.array([1e-3, 1e-3]))
        with pytest.raises(ValueError, match=r"does not move theta_k = 2.0 in float64"):
            pb.nudge(self.f, self.params, 1, step=1e-300)

    def test_traced_bad_steps_give_nan(self):
        fn = jax.jit(jax.vmap(lambda h: pb.nudge(self.f, self.params, 1, step=h)))
        got = fn(jnp.array([1e-4, 0.0, -1e-4, jnp.inf, jnp.nan, 1e-300]))
        np.testing.assert_allclose(got[0], -2.0, rtol=1e-7)
        assert np.all(np.isnan(got[1:]))  # 1e-300: theta_k + h == theta_k - h, 0 / 0
