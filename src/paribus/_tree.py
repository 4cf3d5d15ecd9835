"""Pytree helpers at the linear-algebra boundary: ravelling, column labels, validation.

Everything here is private. Column order is always that of
``jax.flatten_util.ravel_pytree(params)``: leaves in ``jax.tree`` order, each leaf in C order.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any


# Characters that structure a label: a key containing one (or empty) is written quoted.
_STRUCTURAL = frozenset("[].,'\"\\")


def key_name(key: Any) -> str:
    """A dict key or attribute name as it appears in a label.

    Written bare when that cannot be misread: a string with no brackets, dots, commas, quotes,
    backslashes or whitespace (``w``, ``Dense_0``, ``mlp/~/linear``), or an int. Anything else
    is quoted as a Python literal: ``'a[0]'``, ``'layer 1'``, ``''``, and non-string keys by
    the repr of their str (``'1.5'``). So the leaf ``{"a[0]": x}`` is ``'a[0]'`` and element 0
    of ``{"a": [x]}`` or ``{"a": x}`` is ``a[0]``. A string key of digits stays bare: JAX
    cannot sort str and int keys together, so "0" and 0 never share a dict.
    """
    if isinstance(key, int | np.integer) and not isinstance(key, bool | np.bool_):
        return str(int(key))
    if isinstance(key, str) and key and not any(c in _STRUCTURAL or c.isspace() for c in key):
        return key
    return repr(key if isinstance(key, str) else str(key))


def path_name(path: Sequence[Any]) -> str:
    """``(DictKey('layers'), SequenceKey(1), DictKey('w'))`` -> ``"layers[1].w"``.

    Keys are written by :func:`key_name`, so distinct paths of one pytree get distinct names
    and no name followed by an index ``[i,j]`` equals another leaf's name.
    """
    parts: list[str] = []
    for key in path:
        if isinstance(key, jax.tree_util.SequenceKey):
            parts.append(f"[{key.idx}]")
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(f"[{key.key}]")
        else:
            if isinstance(key, jax.tree_util.DictKey):
                name = key_name(key.key)
            elif isinstance(key, jax.tree_util.GetAttrKey):
                name = key_name(key.name)
            else:  # pragma: no cover - custom key types
                name = key_name(str(key))
            parts.append(name if not parts else f".{name}")
    return "".join(parts) or "theta"


def leaf_names(params: PyTree) -> list[str]:
    """One name per leaf of ``params``, in ``jax.tree`` order."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(params)
    return [path_name(path) for path, _ in with_path]


def labels(params: PyTree) -> tuple[str, ...]:
    """One label per scalar parameter, in ravel order: ``"layers[1].w[3,7]"``, ``"b[0]"``."""
    shapes = [np.shape(leaf) for leaf in jax.tree.leaves(params)]
    return labels_from(leaf_names(params), shapes)


def labels_from(names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> tuple[str, ...]:
    """Labels from leaf names and shapes (see :func:`labels`)."""
    return _labels_cached(tuple(names), tuple(tuple(s) for s in shapes))


@functools.lru_cache(maxsize=32)
def _labels_cached(names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...]) -> tuple[str, ...]:
    # Cached: a Jacobian's .labels of a large network is P strings, asked for repeatedly.
    out: list[str] = []
    for name, shape in zip(names, shapes, strict=True):
        if not shape:
            out.append(name)
            continue
        for index in np.ndindex(*shape):
            out.append(f"{name}[{','.join(str(i) for i in index)}]")
    return tuple(out)


def num_params(params: PyTree) -> int:
    """P, the number of scalar parameters in ``params``: the length of
    ``jax.flatten_util.ravel_pytree(params)[0]`` and the number of columns of the Jacobian.

    Example:
      >>> import jax.numpy as jnp, paribus as pb
      >>> pb.num_params({"w": jnp.zeros((3, 2)), "b": jnp.zeros(2), "scale": 1.0})
      9
    """
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def check_float_params(params: PyTree, *, where: str) -> None:
    """Raise ``TypeError`` unless every leaf of ``params`` is a floating-point array."""
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError(f"{where}: params has no leaves; expected a pytree of float arrays.")
    for name, leaf in zip(leaf_names(params), leaves, strict=True):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{where}: parameter {name!r} has dtype {dtype}; expected a floating-point "
                "array (derivatives with respect to integers are not defined). "
                "Cast it, e.g. jnp.asarray(x, jnp.float32)."
            )


