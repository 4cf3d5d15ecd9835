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
    """A byte count in the largest binary unit that keeps it >= 1."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


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
        f"{what} does not fit in the memory budget of {_gib(budget)}: it needs "
        f"{_gib(fixed_bytes)} whatever the chunking plus {_gib(bytes_per_example)} per example "
        f"processed at once, i.e. at least {_gib(needed)}. Pass a budget of at least {_gib(needed)}"
        f", or use fewer examples or parameters, or a form that never stores it (the NTK, "
        "GGN-vector products and per-example gradient norms of pb.curvature never form J)."
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

    Raises :class:`MemoryBudgetError` naming the largest N whose Jacobian would fit.
    """
    item = np.dtype(dtype).itemsize
    row_bytes = n_outputs * n_params * item
    budget = default_budget() if budget is None else int(budget)
    fixed = n_examples * row_bytes
    if fixed + row_bytes > budget:
        largest = max(budget // (2 * row_bytes) if row_bytes else 0, 0)
        raise MemoryBudgetError(
            f"the Jacobian ({n_examples * n_outputs} x {n_params} {np.dtype(dtype).name}) needs "
            f"{_gib(fixed)} but the memory budget is {_gib(budget)}; at most "
            f"{largest} examples would fit. Use pb.ntk / pb.ggn_vector_product / "
            "pb.per_example_grad_norms, which never form J, or a larger budget."
        )
    return chunk_size(n_examples, row_bytes, fixed_bytes=fixed, budget=budget, what="the Jacobian")
