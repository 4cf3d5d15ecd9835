"""Where the optimiser's state keeps its :class:`StepInfo`, and the compositions refused.

A transformation whose state holds one StepInfo is Jacobian-based: ``pb.fit`` reads the loss,
gradient norm and trial diagnostics from it. Its diagnostics describe the step it returns, so
compositions in which that step is not the one applied are refused here (from the state's
structure) or, for ``optax.chain`` members after it, at run time (``_rules.mismatch``).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from paribus.solvers._info import StepInfo

PyTree = Any

# optax wrappers that change or drop the steps of what they wrap: a Jacobian-based
# transformation under one of them would record diagnostics of steps that are not applied.
_WRAPPERS = {
    "MultiStepsState": "optax.MultiSteps (it applies zeros on all but every k-th step)",
    "PartitionState": "optax.multi_transform (it applies it to a part of the parameters)",
    "MaskedState": "optax.masked (it applies it to a part of the parameters)",
    "ConditionallyTransformState": "optax.conditionally_transform (it skips steps)",
    "ConditionallyMaskState": "optax.conditionally_mask (it zeroes steps)",
    "LookaheadState": "optax.lookahead (it applies interpolated steps)",
}


def path_name(path: tuple) -> str:
    """``state.inner[0].step_info``: a key path as the user would write it."""
    parts = ["state"]
    for key in path:
        if isinstance(key, jax.tree_util.SequenceKey):
            parts.append(f"[{key.idx}]")
        elif isinstance(key, jax.tree_util.DictKey):
            parts.append(f"[{key.key!r}]")
        else:
            parts.append(f".{getattr(key, 'name', key)}")
    return "".join(parts)


def _child(node: Any, key: Any) -> Any:
    if isinstance(key, jax.tree_util.SequenceKey):
        return node[key.idx]
    if isinstance(key, jax.tree_util.DictKey):
        return node[key.key]
    return getattr(node, key.name)


def find_step_info(state: PyTree) -> tuple | None:
    """The path of the one :class:`StepInfo` in ``state``; None for a first-order optimiser.

    Raises ``ValueError`` for compositions in which the recorded step is not the applied one:
    several StepInfos, an optax wrapper that changes or drops steps, or ``optax.chain`` members
    before the Jacobian-based transformation (they transform the zeros it is given, and it
    ignores their output). Members after it are checked at run time (``_rules.mismatch``).
    """
    found = optax.tree.get_all_with_path(state, "StepInfo")
    if not found:
        return None
    if len(found) > 1:
        where = ", ".join(path_name(path) for path, _ in found)
        raise ValueError(
            f"pb.fit: the optimiser's state holds {len(found)} StepInfo records ({where}): "
            "several Jacobian-based transformations in one optax.chain, whose diagnostics "
            "would describe steps that are not applied. Use one of them alone."
        )
    path = found[0][0]
    _check_enclosing(state, path)
    return path


def _check_enclosing(state: PyTree, path: tuple) -> None:
    """Refuse the wrappers and the earlier ``optax.chain`` members on the way to the StepInfo."""
    node = state
    for depth, key in enumerate(path):
        name = getattr(key, "tuple_name", None)
        if name in _WRAPPERS:
            raise ValueError(
                f"pb.fit: the Jacobian-based transformation (StepInfo at {path_name(path)}) "
                f"sits inside {_WRAPPERS[name]}, which changes or drops its steps while its "
                "diagnostics would be recorded. Use it alone."
            )
        if type(node) is tuple and isinstance(key, jax.tree_util.SequenceKey) and key.idx > 0:
            before = ", ".join(type(s).__name__ for s in node[: key.idx])
            raise ValueError(
                f"pb.fit: optax.chain member(s) before the Jacobian-based transformation "
                f"(StepInfo at {path_name(path[: depth + 1])}..., earlier states: {before}) "
                "transform the zero updates it receives, and it ignores their output. Use the "
                "Jacobian-based transformation alone."
            )
        node = _child(node, key)


def chained(state: PyTree, path: tuple | None) -> bool:
    """Whether ``optax.chain`` members follow the StepInfo's transformation."""
    node = state
    for key in path or ():
        if type(node) is tuple and isinstance(key, jax.tree_util.SequenceKey):
            if key.idx + 1 < len(node):
                return True
        node = _child(node, key)
    return False


def info_at(state: PyTree, path: tuple) -> StepInfo:
    """The StepInfo at ``path`` (from :func:`find_step_info`) in ``state``."""
    for key in path:
        state = _child(state, key)
    return state
