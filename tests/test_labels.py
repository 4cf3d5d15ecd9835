"""Column labels: one per parameter, never shared by two, and each one finds its column."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import paribus as pb
from paribus import _tree


class Pair(NamedTuple):
    w: np.ndarray
    b: float


TABLE = [
    # The case: element 0 of leaf "a" and the scalar leaf "a[0]".
    ({"a": np.zeros(1), "a[0]": 0.0}, ["a[0]", "'a[0]'"]),
    ({"a": {"b": 0.0}, "a.b": 0.0}, ["a.b", "'a.b'"]),
    ({"a": [0.0, 0.0], "a[1]": np.zeros(1)}, ["a[0]", "a[1]", "'a[1]'[0]"]),
    ({"": 0.0, " ": 0.0, "x,y": np.zeros(2)}, ["''", "' '", "'x,y'[0]", "'x,y'[1]"]),
    (
        {"it's": 0.0, 'say "hi"': 0.0, "back\\slash": 0.0},
        ["'back\\\\slash'", '"it\'s"', "'say \"hi\"'"],
    ),
    ({1: 0.0, 1.5: 0.0, 2: np.zeros((1, 2))}, ["1", "'1.5'", "2[0,0]", "2[0,1]"]),
    ({"0": 0.0, "10": 0.0}, ["0", "10"]),  # digits stay bare: "0" and 0 never share a dict
    ({"w": [np.zeros(2), 0.0]}, ["w[0][0]", "w[0][1]", "w[1]"]),
    (
        {"mlp/~/linear_0": {"w": np.zeros((1, 2))}},
        ["mlp/~/linear_0.w[0,0]", "mlp/~/linear_0.w[0,1]"],
    ),
    ({"layers": [Pair(np.zeros(1), 0.0)]}, ["layers[0].w[0]", "layers[0].b"]),
    (np.zeros((2, 1)), ["theta[0,0]", "theta[1,0]"]),
]


@pytest.mark.parametrize(("params", "expected"), TABLE)
def test_labels_of_awkward_keys(params, expected):
    labels = _tree.labels(params)
    assert list(labels) == expected
    for k, label in enumerate(labels):
        assert _tree._label_index(params, label) == k


def test_partial_by_label_reads_the_right_column():
    params = {"a": jnp.array([1.0]), "a[0]": jnp.array(2.0), "a.b": jnp.array(3.0)}

    def f(p):
        return 5 * p["a"][0] + 7 * p["a[0]"] + 11 * p["a.b"]

    assert float(pb.partial(f, params, "a[0]")) == 5.0
    assert float(pb.partial(f, params, "'a[0]'")) == 7.0
    assert float(pb.partial(f, params, "'a.b'")) == 11.0
    labels = pb.jacobian(lambda p, x: f(p) * x, params, jnp.ones((1, 1))).labels
    assert labels == ("a[0]", "'a.b'", "'a[0]'")  # keys in jax's (sorted) order


@pytest.mark.parametrize(
    "label", ["a[ 0]", "a[+0]", "a[00]", "a[0,0]", "a[1_0]", "a[11]", "a", "b[0]", "b[0, 1]", "c"]
)
def test_only_exact_labels_match(label):
    params = {"a": jnp.zeros(11), "b": jnp.zeros((2, 2))}
    assert _tree._label_index(params, "a[10]") == 10
    assert _tree._label_index(params, "b[1,0]") == 13
    with pytest.raises(KeyError, match="no parameter labelled"):
        _tree._label_index(params, label)


# Keys drawn from the characters that structure a label, and from a few keys that spell
# another key's label ("a[0]" is element 0 of "a", "a.b" is "b" inside "a"), so that a
# collision is a likely draw (the unquoted scheme fails within a few dozen examples).
TEXT_KEYS = st.one_of(
    st.sampled_from(["a", "b", "a[0]", "a.b", "a[0,0]", "'a'", "", "0"]),
    st.lists(
        st.sampled_from(["a", "b", "0", "[0]", "[", "]", ".", ",", "'", '"', " ", "\\"]),
        max_size=3,
    ).map("".join),
)
SHAPES = st.sampled_from([(), (1,), (2,), (2, 1), (1, 3)])
LEAVES = SHAPES.map(np.zeros)


def _trees(children):
    return st.one_of(
        st.dictionaries(TEXT_KEYS, children, min_size=1, max_size=3),
        st.dictionaries(st.integers(-2, 12), children, min_size=1, max_size=3),
        st.dictionaries(st.floats(-2, 2, allow_nan=False), children, min_size=1, max_size=2),
        st.lists(children, min_size=1, max_size=3),
        st.tuples(children, children),
    )


TREES = st.recursive(LEAVES, _trees, max_leaves=8)


@settings(max_examples=300)  # cheap (no jax computation), and collisions are rare draws
@given(TREES)
def test_labels_are_distinct_and_round_trip(params):
    labels = _tree.labels(params)
    assert len(labels) == ravel_pytree(params)[0].size == pb.num_params(params)
    assert len(set(labels)) == len(labels), labels
    for k, label in enumerate(labels):
        assert _tree._label_index(params, label) == k, (label, labels)


@settings(max_examples=100)
@given(TREES, st.data())
def test_a_key_that_spells_another_label_gets_its_own(tree, data):
    """The adversarial case, built from the scheme itself: beside a subtree k, a scalar leaf
    whose key is the label of one of k's parameters ({"k": [x], "k[0]": y} and the like)."""
    inner = _tree.labels({"k": tree})
    spelled = data.draw(st.sampled_from(inner))
    params = {"k": tree, spelled: np.zeros(())}
    labels = _tree.labels(params)
    assert len(set(labels)) == len(labels), labels
    for k, label in enumerate(labels):
        assert _tree._label_index(params, label) == k, (label, labels)
