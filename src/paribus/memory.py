"""Memory budgets: how many examples to process at a time, and a clear error when none fit.

A computation over N examples needs ``fixed_bytes`` whatever the chunking (its output, e.g. the
N m P numbers of a Jacobian) plus ``bytes_per_example`` for each example processed at once (the
intermediates of a vmapped chunk). With a budget B, the largest chunk is

    c = floor((B - fixed_bytes) / bytes_per_example),

``None`` (no chunking) when c >= N, and an error naming what would fit when c < 1.

The default budget is half of what the device has free: ``jax.devices()[0].memory_stats()``
(``bytes_limit - bytes_in_use``) on accelerators; on CPU, where that is unavailable, the
host's available physical memory from ``os.sysconf``. Half, because XLA's own temporaries and
the caller's arrays share the same memory and are not counted here.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

DEFAULT_FRACTION = 0.5


class MemoryBudgetError(ValueError):
    """Even the smallest chunk of the computation does not fit in the memory budget."""


def _gib(n: float) -> str:
    """A byte count in the largest binary unit that keeps it >= 1, to 3 significant digits."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def _bytes(n: int) -> str:
    """Exact bytes, and the rounded size beside them: two different sizes never print alike
    (3 significant digits made 26,000 and 25,990 bytes both "25.4 KiB")."""
    n = int(n)
    return f"{n:,} B" if abs(n) < 2**10 else f"{n:,} B ({_gib(n)})"


def device_free_bytes(device: Any = None) -> int:
    """Free memory of ``device`` (default: the first device) in bytes.

    Accelerators: ``bytes_limit - bytes_in_use`` from ``device.memory_stats()``. CPU: the
    host's available physical pages (``SC_AVPHYS_PAGES``, else all physical pages).
    """
    device = device or jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - not on Linux
        pages = os.sysconf("SC_PHYS_PAGES")
    return int(page) * int(pages)


