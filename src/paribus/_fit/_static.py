"""The compiled loop's static argument: what it is specialised on, and when two are equal.

``jit`` compares static arguments with ``==``. A residual function or optimiser is compared by
how it was built (:class:`Same`), so ``pb.levenberg_marquardt()`` called twice with the same
settings, or a residual function rebuilt from the same data, reuses the compiled loop instead
of compiling it again.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any, NamedTuple


class Same:
    """A static argument that equals another built the same way.

    Functions compare by code and, recursively, by the values their closures hold; tuples,
    lists and dicts by content; other hashable values by equality; anything else (arrays)
    by identity.
    """

    __slots__ = ("key", "value")

    def __init__(self, value: Any):
        self.value, self.key = value, _structure(value, set())

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Same) and self.key == other.key


class _Identity:
    """Compares by identity and keeps the object alive (so its id is never reused)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj


def _globals_read(fn: types.FunctionType) -> tuple:
    """The module globals ``fn``'s code reads, by identity (scalars by value): two functions
    from the same code that read a global array rebound in between are not the same."""
    names, codes = set(), [fn.__code__]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    scalar = bool | int | float | complex | str | bytes | type(None)
    return tuple(
        (name, (type(v), v) if isinstance(v, scalar) else _Identity(v))
        for name in sorted(names)
        if name in fn.__globals__ and not isinstance(v := fn.__globals__[name], types.ModuleType)
    )


def _structure(obj: Any, seen: set) -> Any:
    if id(obj) in seen:
        return _Identity(obj)
    if isinstance(obj, types.FunctionType):
        seen = seen | {id(obj)}
        cells = tuple(_structure(c.cell_contents, seen) for c in obj.__closure__ or ())
        defaults = _structure(obj.__defaults__, seen), _structure(obj.__kwdefaults__, seen)
        return ("fn", obj.__code__, cells, defaults, _globals_read(obj))
    if isinstance(obj, functools.partial):
        seen = seen | {id(obj)}
        return ("partial", *(_structure(x, seen) for x in (obj.func, obj.args, obj.keywords)))
    if type(obj) in (tuple, list) or (isinstance(obj, tuple) and hasattr(obj, "_fields")):
        return (type(obj), tuple(_structure(x, seen | {id(obj)}) for x in obj))
    if type(obj) is dict:
        return (dict, tuple((k, _structure(v, seen | {id(obj)})) for k, v in obj.items()))
    if isinstance(obj, bool | int | float | complex | str | bytes | type(None) | type):
        return (type(obj), obj)
    return _Identity(obj)


class Config(NamedTuple):
    """What the compiled loop is specialised on (static, hashable)."""

    same_fn: Same  # residual_fn
    same_opt: Same  # opt
    same_loss: Same  # loss
    schedule: str | None  # None, "indices" or "stacked"
    rows: int  # points one call of the loop may evaluate
    info_path: tuple | None  # where the StepInfo sits in the optimiser state; None: first-order
    chained: bool  # optax.chain members follow it: check that they leave its steps alone
    hooks: bool  # a host callback at every point (callback / progress)
    send_params: bool  # the callback receives params every callback_every steps
    quick: bool = False  # compiled with XLA's quick settings (_compile: a small run on the CPU)

    @property
    def residual_fn(self) -> Callable:
        return self.same_fn.value

    @property
    def opt(self) -> Any:
        return self.same_opt.value

    @property
    def loss(self) -> Any:
        return self.same_loss.value
