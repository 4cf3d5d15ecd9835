"""Shared plumbing for the experiment scripts: command line, timing, whole-or-nothing writes.

Every experiment script takes ``--quick`` (seconds, for CI), ``--seeds`` and ``--out``, keeps
compile time out of its timings, and writes its CSV, PNG and markdown files whole or not at all
(each is written to a temporary file in the same folder, then renamed over the target).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def parser(name: str, description: str, *, seeds: int = 5) -> argparse.ArgumentParser:
    """The standard command line: ``--quick``, ``--seeds``, ``--out``, ``--no-progress``."""
    p = argparse.ArgumentParser(
        prog=f"experiments/{name}.py",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds (CI)")
    p.add_argument("--seeds", type=int, default=seeds, help=f"number of seeds (default {seeds})")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results") / name,
        help=f"output folder (default results/{name}/)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _atomic_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all."""
    return _atomic_bytes(path, text.encode())


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write dict rows as CSV (columns: union of keys in first-seen order), whole or not at all."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def save_figure(fig: Any, path: Path, *, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG, whole or not at all, and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return _atomic_bytes(path, buf.getvalue())


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; floats to 4 significant digits."""
    columns = list(columns or (rows[0].keys() if rows else []))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def timed(fn: Callable[..., Any], *args: Any, repeats: int = 1, **kwargs: Any):
    """``(result, compile_s, run_s)``: the first call (compile + run) timed apart from the
    median of ``repeats`` further calls, each ended by ``jax.block_until_ready``."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    first = time.perf_counter() - t0
    runs = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        runs.append(time.perf_counter() - t0)
    runs.sort()
    run = runs[len(runs) // 2]
    return out, max(first - run, 0.0), run


def progress(iterable: Iterable[Any], *, desc: str, disable: bool, total: int | None = None):
    """A tqdm progress bar (to stderr), or the bare iterable when disabled or tqdm is missing."""
    if disable:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the experiments extra
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


def use_agg() -> None:
    """Headless plotting."""
    import matplotlib

    matplotlib.use("Agg")


class ProbeState(NamedTuple):
    inner: Any
    count: jax.Array


class Recorder:
    """Host-side log of ``(wall time, step, *metrics)`` rows written by :func:`with_probe`."""

    def __init__(self):
        self.rows: list[tuple] = []

    def __call__(self, k, metrics) -> None:
        values = np.atleast_1d(np.asarray(metrics, float)).tolist()
        self.rows.append((time.perf_counter(), int(k), *values))


def with_probe(opt, probe_fn, every: int, recorder: Recorder, *, pass_state: bool = False):
    """Run ``opt`` unchanged; before every ``every``-th step, send ``probe_fn(params)`` (or
    ``probe_fn(params, opt_state)`` with ``pass_state``) and the step to ``recorder`` on the
    host. The callback is ordered, so the host timestamps follow the jitted ``pb.fit`` loop as
    it runs: loss against wall-clock without leaving the loop. The wrapped state contains
    ``opt``'s, so ``pb.fit`` still finds a Gauss-Newton / LM state inside it."""
    import optax

    opt = optax.with_extra_args_support(opt)

    def init(params):
        return ProbeState(opt.init(params), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, **extra):
        def fire():
            metrics = probe_fn(params, state.inner) if pass_state else probe_fn(params)
            jax.debug.callback(recorder, state.count, metrics, ordered=True)

        jax.lax.cond(state.count % every == 0, fire, lambda: None)
        new_updates, inner = opt.update(updates, state.inner, params, **extra)
        return new_updates, ProbeState(inner, state.count + 1)

    return optax.GradientTransformationExtraArgs(init, update)


def median(values) -> float:
    """The median of ``values`` as a Python float."""
    return float(np.median(np.asarray(values, float)))


def seed_median(curves: np.ndarray) -> np.ndarray:
    """Per-iteration median over seeds (rows) of loss curves padded with non-finite values, shown
    only while at least half the seeds still run (else it jumps as runs stop)."""
    import warnings

    finite = np.isfinite(curves)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        med = np.nanmedian(np.where(finite, curves, np.nan), axis=0)
    return np.where(finite.sum(0) * 2 >= len(curves), med, np.nan)


def minibatch_indices(seed: int, n: int, batch_size: int, epochs: int) -> jax.Array:
    """(epochs * (n // batch_size), batch_size): a fresh permutation of the examples per epoch."""
    rng = np.random.default_rng(1000 + seed)
    per_epoch = n // batch_size
    rows = [rng.permutation(n)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
            for _ in range(epochs)]  # fmt: skip
    return jnp.asarray(np.concatenate(rows), jnp.int32)
