"""How "auto" picks a solve form."""

from __future__ import annotations

MAX_DENSE = 8192
"""Largest side of a matrix "auto" factorises: (1/3) 8192^3 = 1.8e11 flops, seconds on a CPU and
milliseconds on a GPU. Above it matrix-free CG (a few gradients per iteration) is cheaper."""


def choose(solve: str, n_res: int, n_params: int, itemsize: int, budget: int) -> str:
    """The form "auto" resolves to: dual when R < P, primal when P is small, else cg."""
    if solve != "auto":
        return solve
    if n_res < n_params:
        fits = n_res * n_res * itemsize <= budget and n_res <= MAX_DENSE
        return "dual" if fits else "cg"
    fits = (n_res * n_params + n_params * n_params) * itemsize <= budget
    return "primal" if fits and n_params <= MAX_DENSE else "cg"
