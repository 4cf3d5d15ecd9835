"""pb.jacobian: every mode against every other and against finite differences, on random MLPs
and on non-MLP functions with nested params; chunking, jit, labels, the tree view, bad inputs."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_compiles_once, count_compiles, random_mlp
from hypothesis import given
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import paribus as pb

MODES = ("auto", "per_example", "fwd", "rev", "structured")
GENERIC_MODES = ("auto", "per_example", "fwd", "rev")


def finite_difference_jacobian(fn, params, xs, h=1e-6):
    """The slow, obvious twin: column k moves theta_k alone by +-h (numpy loop, float64)."""
    flat, unravel = ravel_pytree(params)
    flat = np.asarray(flat, np.float64)

    batched = jax.jit(lambda theta: jax.vmap(fn, (None, 0))(unravel(theta), xs).reshape(-1))

    def outputs(theta):
        return np.asarray(batched(jnp.asarray(theta)))

    cols = []
    for k in range(flat.size):
        up, down = flat.copy(), flat.copy()
        up[k] += h
        down[k] -= h
        cols.append((outputs(up) - outputs(down)) / (up[k] - down[k]))
    return np.stack(cols, axis=1)


def all_modes(fn, params, xs, modes=MODES, chunk_size=None):
    """``{mode: J}`` from one jitted program (one compilation instead of one trace per mode)."""

    @jax.jit
    def matrices(params, xs):
        return {m: pb.jacobian(fn, params, xs, mode=m, chunk_size=chunk_size).matrix for m in modes}

    return matrices(params, xs)


def resolved_mode(fn, params, xs):
    """What ``"auto"`` picks, without computing anything (``mode`` is static pytree data)."""
    return jax.eval_shape(lambda p, x: pb.jacobian(fn, p, x), params, xs).mode


def nested_fn(params, x):
    """A non-MLP function of a params pytree with dicts, lists and tuples; output (2,)."""
    a, (w, scale) = params["blocks"][0], params["blocks"][1]
    h = jnp.sin(w @ x + a["shift"]) * params["gain"]["g"]
    return jnp.stack([jnp.sum(h**2) * scale, jnp.prod(jnp.cos(h)) + a["shift"][0] * scale])


def nested_params(key, dtype=jnp.float64):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "blocks": [
            {"shift": jax.random.normal(k1, (3,), dtype)},
            (jax.random.normal(k2, (3, 2), dtype), jax.random.normal(k3, (), dtype)),
        ],
        "gain": {"g": jax.random.normal(k4, (3,), dtype)},
    }


def scalar_fn(params, x):
    """Scalar output (shape ())."""
    return jnp.tanh(params["u"] @ x) * params["c"][0][0]


@given(
    depth=st.integers(1, 3),
    width=st.integers(1, 5),
    n_in=st.integers(1, 3),
    n_out=st.integers(1, 3),
    n=st.integers(1, 4),
    activation=st.sampled_from(["tanh", "sigmoid", "gelu", "softplus", "identity", "relu"]),
    seed=st.integers(0, 2**16),
)
def test_modes_agree_with_each_other_and_finite_differences_on_random_mlps(
    depth, width, n_in, n_out, n, activation, seed
):
    sizes = [n_in] + [width] * depth + [n_out]
    key_p, key_x = jax.random.split(jax.random.key(seed))
    params, apply = random_mlp(key_p, sizes, activation)
    xs = jax.random.normal(key_x, (n, n_in), jnp.float64)
    p = sum(leaf.size for leaf in jax.tree.leaves(params))
    fd = finite_difference_jacobian(apply, params, xs)
    matrices = all_modes(apply, params, xs, modes=("per_example", "fwd", "rev", "structured"))
    for matrix in matrices.values():
        chex.assert_shape(matrix, (n * n_out, p))
        # Exact modes agree to rounding; finite differences to O(h^2 + eps/h).
        np.testing.assert_allclose(matrix, matrices["per_example"], rtol=1e-10, atol=1e-12)
        # relu has kinks: a difference step across one is not a derivative; skip FD there.
        if activation != "relu":
            np.testing.assert_allclose(matrix, fd, rtol=1e-6, atol=1e-7)
    # auto never forms a dense J by the structured path (see jacobian.auto_mode).
    assert resolved_mode(apply, params, xs) == ("fwd" if p < n_out else "per_example")


def test_modes_agree_on_nested_pytree_params():
    params = nested_params(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (5, 2), jnp.float64)
    fd = finite_difference_jacobian(nested_fn, params, xs)
    for matrix in all_modes(nested_fn, params, xs, modes=GENERIC_MODES).values():
        chex.assert_shape(matrix, (5 * 2, 3 + 6 + 1 + 3))
        np.testing.assert_allclose(matrix, fd, rtol=1e-6, atol=1e-7)
    assert resolved_mode(nested_fn, params, xs) == "per_example"


@pytest.mark.parametrize("mode", GENERIC_MODES)
def test_scalar_output(mode):
    params = {"u": jnp.array([0.3, -0.7]), "c": (jnp.array([1.5]),)}
    xs = jax.random.normal(jax.random.key(2), (4, 2), jnp.float64)
    jac = pb.jacobian(scalar_fn, params, xs, mode=mode)
    chex.assert_shape(jac.matrix, (4, 3))
    assert jac.n_outputs == 1 and jac.spec.out_shape == ()
    np.testing.assert_allclose(
        jac.matrix, finite_difference_jacobian(scalar_fn, params, xs), rtol=1e-6, atol=1e-8
    )
    chex.assert_shape(jac.tree["u"], (4, 2))


def test_auto_takes_forward_mode_when_outputs_outnumber_parameters():
    params = {"s": jnp.array([0.5])}
    xs = jnp.ones((3, 1))
    jac = pb.jacobian(lambda p, x: jnp.sin(p["s"] * jnp.arange(8.0)) + x, params, xs)
    assert jac.mode == "fwd" and jac.shape == (24, 1)


@pytest.mark.parametrize("chunk_size", [1, 3, 50])
def test_chunked_equals_unchunked(chunk_size):
    params, apply = random_mlp(jax.random.key(3), [2, 4, 2])
    xs = jax.random.normal(jax.random.key(4), (7, 2), jnp.float64)
    whole = all_modes(apply, params, xs)
    chunked = all_modes(apply, params, xs, chunk_size=chunk_size)
    for mode in MODES:
        np.testing.assert_allclose(chunked[mode], whole[mode], rtol=1e-13, atol=1e-14)


def test_chunked_generic_function_with_pytree_inputs():
    params = nested_params(jax.random.key(5))
    xs = {"x": jax.random.normal(jax.random.key(6), (5, 2), jnp.float64)}

    def fn(p, example):
        return nested_fn(p, example["x"])

    whole = pb.jacobian(fn, params, xs).matrix
    np.testing.assert_allclose(pb.jacobian(fn, params, xs, chunk_size=2).matrix, whole, 1e-13)


@pytest.mark.parametrize("mode", MODES)
def test_jit_compiles_once_and_matches_eager(mode):
    params, apply = random_mlp(jax.random.key(7), [3, 5, 2])
    xs = jax.random.normal(jax.random.key(8), (4, 3), jnp.float64)

    @jax.jit
    def jac_matrix(params, xs):
        return pb.jacobian(apply, params, xs, mode=mode, chunk_size=3).matrix

    assert_compiles_once(jac_matrix, params, xs)
    eager = pb.jacobian(apply, params, xs, mode=mode).matrix
    np.testing.assert_allclose(jac_matrix(params, xs), eager, rtol=1e-13, atol=1e-14)
    # New values, same shapes: still one compilation.
    assert count_compiles(jac_matrix, jax.tree.map(lambda a: a + 1.0, params), xs + 1.0) == 0


def test_jitted_function_can_return_the_jacobian_object():
    params = nested_params(jax.random.key(9))
    xs = jax.random.normal(jax.random.key(10), (3, 2), jnp.float64)
    jitted = jax.jit(lambda p, x: pb.jacobian(nested_fn, p, x))
    assert_compiles_once(jitted, params, xs)
    jac = jitted(params, xs)
    assert isinstance(jac, pb.Jacobian) and jac.mode == "per_example"
    assert jac.labels == pb.jacobian(nested_fn, params, xs).labels


def test_labels_and_ravel_order_for_an_mlp():
    params, apply = random_mlp(jax.random.key(11), [2, 3, 1])
    jac = pb.jacobian(apply, params, jnp.ones((2, 2)))
    # jax.tree order sorts dict keys: b before w within each layer.
    expected = (
        ["layers[0].b[0]", "layers[0].b[1]", "layers[0].b[2]"]
        + [f"layers[0].w[{i},{j}]" for i in range(2) for j in range(3)]
        + ["layers[1].b[0]"]
        + [f"layers[1].w[{i},0]" for i in range(3)]
    )
    assert list(jac.labels) == expected
    assert len(jac.labels) == jac.shape[1] == 13


def test_labels_for_nested_dicts_lists_tuples():
    params = nested_params(jax.random.key(12))
    labels = pb.jacobian(nested_fn, params, jnp.ones((1, 2))).labels
    assert labels[:3] == ("blocks[0].shift[0]", "blocks[0].shift[1]", "blocks[0].shift[2]")
    assert labels[3] == "blocks[1][0][0,0]" and labels[8] == "blocks[1][0][2,1]"
    assert labels[9] == "blocks[1][1]"  # a scalar leaf: no index
    assert labels[10:] == ("gain.g[0]", "gain.g[1]", "gain.g[2]")


def test_each_label_names_the_parameter_that_moves_its_column():
    """Perturb the parameter a label names (by tree path, not by ravel index); exactly that
    column of J predicts the change of every output."""
    params, apply = random_mlp(jax.random.key(13), [2, 3, 2])
    xs = jax.random.normal(jax.random.key(14), (3, 2), jnp.float64)
    jac = pb.jacobian(apply, params, xs)
    base = jax.vmap(apply, (None, 0))(params, xs).reshape(-1)
    h = 1e-6
    for col, label in enumerate(jac.labels):
        layer, leaf, index = _parse_mlp_label(label)
        moved = jax.tree.map(lambda a: a, params)
        moved["layers"][layer][leaf] = moved["layers"][layer][leaf].at[index].add(h)
        change = (jax.vmap(apply, (None, 0))(moved, xs).reshape(-1) - base) / h
        np.testing.assert_allclose(change, jac.matrix[:, col], rtol=1e-4, atol=1e-6)
        # ... and no other column does (columns of this small net are distinct).
        others = np.delete(np.asarray(jac.matrix), col, axis=1)
        assert np.min(np.max(np.abs(others - change[:, None]), axis=0)) > 1e-4


def _parse_mlp_label(label):
    """``"layers[1].w[2,0]"`` -> ``(1, "w", (2, 0))``, parsed independently of paribus."""
    head, leaf_index = label.split(".")
    layer = int(head[len("layers[") : -1])
    leaf, index = leaf_index.split("[")
    return layer, leaf, tuple(int(i) for i in index[:-1].split(","))


def test_tree_view_matches_matrix_and_jacrev():
    params = nested_params(jax.random.key(15))
    xs = jax.random.normal(jax.random.key(16), (4, 2), jnp.float64)
    jac = pb.jacobian(nested_fn, params, xs)
    expected = jax.vmap(jax.jacrev(nested_fn), (None, 0))(params, xs)
    chex.assert_trees_all_close(jac.tree, expected, rtol=1e-13, atol=1e-14)
    chex.assert_shape(jac.tree["blocks"][1][0], (4, 2, 3, 2))


def test_float32_works():
    params, apply = random_mlp(jax.random.key(17), [2, 8, 3], dtype=jnp.float32)
    xs = jax.random.normal(jax.random.key(18), (6, 2), jnp.float32)
    reference = pb.jacobian(
        apply, jax.tree.map(lambda a: a.astype(jnp.float64), params), xs.astype(jnp.float64)
    ).matrix
    for matrix in all_modes(apply, params, xs).values():
        assert matrix.dtype == jnp.float32
        np.testing.assert_allclose(matrix, reference, rtol=1e-5, atol=1e-6)


class TestBadInputs:
    def setup_method(self):
        self.params, self.apply = random_mlp(jax.random.key(19), [3, 4, 1])

    def test_unknown_mode(self):
        with pytest.raises(ValueError, match=r"unknown Jacobian mode 'bwd'.*'per_example'"):
            pb.jacobian(self.apply, self.params, jnp.ones((2, 3)), mode="bwd")

    def test_wrong_example_shape(self):
        with pytest.raises(ValueError, match=r"expected one example x of shape \(3,\), got "):
            pb.jacobian(self.apply, self.params, jnp.ones((2, 5)))

    def test_missing_batch_axis(self):
        with pytest.raises(
            ValueError, match=r"expected one example x of shape \(3,\), got shape \(\)"
        ):
            pb.jacobian(self.apply, self.params, jnp.ones(3))

    def test_integer_params(self):
        params = jax.tree.map(lambda a: a.astype(jnp.int32), self.params)
        with pytest.raises(TypeError, match=r"'layers\[0\].b' has dtype int32; expected a float"):
            pb.jacobian(self.apply, params, jnp.ones((2, 3)))

    def test_wrong_params_structure(self):
        with pytest.raises(
            ValueError, match=r"expected params \{'layers': \[...\]\} with 2 layers"
        ):
            pb.jacobian(self.apply, {"layers": self.params["layers"][:1]}, jnp.ones((2, 3)))
        bad = {"layers": [self.params["layers"][1], self.params["layers"][0]]}
        with pytest.raises(ValueError, match=r"layer 0 expected w \(3, 4\) and b \(4,\)"):
            pb.jacobian(self.apply, bad, jnp.ones((2, 3)))

    @pytest.mark.parametrize("chunk_size", [0, -2, 1.5, True])
    def test_bad_chunk_size(self, chunk_size):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            pb.jacobian(self.apply, self.params, jnp.ones((2, 3)), chunk_size=chunk_size)

    def test_structured_mode_takes_any_function(self):
        """Not only pb.nets: the layers of any per-example function (here one elementwise
        product and a sum) give the same J as reverse mode per example."""
        params = {"u": jnp.array([0.3, -1.2]), "c": (jnp.array([0.7]),)}
        xs = jnp.array([[1.0, 2.0], [-0.5, 0.25]])
        got = pb.jacobian(scalar_fn, params, xs, mode="structured").matrix
        want = pb.jacobian(scalar_fn, params, xs, mode="per_example").matrix
        np.testing.assert_allclose(got, want, rtol=1e-14)

    def test_ragged_batch(self):
        with pytest.raises(ValueError, match="same leading"):
            pb.jacobian(lambda p, e: p * e[0][0], jnp.ones(()), (jnp.ones((2, 1)), jnp.ones((3,))))

    def test_integer_output(self):
        with pytest.raises(TypeError, match="must return one floating-point array"):
            pb.jacobian(lambda p, x: jnp.argmax(p * x), jnp.ones(2), jnp.ones((2, 2)))


def test_auto_chunk_size_follows_the_memory_budget():
    params, apply = random_mlp(jax.random.key(3), [3, 8, 2])
    xs = jax.random.normal(jax.random.key(4), (20, 3), jnp.float64)
    full = pb.jacobian(apply, params, xs, chunk_size=None).matrix
    row_bytes = 2 * sum(leaf.size for leaf in jax.tree.leaves(params)) * 8
    # Room for J plus five examples' rows: the chunked result is the same J.
    assert (
        pb.memory.jacobian_chunk_size(20, 2, row_bytes // 16, jnp.float64, budget=25 * row_bytes)
        == 5
    )
    tight = pb.jacobian(apply, params, xs, memory_budget=25 * row_bytes).matrix
    np.testing.assert_allclose(tight, full, rtol=1e-13, atol=1e-15)
    with pytest.raises(pb.memory.MemoryBudgetError, match="at most 8 examples would fit"):
        pb.jacobian(apply, params, xs, memory_budget=9 * row_bytes)
