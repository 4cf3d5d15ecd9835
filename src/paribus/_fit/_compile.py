"""How the loop is compiled: XLA's quick settings when the whole run is small work.

On the CPU, XLA's backend compile is most of a small fit's first call (84-90% of it measured
on a 3-parameter curve fit; ``benchmarks/compile_time.py``), and most of that is its MLIR
fusion emitters and LLVM's optimisation passes, paid per kernel whatever the sizes. A run
whose arithmetic is small (a curve fit, a classic least-squares problem, a tiny network for a
few hundred steps) gains more by compiling quickly than by running optimised code: with
``xla_cpu_use_fusion_emitters=False`` and ``xla_backend_optimization_level=0`` its first call
is about 3x shorter, and its steps up to a few times slower, which for such a run is
milliseconds. Larger runs compile with XLA's defaults.

The estimate: F = the flops of one ``residual_fn(params, batch)`` (XLA's cost analysis of
the lowered function, no compile), P parameters, R residuals. A Jacobian-based step costs
about W = F (P + 2) + min(R P^2, R^2 P) + P^3, a first-order step W = 3 F + 10 P. Measured on
one CPU core, a quick-compiled step takes about 1.5-2e-9 s more per unit of W (nothing below
W ~ 1e3, where a step is the loop's own overhead). The run is small, and compiles quickly,
when W <= ``TINY_STEP_FLOPS`` (any number of steps: at most ~2 us more a step) or when
W ``max_steps`` <= ``QUICK_FLOPS`` (at most ~0.6 s more in all, against 1-5 s less compile).
The choice is made per call; the two compiled loops are cached apart, so a later call with a
``max_steps`` on the other side of the threshold compiles the other once
(``compile_mode`` in ``pb.fit`` pins one).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from paribus import _tree

QUICK_FLOPS = 3e8
"""Estimated flops of a whole run at or below which the loop compiles with QUICK_OPTIONS."""

TINY_STEP_FLOPS = 2e3
"""Estimated flops of one step at or below which the loop compiles with QUICK_OPTIONS."""

QUICK_OPTIONS = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 0}
"""XLA compiler options of a small run's loop (CPU only)."""

_FLOPS: dict = {}  # loop key -> F, the residual function's flops (a lowering saved per call)
_KEEP = 256


def on_cpu(params: Any) -> bool:
    """Whether the loop runs on the CPU (the parameters' devices, else the default backend)."""
    platforms = set()
    for leaf in jax.tree.leaves(params):
        devices = getattr(leaf, "devices", None)
        if callable(devices) and not isinstance(leaf, jax.core.Tracer):
            platforms |= {d.platform for d in devices()}
    return platforms == {"cpu"} if platforms else jax.default_backend() == "cpu"


def residual_flops(residual_fn, params, batch) -> float:
    """XLA's flop count of one ``residual_fn(params, batch)`` (lowered, not compiled); inf
    when the cost analysis has no answer."""
    try:
        hash(residual_fn)
    except TypeError:  # jax.jit needs a hashable callable; jax.eval_shape wraps it the same way
        residual_fn = functools.partial(residual_fn)
    try:
        cost = jax.jit(residual_fn).trace(params, batch).lower().cost_analysis()
    except Exception:  # noqa: BLE001 - an estimate only; the run itself reports real errors
        return float("inf")
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and np.isfinite(flops) else float("inf")


def run_flops(flops_fn: float, n_params: int, n_resid: int, jacobian: bool, steps: int) -> float:
    """The estimated flops of ``steps`` steps (see the module's docstring)."""
    p, r = float(n_params), float(n_resid)
    if jacobian:
        per_step = flops_fn * (p + 2) + min(r * p * p, r * r * p) + p**3
    else:
        per_step = 3 * flops_fn + 10 * p
    return per_step * steps


def choose(key, residual_fn, params, batch, n_resid: int, jacobian: bool, steps: int) -> bool:
    """Quick compile settings for this call's loop?"""
    n_params = _tree.num_params(params)
    if not on_cpu(params) or n_params * max(n_resid, 1) > 1e7:  # large: no flop count needed
        return False
    if key not in _FLOPS:
        if len(_FLOPS) >= _KEEP:
            _FLOPS.pop(next(iter(_FLOPS)))
        _FLOPS[key] = residual_flops(residual_fn, params, batch)
    per_step = run_flops(_FLOPS[key], n_params, n_resid, jacobian, 1)
    return per_step <= TINY_STEP_FLOPS or per_step * steps <= QUICK_FLOPS


def loop_key(cfg, params) -> tuple:
    """What identifies one compiled loop: the static configuration and the parameters'
    structure, shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(params)
    shapes = tuple(
        (np.shape(leaf), str(getattr(leaf, "dtype", type(leaf).__name__))) for leaf in leaves
    )
    return cfg, treedef, shapes