def param_dtype(params: PyTree) -> jnp.dtype:
    """The common floating dtype of ``params``."""
    return jnp.result_type(*jax.tree.leaves(params))


def resolve_index(
    params: PyTree, k: int | str | jax.Array
) -> tuple[int | jax.Array, jax.Array | None]:
    """``(index, valid)``: a flat parameter index in [0, P) from k, and whether k was in range.

    k is an int, an integer scalar array or a column label. A label, an int or a concrete
    array (``jnp.int32(5)``) is checked here (``KeyError`` / ``IndexError``, negative indices
    count from the end) and ``valid`` is None. A traced k (under ``jit`` or ``vmap``) cannot
    be checked on the host: ``valid`` is then a traced bool, False when k is outside
    -P .. P - 1, and the index is clamped into range so that it can still be used; the caller
    must make its result NaN where ``valid`` is False.
    """
    size = num_params(params)
    if isinstance(k, str):
        return _label_index(params, k), None
    if isinstance(k, bool | np.bool_):
        raise TypeError(f"k must be an int, an integer scalar array or a label; got {k!r}.")
    if not isinstance(k, jax.core.Tracer):
        value = np.asarray(k)
        if value.shape != () or not np.issubdtype(value.dtype, np.integer):
            raise TypeError(
                "k must be an int, an integer scalar array or a label; got "
                f"{value.dtype}{value.shape}."
            )
        index = int(value)
        if not -size <= index < size:
            raise IndexError(
                f"parameter index {index} out of range for P = {size} parameters "
                f"(valid: {-size} .. {size - 1})."
            )
        return index % size, None
    if k.shape != () or not jnp.issubdtype(k.dtype, jnp.integer):
        raise TypeError(
            f"k must be an int, an integer scalar array or a label; got {k.dtype}{k.shape}."
        )
    valid = (k >= -size) & (k < size)
    return jnp.clip(jnp.where(k < 0, k + size, k), 0, size - 1), valid


def _label_index(params: PyTree, label: str) -> int:
    """The column of ``label``; on a miss, say which leaves and index ranges exist.

    Only the exact labels of :func:`labels` match (``"a[0,1]"``, not ``"a[0, 1]"`` or
    ``"a[+0,1]"``): with the quoting of :func:`key_name` at most one leaf then matches.
    """
    names = leaf_names(params)
    shapes = [np.shape(leaf) for leaf in jax.tree.leaves(params)]
    start = 0
    for name, shape in zip(names, shapes, strict=True):
        size = int(np.prod(shape))
        if label == name and not shape:
            return start
        if shape and label.startswith(name + "[") and label.endswith("]"):
            digits = label[len(name) + 1 : -1].split(",")
            if len(digits) == len(shape) and all(d.isdecimal() and d.isascii() for d in digits):
                index = tuple(int(d) for d in digits)
                canonical = all(str(i) == d for i, d in zip(index, digits, strict=True))
                if canonical and all(i < n for i, n in zip(index, shape, strict=True)):
                    return start + int(np.ravel_multi_index(index, shape))
        start += size
    leaves = ", ".join(f"{n} {tuple(s)}" for n, s in zip(names, shapes, strict=True))
    raise KeyError(
        f"no parameter labelled {label!r}. Labels are a leaf name and an index within the "
        f"leaf's shape, e.g. {labels_from(names[:1], shapes[:1])[0]!r}; the leaves and their "
        f"shapes are: {leaves}."
    )


def one_hot_tree(params: PyTree, k: int | jax.Array) -> PyTree:
    """The tangent e_k shaped like ``params``."""
    flat, unravel = ravel_pytree(params)
    return unravel(jnp.zeros_like(flat).at[k].set(1))


def leading_size(batch: PyTree, *, where: str) -> int:
    """N, the common leading axis of every leaf of ``batch``."""
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError(
            f"{where}: the batch has no arrays; expected arrays with a leading N axis."
        )
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [np.shape(leaf) for leaf in leaves]
        raise ValueError(
            f"{where}: every array in the batch needs the same leading (example) axis; "
            f"got shapes {shapes}."
        )
    return int(sizes.pop())