def default_budget(fraction: float = DEFAULT_FRACTION, device: Any = None) -> int:
    """``fraction`` of :func:`device_free_bytes`, in bytes."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}.")
    return int(fraction * device_free_bytes(device))


def chunk_size(
    n_examples: int,
    bytes_per_example: int,
    *,
    fixed_bytes: int = 0,
    budget: int | None = None,
    what: str = "the computation",
) -> int | None:
    """The largest number of examples to process at once within ``budget`` bytes.

    Args:
      n_examples: N.
      bytes_per_example: memory that grows with the chunk, per example in it.
      fixed_bytes: memory needed whatever the chunking (the output).
      budget: bytes; default :func:`default_budget`.
      what: a description for the error message.

    Returns:
      ``None`` when all N examples fit at once, else a chunk size in [1, N).

    Raises:
      MemoryBudgetError: when not even one example fits; the message says how many examples,
        and what budget, would fit.
    """
    budget = default_budget() if budget is None else int(budget)
    if n_examples < 1 or bytes_per_example < 0 or fixed_bytes < 0:
        raise ValueError(
            f"chunk_size needs n_examples >= 1 and non-negative sizes; got {n_examples}, "
            f"{bytes_per_example}, {fixed_bytes}."
        )
    room = budget - fixed_bytes
    if bytes_per_example == 0:
        fits = n_examples if room >= 0 else 0
    else:
        fits = max(room, -1) // bytes_per_example
    if fits >= n_examples:
        return None
    if fits >= 1:
        return int(fits)
    needed = fixed_bytes + bytes_per_example
    raise MemoryBudgetError(
        f"{what} does not fit in the memory budget of {_bytes(budget)}: it needs "
        f"{_bytes(fixed_bytes)} whatever the chunking plus {_bytes(bytes_per_example)} per "
        f"example processed at once, i.e. at least {_bytes(needed)}. Pass a budget of at least "
        f"{_bytes(needed)}, or use fewer examples or parameters, or a form that never stores it "
        "(the NTK, GGN-vector products and per-example gradient norms of pb.curvature never "
        "form J)."
    )


def check_chunk_size(
    chunk: int | None,
    n_examples: int,
    bytes_per_example: int,
    *,
    fixed_bytes: int = 0,
    budget: int | None = None,
    what: str = "the computation",
) -> int | None:
    """Check an explicit chunk size against ``budget``, by the rule of :func:`chunk_size`.

    ``chunk`` examples at once (None: all N) need ``fixed_bytes + min(chunk, N) *
    bytes_per_example``; that must not exceed the budget.

    Returns:
      ``chunk`` unchanged, when it fits.

    Raises:
      MemoryBudgetError: naming the largest chunk that would fit (the one :func:`chunk_size`
        picks), or, when not even one example fits, what budget would.
    """
    budget = default_budget() if budget is None else int(budget)
    used = n_examples if chunk is None else min(int(chunk), n_examples)
    if fixed_bytes + used * bytes_per_example <= budget:
        return chunk
    largest = chunk_size(
        n_examples, bytes_per_example, fixed_bytes=fixed_bytes, budget=budget, what=what
    )
    raise MemoryBudgetError(
        f"{what} with chunk_size={chunk} needs {_bytes(fixed_bytes)} whatever the chunking plus "
        f"{used} x {_bytes(bytes_per_example)} for the examples processed at once, "
        f"{_bytes(fixed_bytes + used * bytes_per_example)} in all, but the memory budget is "
        f"{_bytes(budget)}; the largest chunk that fits is {largest}. Pass "
        f"chunk_size={largest} or 'auto', or a larger budget."
    )


def _jacobian_sizes(n_outputs: int, n_params: int, dtype: Any) -> tuple[int, str]:
    return n_outputs * n_params * np.dtype(dtype).itemsize, np.dtype(dtype).name


def _jacobian_too_big(n_examples: int, n_outputs: int, n_params: int, dtype: Any, budget: int):
    """The error when not even J with one example's rows in flight fits."""
    row_bytes, name = _jacobian_sizes(n_outputs, n_params, dtype)
    fixed = n_examples * row_bytes
    # The same rule as chunk_size: N' examples fit when N' rows + one row in flight <= budget.
    largest = max(budget // row_bytes - 1, 0) if row_bytes else n_examples
    fits = f"at most {largest} examples would fit" if largest else "not even one example would fit"
    return MemoryBudgetError(
        f"the Jacobian ({n_examples * n_outputs} x {n_params} {name}) needs {_bytes(fixed)} "
        f"for J plus {_bytes(row_bytes)} for the rows of one example in flight, "
        f"{_bytes(fixed + row_bytes)} in all, but the memory budget is {_bytes(budget)}; "
        f"{fits}. Use pb.ntk / pb.ggn_vector_product / pb.per_example_grad_norms, which never "
        "form J, or a larger budget."
    )


def jacobian_chunk_size(
    n_examples: int,
    n_outputs: int,
    n_params: int,
    dtype: Any,
    *,
    budget: int | None = None,
) -> int | None:
    """Chunk size for a dense (N m, P) Jacobian: the output N m P numbers are fixed; each
    example in a chunk holds its (m, P) rows once more before they are written out.

    So c examples at a time need (N + c) m P itemsize bytes. Raises
    :class:`MemoryBudgetError` naming the largest N whose Jacobian would fit (with c = 1).
    """
    row_bytes, _ = _jacobian_sizes(n_outputs, n_params, dtype)
    budget = default_budget() if budget is None else int(budget)
    fixed = n_examples * row_bytes
    if fixed + row_bytes > budget:
        raise _jacobian_too_big(n_examples, n_outputs, n_params, dtype, budget)
    return chunk_size(n_examples, row_bytes, fixed_bytes=fixed, budget=budget, what="the Jacobian")


def check_jacobian_chunk_size(
    chunk: int | None,
    n_examples: int,
    n_outputs: int,
    n_params: int,
    dtype: Any,
    *,
    budget: int | None = None,
) -> int | None:
    """Check an explicit ``chunk_size`` of a dense Jacobian against ``budget``.

    The rule of :func:`jacobian_chunk_size`: c examples at a time (None: all N) need
    (N + min(c, N)) m P itemsize bytes.

    Returns:
      ``chunk`` unchanged, when it fits.

    Raises:
      MemoryBudgetError: as :func:`jacobian_chunk_size` when J itself does not fit, else
        naming the largest chunk that does.

    Example:
      >>> import paribus as pb
      >>> # J of 20 examples, 1 output, 6 float64 parameters: 960 bytes, 48 per example.
      >>> pb.memory.check_jacobian_chunk_size(5, 20, 1, 6, "float64", budget=1200)
      5
      >>> pb.memory.check_jacobian_chunk_size(10, 20, 1, 6, "float64", budget=1200)
      Traceback (most recent call last):
      ...
      paribus.memory.MemoryBudgetError: ... the largest chunk that fits is 5. ...
    """
    row_bytes, _ = _jacobian_sizes(n_outputs, n_params, dtype)
    budget = default_budget() if budget is None else int(budget)
    if (n_examples + 1) * row_bytes > budget:
        raise _jacobian_too_big(n_examples, n_outputs, n_params, dtype, budget)
    return check_chunk_size(
        chunk,
        n_examples,
        row_bytes,
        fixed_bytes=n_examples * row_bytes,
        budget=budget,
        what="the Jacobian",
    )
